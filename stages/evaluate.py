"""Eval stage: greedy decoding of a model on a test set (or k samples per problem), graded by `rewards.compute_score`.

    ./train.sh --stage eval --init outputs/<run>/sft                 # one GPU (vLLM when installed)
    ./train.sh --stage eval --init outputs/<run>/sft eval.tensor_parallel_size=4   # one model on 4 GPUs
    ./train.sh --stage eval --init outputs/<run>/sft --all_checkpoints            # every global_step_N
    ./train.sh --stage eval --init Qwen/Qwen2.5-0.5B --backend hf --limit 100 eval.dataset=math500
    ./train.sh --stage eval --init outputs/<run>/grpo eval.samples=8 eval.temperature=0.6   # pass@8, maj@8

`--init` (`model.init`): anything `stages.export.resolve_init` accepts (run/stage folder, global_step_N, HF folder,
hub id). Test set: `eval.dataset`, a parquet in data_prep's RL schema or a dataset name; a name reuses
the run's own `data/rl_<split>.parquet` when the run trained on it (same prompts as training), else
data_prep writes one into the eval folder. Generation is stages/generate.py's (`eval.backend`: vllm or hf,
the same prompt token ids to either), greedy; one `score()` grades both.
Outputs in eval.output_dir (default outputs/<run>/eval, <run> from --init): metrics.json (METRICS
below, plus tokens_per_second = generated tokens / generation seconds, model loading excluded),
predictions.jsonl, manifest.json; --all_checkpoints adds step_N/, curve.jsonl, best.json + a `best`
link, and plots in outputs/<run>/report.md. Greedy by default, like ladder's GRPO validation.

`eval.samples: k` > 1 samples k completions per problem (eval.temperature, eval.top_p; vLLM's `n`, or k rows of
transformers' sampling seeded with run.seed) and grades each one. METRICS are then over all k x n samples
(`accuracy` = mean single-sample accuracy, the unbiased pass@1; `n` stays the number of problems), and SAMPLED
adds pass@j (j = 1, 2, 4, … and k: Chen et al.'s unbiased estimator 1 - C(k-c, j) / C(k, j) from the k
samples of which c are correct; at j = k it is the share of problems with a correct sample), maj@k (majority
vote over the grader's extracted answers, compared as strings) and the spread of the k single-sample
accuracies (sample j of every problem scored as one run: their std and range). predictions.jsonl then has a
line per sample, with its `sample` number.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd

from stages import generate, report, vllm_engine
from stages.config import stage_dir, write_manifest
from stages.export import resolve_init, run_folder
from stages.generate import Generation

METRICS = {  # the per-test-set numbers, in report order, with what each one means
    "n": "problems evaluated",
    "accuracy": "strict: the answer under the template's marker equals the gold answer (rewards.compute_score acc)",
    "lenient_accuracy": "the last number in the completion equals the gold answer, whatever the format",
    "format_accuracy": "the grader extracted a strict answer (format_ok)",
    "unparsable_rate": "no strict answer extracted (1 - format_accuracy)",
    "trunc_rate": "generation stopped at eval.max_new_tokens (finish reason `length`)",
    "unclosed_rate": "r1: the last <answer> has no </answer> after it; gsm8k: truncated with no `####` "
                     "in the completion; other templates: truncated with no strict answer",
    "avg_gen_len": "mean generated tokens per problem (EOS and stop string included)",
    "p90_gen_len": "90th percentile of generated tokens (numpy linear interpolation)",
}
SAMPLED = {  # with eval.samples = k > 1; pass@j for j = 1, 2, 4, … below k is also there (the same estimator)
    "samples": "completions per problem (eval.samples; 1 = greedy)",
    "pass@k": "share of problems with at least one strict-correct sample among the k (the unbiased estimator "
              "at n = k samples)",
    "maj@k": "share of problems whose most frequent extracted answer (ties: the one seen first) is strict-correct; "
             "samples without an answer do not vote",
    "accuracy_std": "standard deviation (ddof=1) of the k single-sample accuracies (sample j of every problem); "
                    "`accuracy` is their mean",
    "accuracy_min": "lowest of the k single-sample accuracies",
    "accuracy_max": "highest of the k single-sample accuracies",
}
SUMMARY = [*METRICS, "tokens_per_second", "wall_seconds"]  # the end-of-run box


def fail(message: str) -> SystemExit:
    return SystemExit(f"[eval] {message}")


# ---- where the model, the test set and the outputs are
def output_folder(cfg, init: str) -> Path:
    if cfg.eval.get("output_dir"):
        return Path(cfg.eval.output_dir)
    if not cfg.run.name:  # outputs/<run>/eval beside the run's stages; else a run named after the model
        if run_folder(init) is not None:
            return run_folder(init) / "eval"
        cfg.run.name = f"{Path(str(init).rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return stage_dir(cfg, "eval")


def eval_file(cfg, out: Path, run: Path | None) -> Path:
    name, split = str(cfg.eval.dataset), str(cfg.eval.split)
    if name.endswith(".parquet"):
        if not Path(name).exists():
            raise fail(f"eval.dataset={name}: no such file")
        return Path(name)
    prep = run / "data" / "prep.json" if run else None
    if prep and prep.exists() and (run / "data" / f"rl_{split}.parquet").exists():
        made = json.loads(prep.read_text())
        if made.get("dataset") == name and cfg.data.template in (None, made.get("template")):
            return run / "data" / f"rl_{split}.parquet"
    from data_prep import prepare

    data = dict(cfg.data, dataset=name, train_size=None, val_size=0)
    files = prepare(data, out / "data" / name)
    if f"rl_{split}" not in files:
        raise fail(f"eval.dataset={name} has no {split} split (made: {', '.join(files)})")
    return Path(files[f"rl_{split}"])


def load_problems(path: Path, limit) -> pd.DataFrame:
    df = pd.read_parquet(path)
    missing = {"data_source", "prompt", "reward_model"} - set(df.columns)
    if missing or df.empty:
        raise fail(f"{path}: {f'missing column(s) {sorted(missing)}' if missing else 'no rows'} (data_prep's schema)")
    return df.head(int(limit)).reset_index(drop=True) if limit else df


# ---- grading: the same for both backends
def unclosed(template: str | None, g: Generation, graded: dict) -> bool:
    if template == "r1":
        i = g.text.rfind("<answer>")
        return i >= 0 and "</answer>" not in g.text[i:]
    if g.finish_reason != "length":
        return False
    return "####" not in g.text if template == "gsm8k" else not graded["format_ok"]


def score(df: pd.DataFrame, gens: list[Generation], template: str | None) -> tuple[dict, list[dict]]:
    """(metrics, one record per row of `df` and generation, in order); see METRICS for the definitions."""
    import numpy as np

    from rewards import compute_score

    records = []
    for i, (row, g) in enumerate(zip(df.itertuples(), gens)):
        info = dict(row.extra_info) if isinstance(getattr(row, "extra_info", None), dict) else {}
        gold = str(row.reward_model["ground_truth"])
        s = compute_score(row.data_source, g.text, gold, info)
        records.append({"index": info.get("index", i), "question": info.get("question", row.prompt[-1]["content"]),
                        "completion": g.text, "pred": s["pred"], "ground_truth": gold, "correct": bool(s["acc"]),
                        "lenient": bool(s["lenient_acc"]), "format_ok": bool(s["format_ok"]),
                        "unclosed": unclosed(template, g, s), "finish_reason": g.finish_reason, "tokens": g.tokens})
    n, lens = len(records), [r["tokens"] for r in records] or [0]

    def rate(test) -> float:
        return sum(map(test, records)) / max(n, 1)

    return {"n": n, "accuracy": rate(lambda r: r["correct"]), "lenient_accuracy": rate(lambda r: r["lenient"]),
            "format_accuracy": rate(lambda r: r["format_ok"]), "unparsable_rate": rate(lambda r: r["pred"] is None),
            "trunc_rate": rate(lambda r: r["finish_reason"] == "length"),
            "unclosed_rate": rate(lambda r: r["unclosed"]), "avg_gen_len": float(np.mean(lens)),
            "p90_gen_len": float(np.percentile(lens, 90))}, records


# ---- k samples per problem: pass@k, maj@k and the spread of single-sample accuracies
def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(8, 0, 4), pass_at_k(8, 8, 1), pass_at_k(8, 2, 1), round(pass_at_k(8, 2, 4), 4), pass_at_k(4, 1, 4)
    (0.0, 1.0, 0.25, 0.7857, 1.0)
    """
    from math import comb

    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(samples: list[dict]) -> bool:
    """Whether the most frequent extracted answer (`pred`) among a problem's samples is correct; ties go to the
    answer seen first, samples without one do not vote, and no answer at all is wrong.

    >>> majority_correct([{"pred": "3", "correct": False}, {"pred": "4", "correct": True}, {"pred": "4", "correct": True},
    ...                   {"pred": None, "correct": False}])
    True
    """
    votes: dict[str, list[dict]] = {}
    for s in samples:
        if s["pred"] is not None:
            votes.setdefault(s["pred"], []).append(s)
    if not votes:
        return False
    winner = max(votes.values(), key=len)  # max keeps the first of equals, and dicts keep first-seen order
    return bool(winner[0]["correct"])


