"""Eval stage: greedy decoding of a model on a test set, graded by `rewards.compute_score`.

    ./train.sh --stage eval --init outputs/<run>/sft                 # one GPU (vLLM when installed)
    ./train.sh --stage eval --init outputs/<run>/sft eval.tensor_parallel_size=4   # one model on 4 GPUs
    ./train.sh --stage eval --init outputs/<run>/sft --all_checkpoints            # every global_step_N
    ./train.sh --stage eval --init Qwen/Qwen2.5-0.5B --backend hf --limit 100 eval.dataset=math500

`--init` (`model.init`): anything `stages.export.resolve_init` accepts (run/stage folder, global_step_N, HF folder,
hub id). Test set: `eval.dataset`, a parquet in data_prep's RL schema or a dataset name; a name reuses
the run's own `data/rl_<split>.parquet` when the run trained on it (same prompts as training), else
data_prep writes one into the eval folder. Generation is stages/generate.py's (`eval.backend`: vllm or hf,
the same prompt token ids to either), greedy; one `score()` grades both.
Outputs in eval.output_dir (default outputs/<run>/eval, <run> from --init): metrics.json (METRICS
below, plus tokens_per_second = generated tokens / generation seconds, model loading excluded),
predictions.jsonl, manifest.json; --all_checkpoints adds step_N/, curve.jsonl, best.json + a `best`
link, and plots in outputs/<run>/report.md. Unlike verl's validation (the rollout's sampling), greedy.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd

from stages import generate, report
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
    """(metrics, one record per problem in dataset order); see METRICS for the definitions."""
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


# ---- the stage
def evaluate(cfg, model: str, tok, df: pd.DataFrame, data: Path, out: Path, engine: str) -> dict:
    """One model on one test set → out/{metrics.json, predictions.jsonl}; returns the metrics."""
    t0 = time.time()
    template = generate.template_of(df)
    stops = generate.stops_of(template)
    prompts = generate.prompt_ids(tok, df["prompt"])
    print(f"[eval] {model} on {data} ({len(df)} problems, template {template}, backend {engine})", flush=True)
    gens, seconds = generate.generate(cfg, model, tok, prompts, stops)
    metrics, records = score(df, gens, template)
    tokens = sum(g.tokens for g in gens)
    metrics.update(wall_seconds=round(time.time() - t0, 2), gen_seconds=round(seconds, 2), gen_tokens=tokens,
                   tokens_per_second=round(tokens / max(seconds, 1e-9), 1),
                   max_new_tokens=int(cfg.eval.max_new_tokens), backend=engine, model=model, dataset=str(data),
                   template=template, limit=cfg.eval.limit)
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
        print(json.dumps({"init": init, "output_dir": str(out), "eval": dict(cfg.eval)}, indent=2, default=str))
        return 0
    # ---- everything that can be wrong is found before the first token is generated
    engine = generate.backend(cfg)
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
                       f"({engine}, greedy):\n\n{report.metrics_table(metrics, METRICS)}")
    print(report.console(metrics, SUMMARY, f"{name}: {Path(model).name}"))
    return 0


def checkpoint_curve(cfg, init, models, tokenizers, df, data, out: Path, engine: str, name: str) -> int:
    """--all_checkpoints: out/step_N/ per checkpoint, curve.jsonl, best.json + `best` link, plots."""
    rows = []
    for (step, model), tok in zip(models, tokenizers):
        done = out / f"step_{step}" / "metrics.json"  # a rerun after a crash skips finished steps
        old = json.loads(done.read_text()) if done.exists() else {}
        same = [old.get(k) for k in ("dataset", "n", "model", "max_new_tokens")] == \
            [str(data), len(df), model, int(cfg.eval.max_new_tokens)]
        metrics = old if same else evaluate(cfg, model, tok, df, data, out / f"step_{step}", engine)
        rows.append({"step": step, **metrics})
        print(report.console(metrics, SUMMARY, f"{name}: step {step}"))
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
                       f"Every checkpoint of `{init}` on `{data}` ({engine}, greedy); best: step {best['step']} "
                       f"(`eval/best.json`).\n\n{table}\n\nBest step:\n\n{report.metrics_table(best, METRICS)}",
                       figures)
    write_manifest(out, stage="eval", status="done", init=init, all_checkpoints=True, best_step=best["step"],
                   best_model=best["model"], curve=str(out / "curve.jsonl"), metrics=best)
    return 0
