"""SFT tokens/s on one GPU: ladder's SFT stage (verl's trainer) under speed levers, against a hand loop.

Run from the repository root:
    # GPU host (bundle installed, PYTHONPATH=/tmp/site): one call sweeping the levers, under 8 minutes
    python -m bench.sft_throughput --gsm8k .gpu-data/raw/train.jsonl --out $OUT/sft_speed.json \
        --budget_s 480 --sweep hand "--fused_ce triton --liger --no_grad_ckpt --max_tokens 8192" \
        "--attn sdpa --unpacked --warmup 1 --steps 2" "--shape 0.5b --fused_ce triton --liger --no_grad_ckpt"
    # one variant, plus the hand loop on the same data
    python -m bench.sft_throughput --shape 0.5b --fused_ce triton --liger --with_hand
    # CPU smoke test of this script (tiny model, about a minute)
    python -m bench.sft_throughput --device cpu --shape tiny --steps 2 --with_hand

`--sweep` comes last: each following argument is one variant, a quoted string of the variant flags
(`hand` alone is the hand loop); the flags before `--sweep` are every variant's defaults
(bench/variants.py). Every variant runs in its own process, in the order given, each only if the time
budget (`--budget_s`) still allows it; results are written to `--out` after each one.
  1. Models and data (bench/workload.py): random weights of the published Qwen2.5-0.5B / 1.5B shapes
     with a tokenizer trained on the data; GSM8K train rows through ladder's data_prep into one SFT
     parquet. No hub.
  2. verl variants (bench/verl_run.py): the command `./train.sh --stage sft` would run, with a constant
     lr, stopped once warmup + steps are logged; tokens/s from the lines of verl's JSONL metrics file
     ("steady": by the median step), memory from verl's metrics and nvidia-smi's peak.
  3. `--hand` (bench/hand_loop.py): a hand-written loop on the same rows: padded batches of 12, fp32
     weights with bf16 autocast, SDPA, gradient checkpointing, AdamW.
MFU = 6 · parameters · tokens/s / 989 TFLOP/s (H100 bf16 dense; LoRA does fewer FLOPs than 6N).
"max |Δloss| vs ref": against the first unpacked (else sdpa) run of the same shape and batch size, over
the steps both ran (same rows, same initial weights, constant lr).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import transformers

from bench import REPO, trace_summary, workload
from bench.hand_loop import hand_loop
from bench.variants import expand, slug, split_sweep, variant_parser
from bench.verl_run import SmiPeak, run_verl, total_steps

PEAK_FLOPS = 989e12


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[variant_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", nargs="*", default=None, metavar="FLAGS",
                   help="last on the line: variants, each one quoted string of the flags above ('hand' for "
                        "the hand loop); the flags before --sweep are their defaults")
    p.add_argument("--with_hand", action="store_true", help="without --sweep: also run the hand loop")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gsm8k", default=None, help="a GSM8K train.jsonl (question/answer per line)")
    p.add_argument("--workdir", default="/tmp/ladder_sft_bench")
    p.add_argument("--out", default=None, help="results JSON (default WORKDIR/results.json)")
    p.add_argument("--budget_s", type=float, default=510,
                   help="seconds for the whole sweep: no variant starts or runs on past it")
    p.add_argument("--timeout_s", type=float, default=240, help="seconds for one variant")
    p.add_argument("--hand_batch", type=int, default=12)
    p.add_argument("--_worker", choices=["build", "hand"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return p


def main() -> int:
    before, sweep = split_sweep(sys.argv[1:])
    args = main_parser().parse_args(before)
    args.sweep = sweep
    work = Path(args.workdir).resolve()
    args.workdir = str(work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args._worker:  # a child of worker(): the parquet is already made
        parquet = Path(json.loads((work / "data.json").read_text())["parquet"])
        model = work / "models" / args.shape
        if args._worker == "build":
            result = {"status": "ok", "parameters": workload.build_model(args.shape, parquet, model, args.device)}
        else:
            result = hand_loop(args, model, parquet, args.device, args.hand_batch)
        Path(args._result).write_text(json.dumps(result))
        return 0

    t0 = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally:` blocks (stop the trainer) on kill
    if args.device == "cpu" and args.batch_size is None:  # the CPU run checks the script, not the speed
        args.batch_size = 16
    todo = expand(args)
    default_batch = workload.default_batch_size()
    # one epoch holds every step a variant runs (an epoch boundary costs a data loader restart)
    rows = max(max((total_steps(v) + 1) * (v.batch_size or default_batch),
                   (v.warmup + v.steps) * args.hand_batch) for v in todo)
    parquet = workload.sft_parquet(args.gsm8k, work, rows)
    (work / "data.json").write_text(json.dumps({"parquet": str(parquet)}))
    out = Path(args.out or work / "results.json")
    meta = environment_info(args, rows, parquet)
    results, params = [], {}
    for v in todo:
        left = args.budget_s - (time.time() - t0)
        if v.shape not in params and left >= 30:  # once per shape, in a child so no GPU memory stays here
            built = worker("build", v, args, left)
            params[v.shape] = built.get("parameters")
            if not params[v.shape]:
                print(f"[bench] building the {v.shape} model failed:\n{built.get('log_tail')}", file=sys.stderr)
            left = args.budget_s - (time.time() - t0)
        if left < 30 or not params.get(v.shape):
            results.append({"name": v.name, "kind": "hand" if v.hand else "verl", "shape": v.shape,
                            "status": "skipped (budget)" if left < 30 else "skipped (no model)"})
            continue
        model = work / "models" / v.shape
        print(f"[bench] {v.name}", flush=True)
        if v.hand:
            r = worker("hand", v, args, left)
        else:
            r = run_verl(v, model, parquet, work, args.device, min(args.timeout_s, left))
        results.append(with_mfu(r, params[v.shape]))
        print(f"[bench] {r['name']}: {r['status']}, {r.get('tokens_per_s') or 0:,.0f} tokens/s, "
              f"losses {r.get('losses')}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": {**meta, "parameters": params}, "results": results}, indent=1))
    print(table(results))
    for r in results:
        if r.get("profile"):
            print(f"\n[bench] profile of {r['name']} ({r['trace']}):\n{trace_summary.render(r['profile'])}")
    print(f"[bench] {time.time() - t0:.0f} s; results in {out}")
    return 0 if all(r["status"] in ("ok", "skipped (budget)") for r in results) else 1


def worker(kind: str, v, args, time_left: float) -> dict:
    """Run this script again as `--_worker kind` (model build or hand loop): its own process and GPU memory."""
    result_file = Path(args.workdir) / f"{kind}-{slug(v.name)}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.sft_throughput", "--_worker", kind, "--_result", str(result_file),
           "--device", args.device, "--shape", v.shape, "--steps", str(v.steps), "--warmup", str(v.warmup),
           "--name", v.name, "--hand_batch", str(args.hand_batch), "--workdir", args.workdir]
    smi = SmiPeak(args.device if kind == "hand" else "cpu")
    t0 = time.time()
    try:  # from the repository root, so that `bench` and `stages` are this checkout's
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=min(args.timeout_s, time_left))
        ok = proc.returncode == 0 and result_file.exists()
        result = json.loads(result_file.read_text()) if ok else {
            "status": f"exited {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    except subprocess.TimeoutExpired:
        result = {"status": "timeout"}
    result = {"name": v.name, "kind": kind, "shape": v.shape, **result}
    result.update(wall_s=round(time.time() - t0, 1), peak_smi_gib=smi.done())
    return result


def with_mfu(result: dict, params: int) -> dict:
    """The result with `mfu_6n` (6 · parameters · tokens/s over PEAK_FLOPS) when it has a tokens/s."""
    if result.get("tokens_per_s"):
        result["mfu_6n"] = 6 * params * result["tokens_per_s"] / PEAK_FLOPS
    return result


def environment_info(args, rows: int, parquet: Path) -> dict:
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
            "parquet": str(parquet), "argv": sys.argv[1:], "device": args.device}
    if args.device == "cuda" and shutil.which("nvidia-smi"):
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    try:
        from torch.nn.attention import varlen

        info["varlen_attn"] = str(inspect.signature(varlen.varlen_attn))
    except ImportError:
        info["varlen_attn"] = None
    info["rows_in_parquet"] = len(pd.read_parquet(parquet))
    return info


# ---- report
def table(results: list[dict]) -> str:
    hand = {r["shape"]: r["tokens_per_s"] for r in results if r["kind"] == "hand" and r.get("tokens_per_s")}
    # the loss reference: the first unpacked (else sdpa) verl run of the same shape and batch (same rows per step)
    refs = {}
    for r in sorted(results, key=lambda r: "unpacked" not in r["name"]):
        if r.get("reference") and r.get("losses"):
            refs.setdefault((r["shape"], r.get("batch_size")), r)
    head = ["variant", "tokens/s", "steady tok/s", "x hand", "MFU 6N", "verl MFU", "alloc GiB", "smi GiB", "loss first→last",
            "max |Δloss| vs ref", "startup s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        tps = r.get("tokens_per_s")
        ratio = f"{tps / hand[r['shape']]:.2f}" if tps and r["shape"] in hand else ""
        losses = r.get("losses") or []
        steady = r.get("steady_tokens_per_s")
        cells = [r["name"], f"{tps:,.0f}" if tps else "", f"{steady:,.0f}" if steady else "", ratio, fmt(r.get("mfu_6n"), "{:.1%}"),
                 fmt(r.get("verl_mfu"), "{:.1%}"), fmt(r.get("peak_allocated_gib"), "{:.1f}"),
                 fmt(r.get("peak_smi_gib"), "{:.1f}"), f"{losses[0]} → {losses[-1]}" if losses else "",
                 loss_gap(r, refs.get((r["shape"], r.get("batch_size")))),
                 fmt(r.get("startup_s"), "{:.0f}"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_gap(r: dict, ref: dict | None) -> str:
    """Largest loss difference over the steps both ran (same rows, same init, same lr), and how many."""
    if ref is None or ref is r or r["kind"] != "verl" or not r.get("losses"):
        return ""
    pairs = list(zip(r["losses"], ref["losses"]))
    return f"{max(abs(a - b) for a, b in pairs):.3f} ({len(pairs)} steps)"


def fmt(value, pattern: str) -> str:
    return pattern.format(value) if value is not None else ""


if __name__ == "__main__":
    sys.exit(main())
