"""Launching verl's trainers: what SFT and GRPO share between config.yaml and verl's command line.

    launch.torchrun_command(cfg, "verl.trainer.sft_trainer", keys)   # python -m torch.distributed.run …
    launch.environment(cfg, out)                                      # PYTHONPATH, metrics paths, CPU platform
    launch.kernel_keys(cfg, verl_model_block, prefix)                 # attention, liger, fused loss, compile
    launch.trainer_keys(cfg, out, "sft", resume_from)                 # trainer.* keys both trainers take
    launch.latest_step(out), launch.read_metrics(out)                 # what a run left in its stage folder

Which of ladder's plugins (plugins/) verl loads in its processes is decided here: `kernel_keys` names them in
verl's `model.external_lib`, and `CPU_ENV` / `CPU_PLUGINS` load the CPU platform shims through
`VERL_USE_EXTERNAL_MODULES` when `launch.device=cpu` (tests, the demo).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from stages.config import REPO

CPU_PLUGINS = ("plugins.cpu_platform",)  # verl 0.9.1 has no CPU platform of its own
CPU_RL_PLUGINS = CPU_PLUGINS + ("plugins.cpu_platform_rl",)  # what its Ray trainer also needs there
CPU_ENV = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": ",".join(CPU_PLUGINS), "CUDA_VISIBLE_DEVICES": ""}


# ---- kernels: config.yaml's model.attn_implementation / liger / fused_ce / compile, decided for this machine
def kernels(cfg) -> dict:
    """`auto` on CUDA: flash_attention_2 when flash-attn imports, else ladder_varlen when this torch has its
    varlen flash kernel, else sdpa; liger when liger_kernel imports; ladder's fused loss (plugins/fused_ce.py)
    when triton imports. `auto` on CPU: sdpa, no liger, no fused loss. With model.compile on, auto means no liger.
    """
    from importlib.util import find_spec

    m, cuda = cfg.model, cfg.launch.device == "cuda"
    attn = str(m.attn_implementation)
    if attn == "auto":
        attn = ("sdpa" if not cuda else "flash_attention_2" if find_spec("flash_attn")
                else "ladder_varlen" if find_spec("torch.nn.attention.varlen") else "sdpa")
    compile_with = compile_backend(m.get("compile"))
    # auto: no liger under compile, which fuses the same norms, SwiGLU and rotary embedding itself
    liger = (cuda and find_spec("liger_kernel") is not None and not compile_with if str(m.liger) == "auto"
             else bool(m.liger))
    fused = "off" if m.fused_ce in (False, None) else str(m.fused_ce)  # YAML reads a bare `off` as false
    if fused == "auto":  # ladder's kernels are triton; measured faster than verl's own (docs/benchmarks.md)
        fused = "ladder" if cuda and find_spec("triton") else "off"
    if fused not in ("off", "torch", "triton", "liger", "ladder"):
        raise SystemExit(f"[ladder] model.fused_ce={fused}: use auto, off, ladder (plugins/fused_ce.py) or a verl "
                         "backend: torch, triton, liger")
    return {"attn": attn, "liger": liger, "fused_ce": fused, "compile": compile_with}


def compile_backend(value) -> str:
    """model.compile → a torch.compile backend for plugins/compile.py, or "" (off)."""
    from plugins.compile import BACKENDS

    if value in (None, False, "false", "off"):
        return ""
    backend = "inductor" if value in (True, "true") else str(value)
    if backend not in BACKENDS:
        raise SystemExit(f"[ladder] model.compile={value}: use false, true (inductor) or a backend: {', '.join(BACKENDS)}")
    return backend


def kernel_keys(cfg, model, prefix: str = "model.", actor: bool = False) -> list[str]:
    """verl keys for kernels(cfg) under `prefix`; a key already set in `model` (the verl model block) wins.

    actor=True (GRPO's actor, reference and log-prob passes): the attention and the fused loss, which verl's
    actor runs through the same model forward as SFT; liger and compile are SFT's only (not measured there).
    """
    k = kernels(cfg)
    keys = {"override_config.attn_implementation": k["attn"]}
    libs = []  # ladder's plugins that verl imports in every process that builds the model
    if k["attn"] == "ladder_varlen":
        libs.append("plugins.attention")
    if k["compile"] and not actor:
        libs.append("plugins.compile")
    if k["fused_ce"] == "ladder":
        libs.append("plugins.fused_ce")
    if libs:
        keys["external_lib"] = libs[0] if len(libs) == 1 else f"[{','.join(libs)}]"
    if not actor:
        keys["use_liger"] = k["liger"]
    keys["use_fused_kernels"] = k["fused_ce"] != "off"
    if k["fused_ce"] != "off":  # ladder's replaces the function verl's torch backend calls
        keys["fused_kernel_options.impl_backend"] = "torch" if k["fused_ce"] == "ladder" else k["fused_ce"]
    return [f"++{prefix}{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in keys.items() if OmegaConf.select(model, key) is None]


# ---- the command line and its environment
def loggers(cfg) -> list[str]:
    """console + verl's JSONL `file` always; TensorBoard, wandb only when importable (a missing one is said)."""
    from importlib.util import find_spec

    names = ["console", "file"]
    for name in ["tensorboard"] + (["wandb"] if cfg.logging.wandb_project else []):
        if find_spec(name) is None:
            print(f"[ladder] {name} is not installed: logging without it", file=sys.stderr)
        else:
            names.append(name)
    return names


def trainer_keys(cfg, out: Path, stage: str, resume_from) -> list[str]:
    """The `trainer.*` keys SFT and GRPO both set: where checkpoints go, logging, resume, topology."""
    keys = [
        f"trainer.default_local_dir={out.resolve()}",
        f"trainer.project_name={cfg.logging.wandb_project or 'ladder'}",
        f"trainer.experiment_name={cfg.run.name}-{stage}",
        f"trainer.logger=[{','.join(loggers(cfg))}]",
        f"trainer.resume_mode={'resume_path' if resume_from else 'auto'}",
        f"trainer.resume_from_path={Path(resume_from).resolve() if resume_from else 'null'}",
        f"trainer.nnodes={cfg.launch.nnodes}",  # SFT: informational, verl takes the topology from torchrun
        f"trainer.n_gpus_per_node={cfg.launch.n_gpus}",
    ]
    if cfg.launch.device == "cpu":
        keys.append("trainer.device=cpu")
    return keys


def torchrun_command(cfg, module: str, keys: list[str]) -> list[str]:
    """`python -m torch.distributed.run … -m MODULE keys…` of this interpreter: --standalone on one node."""
    launch = cfg.launch
    if int(launch.nnodes) > 1:
        where = [f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
                 f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}"]
    else:
        where = ["--standalone", "--nnodes=1"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={launch.n_gpus}",
            "-m", module, *keys]


def environment(cfg, out: Path) -> dict[str, str]:
    """The trainer's environment: ladder on PYTHONPATH, one metrics file per attempt, TensorBoard, wandb, CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # verl's file logger truncates its file: one file per attempt, read back in order
    env["VERL_FILE_LOGGER_PATH"] = str(logs / f"metrics.{len(list(logs.glob('metrics.*.jsonl')))}.jsonl")
    env["TENSORBOARD_DIR"] = str(out / "tensorboard")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not cfg.logging.wandb_project:
        env.setdefault("WANDB_MODE", "disabled")
    if cfg.launch.device == "cpu":  # tests and demo only: verl 0.9.1 has no CPU platform of its own
        env.update(CPU_ENV)
    backend = kernels(cfg)["compile"]
    if backend:  # read by plugins/compile.py in every rank
        env["LADDER_COMPILE"] = backend
    return env


# ---- what a run left in its stage folder
def latest_step(out: Path) -> int:
    marker = Path(out) / "latest_checkpointed_iteration.txt"
    return int(marker.read_text().strip()) if marker.exists() else 0


def metric_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "logs").glob("metrics.*.jsonl"), key=lambda p: int(p.suffixes[0][1:]))


def read_metrics(out: Path) -> dict[int, dict]:
    """Step → metrics over all attempts; a later attempt's record of a step replaces an earlier one."""
    steps: dict[int, dict] = {}
    for path in metric_files(out):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                steps[int(record["step"])] = record["data"]
    return steps
