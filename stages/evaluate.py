"""Eval stage: greedy decoding of a model on a test set, graded by `rewards.compute_score`.

    ./train.sh --stage eval --init outputs/<run>/sft                 # one GPU (vLLM when installed)
    ./train.sh --stage eval --init outputs/<run>/sft eval.tensor_parallel_size=4   # one model on 4 GPUs
    ./train.sh --stage eval --init outputs/<run>/sft --all_checkpoints            # every global_step_N
    ./train.sh --stage eval --init Qwen/Qwen2.5-0.5B --backend hf --limit 100 eval.dataset=math500

`--init` is anything `stages.export.resolve_init` accepts (run or stage folder, global_step_N, HF
folder, hub id). The test set is `eval.dataset`: a parquet in data_prep's RL schema, or a dataset name;
a name reuses the run's own `data/rl_<split>.parquet` when that run was trained on it (same prompt
template as training), else data_prep writes one into the eval folder. Prompts are the parquet's
chat turns through the tokenizer's chat template (add_generation_prompt), tokenized once and handed
as token ids to either backend: `vllm` (auto when importable and a GPU is present) or `hf`
(transformers `generate`: greedy, batched longest-first with left padding and the KV cache; with
eval.batch_size null the batch starts at 256 on GPU and halves on CUDA OOM). Both stop at the
template's stop strings (r1: `</answer>`, kept in the completion so the grader sees it), at EOS, or at
eval.max_new_tokens. Outputs in eval.output_dir (default outputs/<run>/eval, <run> taken from --init):
metrics.json, predictions.jsonl, manifest.json; with --all_checkpoints, step_N/ per checkpoint,
curve.jsonl, best.json + a `best` link, and plots in outputs/<run>/report.md (stages/report.py).
Departures from verl: none in decoding; verl's validation samples with its rollout settings instead.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages import report
from stages.common import stage_dir, write_manifest

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


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (hit max_new_tokens)
    tokens: int


def fail(message: str) -> SystemExit:
    return SystemExit(f"[eval] {message}")


# ---- where the model, the test set and the outputs are
def run_folder(init: str | None) -> Path | None:
    """outputs/<run> when --init lies inside a run folder (a folder holding sft/, ei/ or grpo/)."""
    if not init:
        return None
    p = Path(init).expanduser().resolve()
    for q in [p, *p.parents][:4]:
        if any((q / s / "manifest.json").exists() or any((q / s).glob("global_step_*"))
               for s in ("sft", "ei", "grpo")):
            return q
    return None


def output_folder(cfg, init: str | None) -> Path:
    if cfg.eval.get("output_dir"):
        return Path(cfg.eval.output_dir)
    run = run_folder(init)
    if run is not None and not cfg.run.name:
        return run / "eval"
    if not cfg.run.name and init:
        cfg.run.name = f"{Path(str(init).rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return stage_dir(cfg, "eval")


def test_file(cfg, out: Path, run: Path | None) -> Path:
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
    if missing:
        raise fail(f"{path}: missing column(s) {sorted(missing)}; make it with data_prep (RL schema)")
    return df.head(int(limit)).reset_index(drop=True) if limit else df


def template_of(df: pd.DataFrame) -> str | None:
    """The data_prep template whose instruction ends the prompts (None: a prompt of the user's own)."""
    from data_prep.templates import TEMPLATES

    last = str(df["prompt"].iloc[0][-1]["content"]) if len(df) else ""
    return next((name for name, t in TEMPLATES.items() if last.rstrip().endswith(t.instruction)), None)


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as err:
        raise fail(f"{model}: the tokenizer does not load ({err})") from None
    if not tok.chat_template:
        raise fail(f"{model}: the tokenizer has no chat template; copy the base model's tokenizer_config.json "
                   "(or chat_template.jinja) next to the weights")
    return tok


# ---- generation: both backends take the same prompt token ids and return Generations
def first_stop(text: str, stops) -> int | None:
    """End of the earliest stop string in text, or None."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None


def vllm_generate(model: str, prompts: list[list[int]], cfg, stops: tuple[str, ...]) -> list[Generation]:
    from vllm import LLM, SamplingParams

    e = cfg.eval
    llm = LLM(model=model, max_model_len=int(e.max_model_len), gpu_memory_utilization=float(e.gpu_memory_utilization),
              tensor_parallel_size=int(e.tensor_parallel_size), dtype=str(e.dtype), seed=int(cfg.run.seed))
    params = SamplingParams(temperature=0, max_tokens=int(e.max_new_tokens), stop=list(stops),
                            include_stop_str_in_output=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    del llm
    gc.collect()  # --all_checkpoints builds one engine per step: let the last one's memory go
    return [Generation(o.outputs[0].text[: first_stop(o.outputs[0].text, stops)],
                       "length" if o.outputs[0].finish_reason == "length" else "stop",
                       len(o.outputs[0].token_ids)) for o in outs]


def finish(tok, ids: list[int], eos: set[int], stops) -> Generation:
    """One row of generate()'s output: cut at EOS or the first stop string (kept), count its tokens."""
    end = next((k + 1 for k, t in enumerate(ids) if t in eos), None)
    ids = ids[:end] if end else ids
    text = tok.decode(ids, skip_special_tokens=True)
    cut = first_stop(text, stops)
    if cut is None:
        return Generation(text, "stop" if end else "length", len(ids))
    lo, hi = 1, len(ids)  # fewest tokens whose text already holds the stop string
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if first_stop(tok.decode(ids[:mid], skip_special_tokens=True), stops) else (mid + 1, hi)
    return Generation(text[:cut], "stop", lo)


def hf_generate(model: str, tok, prompts: list[list[int]], cfg, stops: tuple[str, ...]) -> list[Generation]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available() and cfg.launch.device != "cpu"
    dtype = getattr(torch, str(cfg.eval.dtype)) if cuda else torch.float32
    net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to("cuda" if cuda else "cpu").eval()
    eos = net.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: OOM shows early
    size, fixed = int(cfg.eval.batch_size or (256 if cuda else 32)), bool(cfg.eval.batch_size)
    out: list[Generation | None] = [None] * len(prompts)
    done = 0
    with tqdm(total=len(prompts), desc="eval", unit="problem") as bar:
        while done < len(order):
            batch = [prompts[i] for i in order[done: done + size]]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=net.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=net.device)
            try:
                with torch.inference_mode():
                    gen = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(cfg.eval.max_new_tokens),
                                       do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                                       pad_token_id=pad, eos_token_id=sorted(eos), stop_strings=list(stops) or None,
                                       tokenizer=tok)
            except torch.OutOfMemoryError:
                if fixed or size == 1:
                    raise fail(f"CUDA out of memory at eval.batch_size={size}; lower it (null = find one)") from None
                size //= 2
                torch.cuda.empty_cache()
                bar.write(f"[eval] CUDA out of memory: batch size now {size}")
                continue
            for k, row in enumerate(gen[:, width:].tolist()):
                out[order[done + k]] = finish(tok, row, eos, stops)
            done += len(batch)
            bar.update(len(batch))
    del net
    return out


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
    n = len(records)

    def rate(pred) -> float:
        return sum(map(pred, records)) / n if n else 0.0

    lens = [r["tokens"] for r in records] or [0]
    return {"n": n, "accuracy": rate(lambda r: r["correct"]), "lenient_accuracy": rate(lambda r: r["lenient"]),
            "format_accuracy": rate(lambda r: r["format_ok"]), "unparsable_rate": rate(lambda r: r["pred"] is None),
            "trunc_rate": rate(lambda r: r["finish_reason"] == "length"), "unclosed_rate": rate(lambda r: r["unclosed"]),
            "avg_gen_len": float(np.mean(lens)), "p90_gen_len": float(np.percentile(lens, 90))}, records


