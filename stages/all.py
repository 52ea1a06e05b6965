"""`./train.sh --stage all`: data → SFT → expert iteration → GRPO → evaluation, one run folder.

    ./train.sh --stage all --model Qwen/Qwen2.5-1.5B
    ./train.sh --stage all --model Qwen/Qwen2.5-0.5B --use_lora ei.rounds=0      # SFT → GRPO → eval
    ./train.sh --stage all --run_name myrun …                                     # rerun: resumes
    ./train.sh --stage all --run_name myrun --until sft …      # stop after SFT and its eval; rerun without it

The chain is the stage table's (stages/registry.py). Each stage starts from the one before it through its
folder (`model.init=outputs/<run>/<stage>`), exactly as if the stages were run one by one with `--init`. A
stage whose manifest says `done` is skipped, so rerunning the same command resumes at the first unfinished
stage (and inside it, from its last checkpoint or round). Without --run_name the run is named after the
model (no timestamp), so the rerun finds it.
Every rung is measured on the same test set with the eval stage (eval.*): the starting model
(`base/eval`), the SFT export (`sft/eval`), EI's last round (its own eval) and GRPO's export (the closing
`eval`). report.md opens with the chain: one table (stage, strict, lenient, format, truncation, mean
length, wall time) and one plot of accuracy across stages and GRPO's validation steps. GRPO skips verl's
validation before its first step when that would repeat the previous rung's eval (the whole test set:
grpo.val_size -1 and no eval.limit).
Flags such as --lr or --batch_size set the SFT stage; set other stages with their keys (ei.rounds=2,
grpo.lr=1e-6, grpo.verl.trainer.test_freq=10); a bare verl key is refused as ambiguous.
`ei.rounds=0` skips expert iteration.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from stages import chain, registry, report, vllm_engine
from stages.config import read_manifest, stage_dir


def plan(cfg) -> list[str]:
    stages = [s for s in registry.chain() if not (s == "ei" and int(cfg.ei.rounds) <= 0)]
    if "grpo" in stages and str(cfg.grpo.prompts) == "mixed" and stages[stages.index("grpo") - 1] != "ei":
        # said now, not after SFT: GRPO's mixed prompts are EI's last round's counts
        raise SystemExit("[all] grpo.prompts=mixed needs the expert-iteration stage before GRPO (ei.rounds="
                         f"{cfg.ei.rounds}): set ei.rounds >= 1, or grpo.prompts=all")
    return stages


def run(cfg) -> int:
    if not cfg.run.name:
        cfg.run.name = Path(str(cfg.model.path).rstrip("/")).name or "model"
    run_dir = stage_dir(cfg, "data").parent
    stages = plan(cfg)
    until = cfg.run.get("until")
    if until is not None and until not in stages:
        raise SystemExit(f"[all] run.until={until}: use one of {', '.join(stages)} (this chain's stages)")
    print(f"[all] {run_dir}: {' -> '.join(['data', *stages])}", flush=True)
    if cfg.run.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    from data_prep import prepare

    prepare(cfg.data, run_dir / "data")  # once, for every stage (each would otherwise check it again)
    rc = rung_eval(cfg, run_dir, "base", cfg.model.init or cfg.model.path)
    if rc:
        return rc
    previous = None
    for stage in stages:
        folder = run_dir / stage
        if chain.is_done(folder):
            print(f"[all] {stage}: done earlier ({folder / 'manifest.json'})", flush=True)
        else:
            stage_cfg = copy.deepcopy(cfg)
            if stage == "grpo":
                stage_cfg.grpo.final_eval = False  # the chain's own eval stage follows
                if previous and int(cfg.grpo.val_size) == -1 and cfg.eval.limit is None:
                    # verl's validation before step 1 would repeat the last rung's eval (same model, same test
                    # set, greedy), at the cost of a whole-test-set generation in every GRPO launch
                    stage_cfg.grpo.verl.trainer.val_before_train = False
            if stage == "eval":
                stage_cfg.eval.output_dir = str(folder)
            if previous:
                stage_cfg.model.init = str(run_dir / previous)
            print(f"[all] {stage}: from {stage_cfg.model.init or stage_cfg.model.path}", flush=True)
            t0 = time.time()
            if stage in ("sft", "ei") or (stage == "grpo" and until != "grpo"):
                # the generation after this training (the rung's eval, EI's sampling, the closing eval stage) then
                # finds vLLM imported
                vllm_engine.prestart_before_training(stage_cfg)
            rc = registry.run(stage_cfg, stage)
            add_seconds(run_dir, stage, time.time() - t0)
            if rc:
                vllm_engine.release()
                print(f"[all] {stage} failed ({rc}); rerun the same command to resume at {stage}")
                report_so_far(run_dir)
                return rc
        if stage == "sft":  # EI evaluates its rounds, and the closing eval stage is GRPO's
            rc = rung_eval(cfg, run_dir, "sft", str(folder))
            if rc:
                return rc
        previous = stage
        if stage == until:
            chain_report(run_dir)
            print(f"[all] stopped after {stage} (run.until); the same command without --until goes on from here")
            return 0
    chain_report(run_dir)
    print(f"[all] done: {run_dir / 'report.md'}")
    return 0


# ---- the ladder at a glance
def rung_eval(cfg, run_dir: Path, rung: str, model: str) -> int:
    """The eval stage on `model` into run_dir/<rung>/eval, unless it is there already."""
    out = run_dir / rung / "eval"
    if (out / "metrics.json").exists():
        return 0
    print(f"[all] evaluating {rung}: {model}", flush=True)
    t0 = time.time()
    got = chain.evaluate_into(cfg, model, out)
    add_seconds(run_dir, f"{rung}-eval", time.time() - t0)
    return got if isinstance(got, int) else 0


def add_seconds(run_dir: Path, key: str, seconds: float) -> None:
    """Wall time per stage over every attempt (a resumed stage adds to what it had), in run_dir/chain.json."""
    path = run_dir / "chain.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[key] = round(times.get(key, 0.0) + seconds, 1)
    path.write_text(json.dumps(times, indent=2) + "\n")


def report_so_far(run_dir: Path) -> None:
    """The ladder section of report.md after a stage stopped (a time limit, a failure): the rungs measured so far
    and GRPO's validation steps so far. A report that cannot be written is said, not raised: the stage's own
    failure is what the user needs to read."""
    try:
        print(f"[all] the ladder so far: {chain_report(run_dir)}")
    except Exception as err:  # noqa: BLE001 (any problem with the report must not hide the stage's failure)
        print(f"[all] report.md not updated: {type(err).__name__}: {err}", file=sys.stderr)


def rungs(run_dir: Path) -> list[tuple[str, Path]]:
    """(rung, its eval metrics.json) in ladder order, for the rungs that have one."""
    from stages.ei import round_dirs

    found = [("base", run_dir / "base" / "eval"), ("sft", run_dir / "sft" / "eval")]
    found += [(f"ei {r.name.replace('_', ' ')}", r / "eval") for r in round_dirs(run_dir / "ei")]
    found.append(("grpo", run_dir / "eval"))
    return [(name, folder / "metrics.json") for name, folder in found if (folder / "metrics.json").exists()]


def chain_report(run_dir: Path) -> Path:
    """report.md's opening section: every rung on the same test set, and accuracy across stages and steps."""
    from stages import grpo_report

    times = json.loads((run_dir / "chain.json").read_text()) if (run_dir / "chain.json").exists() else {}
    found = rungs(run_dir)
    last_ei = [name for name, _ in found if name.startswith("ei")][-1:]
    spent = {"base": ("base-eval",), "sft": ("sft", "sft-eval"), "grpo": ("grpo", "eval")}
    rows, points = [], []
    for name, path in found:
        m = json.loads(path.read_text())
        keys = spent.get(name, ("ei",) if [name] == last_ei else ())  # EI's time is the stage's, on its last round
        timed = [times[k] for k in keys if k in times]  # none: the rung's eval was made outside the chain
        rows.append([name, m["accuracy"], m["lenient_accuracy"], m["format_accuracy"], m["trunc_rate"],
                     m["avg_gen_len"], round(sum(timed)) if timed else "", m["n"]])
        points.append((name, m["accuracy"]))
    curve = [r for r in grpo_report.curve(run_dir / "grpo") if r.get("val_acc") is not None] \
        if (run_dir / "grpo" / "logs").exists() else []
    finished = any(name == "grpo" for name, _ in found)
    figure = plot_ladder(points, curve, run_dir / "report" / "figures" / "ladder.png", finished)
    table = report.table(["stage", "strict", "lenient", "format", "truncated", "mean length", "wall s", "n"], rows)
    text = (f"Every rung greedy on the same test set (eval stage; `<rung>/eval/metrics.json`).\n\n{table}\n\n"
            "`wall s`: the stage's training plus its evaluation, over every attempt (`chain.json`). The plot adds "
            "GRPO's validation accuracy (verl's greedy validation on the same test set) at each validation step.")
    if curve and not finished:
        text += "\n\n" + grpo_so_far(run_dir / "grpo", curve)
    return report.add_section(run_dir, "chain", "The ladder", text, [figure] if figure else [], order=5)


