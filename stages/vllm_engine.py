"""vLLM for ladder's generation (stages/generate.py's `vllm` backend): the engine arguments ladder sets from its config,
and the child processes the engines run in.

    check(cfg)                                     # eval.cuda_graphs, eval.engine_kwargs, eval.engines: named errors
    rows, seconds = vllm_generate(model, prompt_ids, cfg, stops, sampling, n, stop_ids)   # (text, reason, tokens)
    prestart(cfg) / prestart_before_training(cfg)  # the engines' processes import vLLM while this one works

Engine arguments: max_model_len is the longest prompt + eval.max_new_tokens unless eval.max_model_len is set;
eval.cuda_graphs picks eager mode, CUDA graphs of the decode steps, or vLLM's compiled default; eval.engine_kwargs adds
or overrides any other engine argument; eval.engines runs several engines at once, each an interleaved share of the
prompts (placements: one per group of eval.tensor_parallel_size GPUs, engines beyond them sharing a GPU with a share of
its memory and a KV cache sized for their sequences); auto, the default, is one per GPU group, two on a lone GPU
for a small model (auto_engines).
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.config import REPO


class VllmError(SystemExit):
    """A problem with vLLM's settings or its engines, told in one line (no traceback)."""

    def __init__(self, message: str):
        super().__init__(f"[vllm] {message}")


def gpu_present() -> bool:
    """An NVIDIA driver on this machine, seen without importing torch (a cue, not a promise of a usable GPU)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def pick(cfg, gpu: bool) -> tuple[str, bool]:
    """(eval.backend with auto decided, whether vllm imports): auto is vllm when it imports, `gpu` and the device
    is not cpu."""
    name, has_vllm = str(cfg.eval.backend), importlib.util.find_spec("vllm") is not None
    if name == "auto":
        name = "vllm" if has_vllm and gpu and cfg.launch.device != "cpu" else "hf"
    return name, has_vllm


def likely_vllm(cfg) -> bool:
    """Whether generate.backend(cfg) will pick vllm, judged before torch is imported (a driver file for torch's
    answer): evaluate.run starts the vLLM child on this cue, so vLLM's import also overlaps this process's own
    torch import; backend(cfg) decides."""
    name, has_vllm = pick(cfg, gpu_present())
    return name == "vllm" and has_vllm


def check(cfg) -> None:
    """Everything about vLLM's settings that can be wrong, found before any model or data is loaded."""
    cuda_graphs(cfg)
    engine_kwargs(cfg)
    engines(cfg)


# eval.cuda_graphs -> vLLM's engine arguments
CUDA_GRAPHS = {
    "none": {"enforce_eager": True},  # eager: no capture, no torch.compile
    # one full CUDA graph per decode batch size, captured in seconds; prefill runs eager; no torch.compile
    "decode": {"enforce_eager": False, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}},
    "compiled": {"enforce_eager": False},  # vLLM's default: torch.compile, then graphs (cached after the first)
}


def cuda_graphs(cfg) -> dict:
    """vLLM's engine arguments for eval.cuda_graphs; a bad value stops here, naming the key."""
    mode = str(cfg.eval.cuda_graphs)
    if mode not in CUDA_GRAPHS:
        raise VllmError(f"eval.cuda_graphs={mode}: use one of {', '.join(CUDA_GRAPHS)}")
    return CUDA_GRAPHS[mode]


def engine_kwargs(cfg) -> dict:
    """eval.engine_kwargs as a dict, for vllm.LLM over ladder's own engine arguments. Each key is checked against the
    installed vLLM's EngineArgs, read from its source without importing vLLM, so that a misspelt key stops the run
    here, naming it, instead of in the vLLM child after the training before it."""
    from omegaconf import DictConfig, OmegaConf

    extra = cfg.eval.get("engine_kwargs")
    if extra is None:
        return {}
    if not isinstance(extra, (dict, DictConfig)):
        raise VllmError(f"eval.engine_kwargs={extra}: give vLLM engine arguments as keys, e.g. "
                        "eval.engine_kwargs.max_num_seqs=2048")
    extra = OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else dict(extra)
    known = vllm_engine_args()
    unknown = sorted(set(extra) - known) if known else []
    if unknown:
        raise VllmError(f"eval.engine_kwargs.{unknown[0]}: not an engine argument of the installed vLLM "
                        f"(vllm.EngineArgs in {vllm_arg_utils()})")
    return extra