def sampled_metrics(records: list[dict], k: int) -> dict:
    """SAMPLED from the records of k samples per problem (problem i's at i*k … i*k+k-1)."""
    import numpy as np

    problems = [records[i:i + k] for i in range(0, len(records), k)]
    correct = [sum(s["correct"] for s in p) for p in problems]
    runs = [float(np.mean([p[j]["correct"] for p in problems])) for j in range(k)]  # sample j of every problem
    ks = sorted({2 ** i for i in range(k.bit_length()) if 2 ** i < k} | {k})
    return {"samples": k, **{f"pass@{j}": float(np.mean([pass_at_k(k, c, j) for c in correct])) for j in ks},
            f"maj@{k}": float(np.mean([majority_correct(p) for p in problems])),
            "accuracy_std": float(np.std(runs, ddof=1)), "accuracy_min": min(runs), "accuracy_max": max(runs)}


def sampling(cfg) -> tuple[int, dict | None]:
    """(k, sampling settings or None for greedy) from eval.samples / temperature / top_p, checked."""
    e = cfg.eval
    k = e.get("samples", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise fail(f"eval.samples={k}: a whole number >= 1 (1 = greedy; k > 1: pass@k and maj@k from k samples)")
    if k == 1:
        return 1, None
    temperature, top_p = e.get("temperature", 1.0), e.get("top_p", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise fail(f"eval.temperature={temperature}: must be > 0 with eval.samples={k} (0 would give k copies of "
                   "the greedy answer)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise fail(f"eval.top_p={top_p}: must be in (0, 1]")
    return k, {"temperature": float(temperature), "top_p": float(top_p)}


def how(cfg, engine: str) -> str:
    """How the completions were made, for the report."""
    k, params = sampling(cfg)
    if params is None:
        return f"{engine}, greedy"
    return f"{engine}, {k} samples per problem at temperature {params['temperature']:g}, top_p {params['top_p']:g}"


def definitions(metrics: dict) -> dict[str, str]:
    """METRICS, plus SAMPLED under the run's own k (and its pass@j below k) when it sampled."""
    k = metrics.get("samples", 1)
    if k == 1:
        return METRICS
    below = sorted(int(name[5:]) for name in metrics if name.startswith("pass@") and int(name[5:]) < k)
    return {**METRICS, "samples": SAMPLED["samples"],
            **{f"pass@{j}": f"the chance that {j} of the samples hold a strict-correct one (unbiased estimate from "
                            f"the {k})" for j in below},
            **{name.replace("@k", f"@{k}"): text for name, text in SAMPLED.items() if name != "samples"}}


# ---- the stage
def evaluate(cfg, model: str, tok, df: pd.DataFrame, data: Path, out: Path, engine: str) -> dict:
    """One model on one test set → out/{metrics.json, predictions.jsonl}; returns the metrics."""
    t0 = time.time()
    k, params = sampling(cfg)
    template = generate.template_of(df)
    stops = generate.stops_of(template)
    prompts = generate.prompt_ids(tok, df["prompt"])
    print(f"[eval] {model} on {data} ({len(df)} problems, template {template}, {how(cfg, engine)})", flush=True)
    if params is not None:  # transformers samples from torch's generator (vLLM seeds from run.seed itself)
        import torch

        torch.manual_seed(int(cfg.run.seed))
    gens, seconds = generate.generate(cfg, model, tok, prompts, stops, params, n=k)
    metrics, records = score(df.loc[df.index.repeat(k)].reset_index(drop=True), gens, template)
    if k > 1:
        for j, r in enumerate(records):
            r["sample"] = j % k
        metrics.update(n=len(df), **sampled_metrics(records, k))
    else:
        metrics["samples"] = 1
    tokens = sum(g.tokens for g in gens)
    metrics.update(wall_seconds=round(time.time() - t0, 2), gen_seconds=round(seconds, 2), gen_tokens=tokens,
                   tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
                   max_new_tokens=int(cfg.eval.max_new_tokens), backend=engine, model=model, dataset=str(data),
                   template=template, limit=cfg.eval.limit, **({"sampling": params} if params else {}))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def checkpoints(init: str) -> list[tuple[int, Path]]:
    for folder in (Path(init), Path(init) / "sft"):
        steps = sorted((int(s.name.rsplit("_", 1)[-1]), s) for s in folder.glob("global_step_*") if s.is_dir())
        if steps:
            return steps
    raise fail(f"--all_checkpoints: no global_step_N folders in {init} or {init}/sft (sft.save_freq sets how "
               "often verl saves, sft.keep_ckpts how many it keeps)")


def run(cfg) -> int:
    init = str(cfg.model.init or cfg.model.path)
    out = output_folder(cfg, init)
    if cfg.run.dry_run:
        print(json.dumps({"init": init, "output_dir": str(out), "eval": dict(cfg.eval),
                          # vllm: each engine's CUDA_VISIBLE_DEVICES (null: all of this process's)
                          "vllm_engines": vllm_engine.placements(cfg),
                          "vllm_engines_why": vllm_engine.engines_why(cfg)}, indent=2, default=str))
        return 0
    # ---- everything that can be wrong is found before the first token is generated
    sampling(cfg)
    vllm_engine.check(cfg)
    # vLLM's import (15-23 s) runs while this process imports torch and makes the data and the tokenizer ready
    if vllm_engine.likely_vllm(cfg):
        vllm_engine.prestart(cfg)
    try:
        engine = generate.backend(cfg)
        if engine == "vllm":
            vllm_engine.prestart(cfg)  # the cue missed it (auto, and no driver file seen): start it now
        else:
            vllm_engine.release()  # the cue was wrong (auto: torch sees no GPU)
        return run_on(cfg, init, out, engine)
    finally:
        vllm_engine.release()  # the prestarted child, if the run stopped before it was used


def run_on(cfg, init: str, out: Path, engine: str) -> int:
    try:  # resolve_init checks each folder (config.json, weights, tokenizer); data_prep names bad records
        folders = checkpoints(init) if cfg.eval.all_checkpoints else [(None, init)]
        models = [(step, resolve_init(str(folder))) for step, folder in folders]
        tokenizers = [generate.load_tokenizer(model) for _, model in models]
        data = eval_file(cfg, out, run_folder(init))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise fail(str(err)) from None
    df = load_problems(data, cfg.eval.limit)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(cfg.eval.dataset)).stem)
    if cfg.eval.all_checkpoints:
        return checkpoint_curve(cfg, init, models, tokenizers, df, data, out, engine, name)
    model = models[0][1]
    metrics = evaluate(cfg, model, tokenizers[0], df, data, out, engine)
    write_manifest(out, stage="eval", status="done", init=init, model=model, metrics=metrics,
                   predictions=str(out / "predictions.jsonl"))
    report.add_section(out.parent, f"eval-{name}", f"Evaluation on {name}", f"`{model}` on `{data}` "
                       f"({how(cfg, engine)}):\n\n{report.metrics_table(metrics, definitions(metrics))}")
    if cfg.eval.console == "line":  # a stage that evaluates on the way (the demo's before-SFT look) says one line
        print(f"[eval] {name}: {Path(model).name}: " + ", ".join(
            f"{k} {metrics[k]:.4g}" for k in ("n", "accuracy", "format_accuracy", "trunc_rate", "wall_seconds")))
    else:
        print(report.console(metrics, summary(metrics), f"{name}: {Path(model).name}"))
    return 0


def summary(metrics: dict) -> list[str]:
    """The end-of-run box's keys: SUMMARY, and pass@k / maj@k / the spread when the run sampled."""
    k = metrics.get("samples", 1)
    return SUMMARY if k == 1 else [*SUMMARY[:2], f"pass@{k}", f"maj@{k}", "accuracy_std", *SUMMARY[2:]]


def checkpoint_curve(cfg, init, models, tokenizers, df, data, out: Path, engine: str, name: str) -> int:
    """--all_checkpoints: out/step_N/ per checkpoint, curve.jsonl, best.json + `best` link, plots."""
    rows = []
    for (step, model), tok in zip(models, tokenizers):
        done = out / f"step_{step}" / "metrics.json"  # a rerun after a crash skips finished steps
        old = json.loads(done.read_text()) if done.exists() else {}
        same = [old.get(k) for k in ("dataset", "n", "model", "max_new_tokens", "sampling")] + [old.get("samples", 1)] \
            == [str(data), len(df), model, int(cfg.eval.max_new_tokens), sampling(cfg)[1], sampling(cfg)[0]]
        metrics = old if same else evaluate(cfg, model, tok, df, data, out / f"step_{step}", engine)
        rows.append({"step": step, **metrics})
        print(report.console(metrics, summary(metrics), f"{name}: step {step}"))
        (out / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows, key=lambda r: r["accuracy"])  # the earliest step among equals
    (out / "best.json").write_text(json.dumps({k: best[k] for k in ("step", "accuracy", "model")}, indent=2) + "\n")
    (out / "best").unlink(missing_ok=True)
    (out / "best").symlink_to(f"step_{best['step']}", target_is_directory=True)
    figures = report.plot_vs_step(rows, {"accuracy": "strict accuracy", "format_accuracy": "format accuracy",
                                         "trunc_rate": "truncation rate", "avg_gen_len": "mean generated tokens"},
                                  out.parent / "report" / "figures", prefix=f"eval-{name}")
    table = report.table(["step", *METRICS], [[r["step"], *(r[k] for k in METRICS)] for r in rows])
    report.add_section(out.parent, f"eval-{name}-curve", f"Evaluation on {name} over checkpoints",
                       f"Every checkpoint of `{init}` on `{data}` ({how(cfg, engine)}); best: step {best['step']} "
                       f"(`eval/best.json`).\n\n{table}\n\nBest step:\n\n{report.metrics_table(best, definitions(best))}",
                       figures)
    write_manifest(out, stage="eval", status="done", init=init, all_checkpoints=True, best_step=best["step"],
                   best_model=best["model"], curve=str(out / "curve.jsonl"), metrics=best)
    return 0
