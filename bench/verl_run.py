"""One verl variant of the SFT bench: ladder's SFT command, timed from verl's own metrics file.

The command is the one `./train.sh --stage sft` would run (stages.sft builds it from config.yaml plus
the variant's overrides, and a constant lr so that losses compare step by step), stopped once warmup +
steps are logged (no final checkpoint). tokens/s = tokens of the measured steps / wall time between their
lines in verl's JSONL metrics file: everything a real run pays per step (data loading, optimizer,
logging) is in it; "steady" divides by the median step instead (a one-off stall, such as a kernel
compiled for a new shape, moves only the mean). Memory: verl's own `perf/max_memory_*` metrics, and
nvidia-smi's peak (SmiPeak). `--profile` traces two more steps with verl's torch profiler and puts
bench/trace_summary.py's breakdown in the result.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench import REPO, trace_summary
from bench.variants import slug
# ladder's stage API, all of what this file uses of it
from stages.config import load_config, stage_dir
from stages.launch import environment, torchrun_command
from stages.sft import trainer_keys

PROFILED = 2  # steps traced after the timed ones (the gap between them is the loop outside verl's step)


def total_steps(v) -> int:
    """Steps the trainer runs: a profiled run traces steps W+S+1.. and one more step follows, so the run
    never ends (and saves) mid-trace."""
    return v.warmup + v.steps + (PROFILED + 1 if v.profile else 0)


def profile_dir(v, work: Path) -> Path:
    return work / "profile" / slug(v.name)


def variant_overrides(v, model: Path, parquet: Path, work: Path, device: str) -> list[str]:
    """The variant's flags as ladder's config overrides (what `./train.sh` takes)."""
    o = [f"model.path={model}", f"data.train_file={parquet}", f"run.output_dir={work / 'runs'}",
         f"run.name={slug(v.name)}", f"launch.device={device}",
         f"trainer.total_training_steps={total_steps(v)}", "sft.epochs=100", "sft.save_freq=-1",
         # a constant lr: variants of different lengths see the same lr at step k, so losses compare
         "sft.warmup_ratio=0", "sft.verl.optim.lr_scheduler_type=constant"]
    # the stage adds the verl keys for these (stages/launch.py kernels()), as it does for config.yaml's defaults
    if not v.shipped:
        o += [f"model.attn_implementation={v.attn}", f"model.liger={str(v.liger).lower()}", f"model.fused_ce={v.fused_ce}"]
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


def launch(v, model: Path, parquet: Path, work: Path, device: str) -> tuple[list[str], dict[str, str], Path]:
    """(command, environment, stage folder) of ladder's SFT stage for this variant, from empty folders."""
    cfg = load_config("sft", variant_overrides(v, model, parquet, work, device))
    out = stage_dir(cfg, "sft")
    shutil.rmtree(out, ignore_errors=True)  # never resume from an earlier bench run
    shutil.rmtree(profile_dir(v, work), ignore_errors=True)
    cmd = torchrun_command(cfg, "verl.trainer.sft_trainer", trainer_keys(cfg, out, str(parquet), None) + v.verl, out)
    env = environment(cfg, out)
    env.update(item.split("=", 1) for item in v.env)  # NAME=VALUE, checked by variants.expand()
    return cmd, env, out


# ---- the timed run
def run_verl(v, model: Path, parquet: Path, work: Path, device: str, time_left: float) -> dict:
    """Run the variant until warmup + steps are logged (and a profiled one's trace is written), then stop it."""
    cmd, env, out = launch(v, model, parquet, work, device)
    metrics_file, log = Path(env["VERL_FILE_LOGGER_PATH"]), out / "bench.log"
    print(f"[bench]   {shlex.join(cmd)}", flush=True)
    smi = SmiPeak(device)
    t0 = time.time()
    seen: list[tuple[float, dict]] = []  # (when the line appeared, the step's metrics)
    status, offset, trace = "timeout", 0, None
    timed = v.warmup + v.steps
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while time.time() - t0 < time_left:
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
        path, events = trace
        result.update(trace=str(path), profile=trace_summary.summarize(events))
    for key in ("allocated", "reserved"):
        result[f"peak_{key}_gib"] = max((m.get(f"perf/max_memory_{key}_gb", 0) for _, m in seen), default=None)
    if status != "ok":
        result["log_tail"] = log.read_text()[-3000:]
    return result


def finished_trace(folder: Path):
    """(path, events) of the trace verl's profiler wrote into folder, once it is whole; else None."""
    for path in sorted(folder.glob("*.json*")):
        size = path.stat().st_size
        time.sleep(1)  # still being written if it grows
        if path.stat().st_size == size:
            try:
                return path, trace_summary.load(str(path))
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