def grpo_so_far(out: Path, curve: list[dict]) -> str:
    """One line for a GRPO stage that has validation steps but no final eval yet: its state from the manifest and
    verl's validation accuracy by step."""
    m = read_manifest(out) if (out / "manifest.json").exists() else {}
    failure = m.get("failure") or {}
    state = ", ".join(str(x) for x in (m.get("status", "running"), failure.get("kind")) if x)
    if failure.get("last_checkpoint_step"):
        state += f"; last checkpoint step {failure['last_checkpoint_step']}"
    steps = ", ".join(f"{r['val_acc']:.4f} at step {r['step']}" for r in curve)
    return (f"GRPO has not finished ({state}): verl's validation on the test set so far: {steps}. The same command "
            "resumes it from its last checkpoint.")


def plot_ladder(points: list[tuple[str, float]], curve: list[dict], path: Path, finished: bool = True
                ) -> Path | None:
    """Strict accuracy per rung, with GRPO's validation steps between EI and GRPO's final export; while GRPO has no
    final eval (`finished` false), its steps so far after the last rung."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    xs, names = list(range(len(points))), [n for n, _ in points]
    ax.plot(xs, [a for _, a in points], marker="o", label="eval stage (test set)")
    if curve and (len(points) >= 2 or not finished):
        last = max(r["step"] for r in curve) or 1
        # GRPO's steps spread between the rung before it and its own final point (or, unfinished, after the last)
        start = xs[-2] if finished else xs[-1]
        ax.plot([start + r["step"] / last for r in curve], [r["val_acc"] for r in curve], marker=".",
                linestyle="--", label="GRPO validation by step")
        if not finished:
            xs, names = xs + [xs[-1] + 1], names + [f"grpo step {last}"]
    ax.set_xticks(xs, names)
    ax.set(ylabel="strict accuracy", title="accuracy up the ladder")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