# ---- the stage
def backend(cfg) -> str:
    name = str(cfg.eval.backend)
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "auto":
        import torch

        return "vllm" if has_vllm and torch.cuda.is_available() and cfg.launch.device != "cpu" else "hf"
    if name == "vllm" and not has_vllm:
        raise fail("eval.backend=vllm but vllm is not installed (pip install -e '.[gpu]'), or use --backend hf")
    if name not in ("hf", "vllm"):
        raise fail(f"eval.backend={name!r}: use auto, vllm or hf")
    return name


def resolve(init: str) -> str:
    from stages.export import resolve_init

    try:
        return resolve_init(init)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise fail(str(err)) from None


def evaluate(cfg, model: str, tok, df: pd.DataFrame, data: Path, out: Path, engine: str) -> dict:
    """One model on one test set → out/{metrics.json, predictions.jsonl}; returns the metrics."""
    from data_prep.templates import TEMPLATES

    t0 = time.time()
    template = template_of(df)
    stops = TEMPLATES[template].stop if template else ()
    prompts = [tok(tok.apply_chat_template([dict(m) for m in p], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for p in df["prompt"]]
    if engine == "vllm" and max(map(len, prompts)) + int(cfg.eval.max_new_tokens) > int(cfg.eval.max_model_len):
        raise fail(f"longest prompt ({max(map(len, prompts))} tokens) + eval.max_new_tokens exceeds eval.max_model_len")
    print(f"[eval] {model} on {data} ({len(df)} problems, template {template}, backend {engine})", flush=True)
    gens = (vllm_generate(model, prompts, cfg, stops) if engine == "vllm"
            else hf_generate(model, tok, prompts, cfg, stops))
    metrics, records = score(df, gens, template)
    tokens = sum(g.tokens for g in gens)
    seconds = time.time() - t0
    metrics.update(wall_seconds=round(seconds, 2), gen_tokens=tokens, tokens_per_second=round(tokens / seconds, 1),
                   max_new_tokens=int(cfg.eval.max_new_tokens), backend=engine, model=model, dataset=str(data),
                   template=template, limit=cfg.eval.limit)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary(metrics: dict, title: str) -> str:
    lines = [f"{k:<18}{metrics[k]:>10.4f}" if isinstance(metrics[k], float) else f"{k:<18}{metrics[k]:>10}"
             for k in [*METRICS, "tokens_per_second", "wall_seconds"]]
    bar = "-" * 28
    return "\n".join([bar, title[-28:], bar, *lines, bar])


def checkpoints(init: str) -> list[tuple[int, Path]]:
    p = Path(init)
    for folder in (p, p / "sft"):
        steps = sorted((int(s.name.rsplit("_", 1)[-1]), s) for s in folder.glob("global_step_*") if s.is_dir())
        if steps:
            return steps
    raise fail(f"--all_checkpoints: no global_step_N folders in {p} or {p / 'sft'} (sft.save_freq sets how often "
               "verl saves, sft.keep_ckpts how many it keeps)")


def run(cfg, args) -> int:
    init = getattr(args, "init", None) or str(cfg.model.path)
    out, run_dir = output_folder(cfg, init), run_folder(init)
    curve = bool(cfg.eval.all_checkpoints or getattr(args, "all_checkpoints", False))
    if getattr(args, "dry_run", False):
        print(json.dumps({"init": init, "output_dir": str(out), "all_checkpoints": curve,
                          "eval": {k: cfg.eval[k] for k in cfg.eval}}, indent=2, default=str))
        return 0
    # ---- everything that can be wrong is found before the first token is generated
    engine = backend(cfg)
    models = [(step, resolve(str(path))) for step, path in checkpoints(init)] if curve else [(None, resolve(init))]
    tok = load_tokenizer(models[0][1])
    for _, model in models[1:]:
        load_tokenizer(model)
    data = test_file(cfg, out, run_dir)
    df = load_problems(data, cfg.eval.limit)
    if not curve:
        metrics = evaluate(cfg, models[0][1], tok, df, data, out, engine)
        write_manifest(out, stage="eval", status="done", init=init, model=models[0][1], metrics=metrics,
                       predictions=str(out / "predictions.jsonl"))
        report.add_section(out.parent, "eval", "Evaluation", report.metrics_table(metrics, METRICS))
        print(summary(metrics, f"{Path(models[0][1]).name} {Path(str(data)).name}"))
        return 0
    # ---- --all_checkpoints: one folder per step, a curve, the best step and plots
    rows = []
    for step, model in models:
        folder = out / f"step_{step}"
        done = folder / "metrics.json"
        old = json.loads(done.read_text()) if done.exists() else {}
        same = old.get("dataset") == str(data) and old.get("n") == len(df) and old.get("model") == model and \
            old.get("max_new_tokens") == int(cfg.eval.max_new_tokens)
        metrics = old if same else evaluate(cfg, model, load_tokenizer(model), df, data, folder, engine)
        rows.append({"step": step, **metrics})
        print(summary(metrics, f"step {step}"))
        (out / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows, key=lambda r: r["accuracy"])  # the earliest step among equals
    (out / "best.json").write_text(json.dumps({"step": best["step"], "accuracy": best["accuracy"],
                                               "model": best["model"], "folder": f"step_{best['step']}"}, indent=2) + "\n")
    link = out / "best"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"step_{best['step']}", target_is_directory=True)
    figures = report.plot_vs_step(rows, {"accuracy": "strict accuracy", "format_accuracy": "format accuracy",
                                         "trunc_rate": "truncation rate", "avg_gen_len": "mean generated tokens"},
                                  out.parent / "report" / "figures", prefix="eval")
    table = report.table(["step", *METRICS], [[r["step"], *(r[k] for k in METRICS)] for r in rows])
    text = (f"Every checkpoint of `{init}` on `{data}`; best: step {best['step']} (`eval/best.json`).\n\n"
            f"{table}\n\nBest step:\n\n{report.metrics_table(best, METRICS)}")
    report.add_section(out.parent, "eval", "Evaluation over checkpoints", text, figures)
    write_manifest(out, stage="eval", status="done", init=init, all_checkpoints=True, best_step=best["step"],
                   best_model=best["model"], curve=str(out / "curve.jsonl"), metrics=best)
    return 0