def vllm_arg_utils() -> Path | None:
    """The installed vLLM's engine/arg_utils.py (where EngineArgs is defined), found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    return path if path.is_file() else None


def vllm_engine_args() -> frozenset[str]:
    """The field names of the installed vLLM's EngineArgs dataclass, parsed from its source (empty: no vLLM here, or
    a layout this does not know, and vLLM's own check applies)."""
    import ast

    path = vllm_arg_utils()
    if path is None:
        return frozenset()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return frozenset(n.target.id for n in node.body
                             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
    return frozenset()


def engines(cfg) -> int:
    """eval.engines, checked (a bad value stops here, naming the key), `auto` decided (auto_engines)."""
    n = cfg.eval.get("engines", "auto")
    if n == "auto":
        return auto_engines(cfg)[0]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VllmError(f"eval.engines={n}: auto, or the number of vLLM engines generating at once, 1 or more")
    return n


# eval.engines=auto runs two engines on one GPU for a model of at most this much weight (measured for the 0.5B model,
# 1.2 GiB: two engines generated its GSM8K eval in 0.57-0.70x the time of one, docs/benchmarks.md; a larger model's
# steps are more GPU work, which two engines on one GPU take turns at), when each engine's half of the memory share
# keeps AUTO_MIN_KV_BYTES for its KV cache beside the weights and RESERVE_BYTES
AUTO_TWO_MAX_WEIGHTS = 2 << 30
AUTO_MIN_KV_BYTES = 4 << 30


def auto_engines(cfg) -> tuple[int, str]:
    """eval.engines=auto: (engines, why). One engine per group of eval.tensor_parallel_size visible GPUs; with one
    group, two engines on it for a small model (AUTO_TWO_MAX_WEIGHTS) when the GPU's memory has room for both; one
    when no GPU, model size or GPU memory can be read."""
    tp, groups = int(cfg.eval.tensor_parallel_size), gpu_groups(cfg)
    if len(groups) > 1:
        return len(groups), f"one engine per group of {tp} of the {len(groups) * tp} visible GPUs"
    if not groups:
        return 1, "no GPU seen (or fewer than eval.tensor_parallel_size)"
    weights = model_weights_bytes(cfg)
    if not weights:
        return 1, "the model's size is not known here"
    if weights > AUTO_TWO_MAX_WEIGHTS:
        return 1, (f"one GPU; the model's weights ({weights / 2**30:.1f} GiB) are more than "
                   f"{AUTO_TWO_MAX_WEIGHTS >> 30} GiB")
    total = gpu_memory_bytes(groups[0]) if tp == 1 else None
    if total is None:
        return 1, "one GPU whose memory is not known (nvidia-smi)"
    room = kv_room(float(cfg.eval.gpu_memory_utilization) / 2, total, weights)
    if room < AUTO_MIN_KV_BYTES:
        return 1, (f"one GPU of {total / 2**30:.0f} GiB: half of eval.gpu_memory_utilization leaves "
                   f"{max(room, 0) / 2**30:.1f} GiB of KV cache, less than {AUTO_MIN_KV_BYTES >> 30} GiB")
    return 2, (f"one GPU of {total / 2**30:.0f} GiB and a small model ({weights / 2**30:.1f} GiB of weights): two "
               "engines share it, each generating half the prompts")


def engines_why(cfg) -> str:
    """How eval.engines was decided, for --dry_run."""
    if cfg.eval.get("engines", "auto") != "auto":
        return f"eval.engines={cfg.eval.engines}, as set"
    n, why = auto_engines(cfg)
    return f"auto: {n} ({why})"


def model_weights_bytes(cfg) -> int:
    """The weights of the model the generation serves, as its engine holds them (weights_bytes), found before it
    loads: eval's --init (or its exported hf/ folder), else model.path (a chain's next checkpoint, not written yet,
    has the same size); 0 when none is here."""
    init = cfg.model.get("init")
    for where in ([str(init), str(Path(str(init)) / "hf")] if init else []) + [str(cfg.model.path)]:
        size = weights_bytes(where, str(cfg.eval.dtype))
        if size:
            return size
    return 0


@functools.lru_cache(maxsize=None)
def gpu_memory_bytes(device: str) -> int | None:
    """Total memory of one GPU, named as CUDA_VISIBLE_DEVICES names it (an index or a UUID), from nvidia-smi (no
    CUDA context, no torch); None when it cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", device],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def visible_gpus() -> list[str]:
    """The GPUs a child process may use, as CUDA_VISIBLE_DEVICES names them, read without torch: that variable when
    it is set, else the driver's /dev/nvidiaN device files."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    return sorted((p.name[6:] for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit()), key=int)


def placements(cfg) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of the eval.engines engines (None: the child keeps this process's): engine i on
    group i mod G of the G groups of eval.tensor_parallel_size visible GPUs; one engine keeps them all."""
    n = engines(cfg)
    if n == 1:
        return [None]
    groups = gpu_groups(cfg)
    return [groups[i % len(groups)] if groups else None for i in range(n)]


def gpu_groups(cfg) -> list[str]:
    """The visible GPUs in groups of eval.tensor_parallel_size, each as CUDA_VISIBLE_DEVICES names it ("4,5")."""
    tp, gpus = int(cfg.eval.tensor_parallel_size), visible_gpus()
    return [",".join(gpus[g * tp:(g + 1) * tp]) for g in range(len(gpus) // tp)]


# Beside the weights and the KV cache, the 0.5B model's engine held 2.9 GiB on the H200 (activations of a 16k-token
# step, CUDA context, sampler): the room an engine that shares its GPU keeps for them
RESERVE_BYTES = 3 << 30


def kv_room(share: float, total: int, weights: int) -> int:
    """What an engine's `share` of a GPU of `total` bytes leaves for its KV cache beside the weights and
    RESERVE_BYTES (negative: not even that)."""
    return int(share * total) - weights - RESERVE_BYTES


def dtype_bytes(dtype: str) -> int:
    """Bytes of one value in eval.dtype (bfloat16 and float16: 2, float32: 4)."""
    return 4 if dtype in ("float32", "float") else 2


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """K and V of one token in every layer, from the model's config (sliding-window or latent-attention models
    need less: this is an upper bound)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * dtype_bytes(dtype)


def weights_bytes(model: str, dtype: str) -> int:
    """The model's weights as an engine holds them in `dtype`: the parameter count, read from the safetensors
    headers, times the dtype's bytes (an exported checkpoint keeps verl's fp32, twice what a bf16 engine holds); the
    .bin files' size where there are no safetensors; 0 when the model is not found (a local folder, or the hub's
    cache for a hub id)."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 (not cached: the engine's own check applies)
            return 0
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return sum(p.stat().st_size for p in folder.glob("*.bin"))
    return sum(safetensors_parameters(p) for p in shards) * dtype_bytes(dtype)


def safetensors_parameters(path: Path) -> int:
    """The number of values in a safetensors file, from the shapes in its header (safetensors reads no tensor for
    them); the file's size in bytes / 2 when it cannot be read (the weights' loader names that file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except Exception:  # noqa: BLE001 (safetensors' own error types vary by version)
        return path.stat().st_size // 2


def kv_plan(model: str, dtype: str, seqs: int, max_model_len: int) -> dict:
    """What kv_cache_bytes sizes an engine's cache from: `seqs` sequences of max_model_len tokens, the model's bytes
    per token and its weights."""
    return {"tokens": seqs * max_model_len, "bytes_per_token": kv_bytes_per_token(model, dtype),
            "weights": weights_bytes(model, dtype)}


def kv_cache_bytes(plan: dict, share: float, max_model_len: int, total: int | None) -> int:
    """The KV cache of an engine that shares its GPU: what its sequences need (plan: tokens, bytes_per_token,
    weights), at most its share of the GPU's memory less the weights and RESERVE_BYTES. Given to vLLM as
    kv_cache_memory_bytes, so that engines starting together do not count each other's memory as their own
    (vLLM sizes the cache from whole-device free memory)."""
    need = plan["tokens"] * plan["bytes_per_token"]
    if total is None:
        return need
    room = kv_room(share, total, plan["weights"])
    if room < max_model_len * plan["bytes_per_token"]:
        raise VllmError(f"eval.engines: an engine's share of the GPU ({share:.3f} of {total / 2**30:.0f} GiB) "
                        f"has no room for one sequence's KV cache beside the weights "
                        f"({plan['weights'] / 2**30:.1f} GiB); use fewer engines")
    return min(need, room)


class VllmChild:
    """`python -m stages.vllm_engine DIR`, once per engine (eval.engines): the processes vLLM runs in, so that its GPU
    memory is free again once they exit and a training stage can follow in the same run (EI, `--stage all`). Each
    imports vLLM first (15-23 s on the H200 host), then waits for DIR/job.json: started early (`prestart`), that
    import overlaps this process's data prep and tokenizing. They stop when this process is gone
    (plugins.lifeline) or `close()`s them. `devices`: each engine's CUDA_VISIBLE_DEVICES (None: this process's)."""

    def __init__(self, devices: list[str | None]):
        self.devices = list(devices)
        self.started = time.time()
        self.dirs, self.procs = [], []
        for device in self.devices:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                       LADDER_LAUNCHER_PID=str(os.getpid()))
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            self.dirs.append(Path(tempfile.mkdtemp(prefix="ladder-vllm-")))
            command = [sys.executable, "-m", "stages.vllm_engine", str(self.dirs[-1])]
            self.procs.append(subprocess.Popen(command, env=env, cwd=REPO))
        atexit.register(self.close)

    def run(self, jobs: list[dict]) -> list[dict]:
        """Hand each engine its job, wait for all of them to exit; their out.json, in order. An engine that fails
        stops the others at once."""
        for folder, job in zip(self.dirs, jobs, strict=True):
            tmp = folder / "job.tmp"
            tmp.write_text(json.dumps(job))
            tmp.rename(folder / "job.json")  # whole or not at all: the child polls for this name
        try:
            pending = set(range(len(jobs)))
            while pending:
                for i in sorted(pending):
                    rc = self.procs[i].poll()
                    if rc is None:
                        continue
                    pending.discard(i)
                    out = self.dirs[i] / "out.json"
                    error = json.loads(out.read_text()).get("error") if out.exists() else None
                    if rc or error or not out.exists():
                        which = f"engine {i + 1} of {len(jobs)}" if len(jobs) > 1 else "vLLM"
                        raise VllmError(error or f"{which} exited with {rc} generating with {jobs[i]['model']} "
                                        "(its log is above); --backend hf generates without vLLM")
                time.sleep(0.05)
            return [json.loads((folder / "out.json").read_text()) for folder in self.dirs]
        finally:
            self.close()

    def close(self) -> None:
        """Stop the engines that still run (a job never sent, or the others of a failed one); remove their folders."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for folder in self.dirs:
            shutil.rmtree(folder, ignore_errors=True)
        atexit.unregister(self.close)


_early: VllmChild | None = None  # prestart's engines, until vllm_generate takes them


def prestart(cfg) -> None:
    """Start the vLLM engines' processes now (placements(cfg)), before the data and prompts are
    ready (evaluate.run calls this once it knows the backend is vllm); the next vllm_generate uses them. `release()`
    stops them if nothing did."""
    global _early
    _early = _early or VllmChild(placements(cfg))


def prestart_before_training(cfg) -> None:
    """A chain's next generation (the eval after a training stage, EI's sampling) will use vLLM: start its engines'
    processes now, so that vLLM's import (18-24 s on the H200 host) runs during the training instead of before the
    eval. They import only (no CUDA context) and wait; the next vllm_generate takes them."""
    if likely_vllm(cfg):
        prestart(cfg)


def take(cfg) -> VllmChild:
    """The prestarted engines (if they are placed as cfg now asks), or new ones."""
    global _early
    want = placements(cfg)
    child, _early = _early, None
    if child is not None and child.devices != want:
        child.close()
        child = None
    return child or VllmChild(want)


def release() -> None:
    """Stop prestarted engines that no generation used (the run stopped on bad input)."""
    global _early
    if _early is not None:
        _early.close()
        _early = None


def vllm_generate(model: str, prompts: list[list[int]], cfg, stops, sampling: dict | None = None, n: int = 1,
                  stop_ids: tuple[int, ...] = ()) -> tuple[list[tuple[str, str, int]], float]:
    """vLLM, greedy unless `sampling` ({temperature, top_p}); `n` samples per prompt (vLLM's own `n`, one
    request each, so the samples differ), in VllmChild processes (the prestarted ones if any), engine i of E
    generating prompts i, i+E, ... Returns (text, finish reason, tokens) rows (prompt i's at i*n … i*n+n-1; the text
    runs past a stop string, which generate() cuts) and the generation seconds (from the first engine's start of
    generation to the last one's end)."""
    e = cfg.eval
    longest = max(map(len, prompts)) + int(e.max_new_tokens)
    extra = engine_kwargs(cfg)
    engine = {"max_model_len": int(e.max_model_len or longest), "dtype": str(e.dtype),
              "gpu_memory_utilization": float(e.gpu_memory_utilization), "seed": int(cfg.run.seed),
              "tensor_parallel_size": int(e.tensor_parallel_size), **cuda_graphs(cfg)}
    params = {"n": int(n), "temperature": 0.0, "max_tokens": int(e.max_new_tokens), "stop": list(stops),
              "stop_token_ids": list(stop_ids), "include_stop_str_in_output": True,
              # vLLM's stop strings need its detokenizer; without them the child decodes the ids once at the end
              # instead of token by token (16% less generation time, docs/benchmarks.md)
              "detokenize": bool(stops), **(sampling or {})}
    max_len = int(extra.get("max_model_len", engine["max_model_len"]))
    if longest > max_len:
        raise VllmError(f"longest prompt ({longest - int(e.max_new_tokens)} tokens) + eval.max_new_tokens "
                        f"({e.max_new_tokens}) > eval.max_model_len ({max_len}); raise it or leave it null")
    where = placements(cfg)
    shards = [list(range(i, len(prompts), len(where))) for i in range(len(where))]
    jobs = []
    for i, (device, shard) in enumerate(zip(where, shards)):
        own = {**engine, "seed": engine["seed"] + i}
        job = {"model": model, "prompts": [prompts[j] for j in shard], "sampling": params, "progress": i == 0}
        sharing = where.count(device)
        if sharing > 1:  # engines on one GPU: each its share of the memory, and a KV cache sized for its sequences
            own["gpu_memory_utilization"] = round(float(e.gpu_memory_utilization) / sharing, 4)
            if "kv_cache_memory_bytes" not in extra:
                seqs = min(len(shard) * int(n), int(extra.get("max_num_seqs") or 1024))
                job["kv"] = kv_plan(model, str(e.dtype), seqs, max_len)
        jobs.append({**job, "engine": {**own, **extra}})  # the user's engine_kwargs over ladder's
    child = take(cfg)
    sent = time.time()
    outs = child.run(jobs)
    done = [o for o in outs if o["rows"]]
    seconds = max(o["end"] for o in done) - min(o["start"] for o in done) if done else 0.0
    timing = [o["timing"] for o in done]
    if len(outs) == 1:
        t = timing[0]
        print(f"[vllm] vLLM child: import {t['import']:.1f} s, then {t['waited']:.1f} s waiting for the prompts, "
              f"engine start {t['engine']:.1f} s, generation {seconds:.1f} s; {time.time() - sent:.1f} s from prompts "
              f"to result, {time.time() - child.started:.1f} s since it started", flush=True)
    else:
        def spread(values: list[float]) -> str:
            return f"{min(values):.1f}-{max(values):.1f} s"
        print(f"[vllm] {len(outs)} vLLM engines ({', '.join(d or 'all GPUs' for d in where)}): import "
              f"{spread([t['import'] for t in timing])}, engine start {spread([t['engine'] for t in timing])}, "
              f"generation {spread([o['end'] - o['start'] for o in done])} each, {seconds:.1f} s from the first "
              f"start to the last end; {time.time() - sent:.1f} s from prompts to result", flush=True)
    rows: list = [None] * (len(prompts) * int(n))
    for shard, out in zip(shards, outs):
        for k, j in enumerate(shard):
            rows[j * n:(j + 1) * n] = out["rows"][k * n:(k + 1) * n]
    return [tuple(row) for row in rows], seconds


def device_memory() -> int | None:
    """Total memory of this process's first visible GPU, from vLLM's platform (NVML: no CUDA context), or None."""
    try:
        from vllm.platforms import current_platform

        return int(current_platform.get_device_total_memory(0))
    except Exception:  # noqa: BLE001 (no such platform call here: the plan's need stands)
        return None


def _vllm_child(folder: Path) -> None:
    """The child process of VllmChild: import vLLM, wait for folder/job.json, write folder/out.json."""
    import plugins.lifeline  # noqa: F401 (watches LADDER_LAUNCHER_PID: no engine outlives its launcher)

    t0 = time.time()
    from vllm import LLM, SamplingParams

    inspect_here()
    t1 = time.time()
    while not (folder / "job.json").exists():
        time.sleep(0.05)
    t2 = time.time()
    job = json.loads((folder / "job.json").read_text())
    if not job["prompts"]:  # more engines than prompts
        (folder / "out.json").write_text(json.dumps({"rows": []}))
        return
    engine = dict(job["engine"])
    if job.get("kv"):
        try:
            engine["kv_cache_memory_bytes"] = kv_cache_bytes(job["kv"], engine["gpu_memory_utilization"],
                                                             engine["max_model_len"], device_memory())
        except VllmError as err:
            (folder / "out.json").write_text(json.dumps({"error": str(err.code).removeprefix("[vllm] ")}))
            return
    llm = LLM(model=job["model"], **engine)
    timing = {"import": t1 - t0, "waited": t2 - t1, "engine": time.time() - t2}
    t0 = time.time()
    outs = [o for r in llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                                    SamplingParams(**job["sampling"]), use_tqdm=job.get("progress", True))
            for o in r.outputs]
    texts = [o.text for o in outs]
    if not job["sampling"].get("detokenize", True):  # vLLM returned ids only: the text, as its detokenizer writes it
        texts = llm.get_tokenizer().batch_decode([list(o.token_ids) for o in outs], skip_special_tokens=True)
    end = time.time()
    rows = [[text, o.finish_reason, len(o.token_ids)] for text, o in zip(texts, outs)]
    (folder / "out.json").write_text(json.dumps({"start": t0, "end": end, "rows": rows, "timing": timing}))


def inspect_here() -> None:
    """The first time vLLM meets a model architecture it reads the model class's traits in a fresh Python process
    (keeping the answer in ~/.cache/vllm/modelinfos), so that its own process has no CUDA context yet; that process
    imports vLLM again: 19 s of a fresh GPU host's first eval. This child has vLLM imported and no CUDA context, so
    the class is read here (an import of one model module). A vLLM without that hook is left as it is."""
    try:
        from vllm.model_executor.models import registry
    except ImportError:
        return
    if callable(getattr(registry, "_run_in_subprocess", None)):
        registry._run_in_subprocess = lambda fn: fn()


if __name__ == "__main__":  # vllm_generate's child process
    _vllm_child(Path(sys.argv[1]))
