"""Launching verl's trainers: what SFT and GRPO share between config.yaml and verl's command line.

    launch.torchrun_command(cfg, "verl.trainer.sft_trainer", keys, out)   # python -m torch.distributed.run …
    launch.environment(cfg, out)                                      # PYTHONPATH, metrics paths, CPU platform
    launch.kernel_keys(cfg, verl_model_block, prefix)                 # attention, liger, fused loss, compile
    launch.trainer_keys(cfg, out, "sft", resume_from)                 # trainer.* keys both trainers take
    launch.check_verl_keys(cfg, "sft", "verl.trainer.sft_trainer", keys)   # keys and values against verl's schema
    launch.check_device(cfg, "sft")                                   # a CUDA run on a machine without CUDA: said now
    launch.latest_step(out), launch.read_metrics(out)                 # what a run left in its stage folder

Running the command (its log, progress, signals, failure advice) is stages/supervise.py's. Which of ladder's
plugins (plugins/) verl loads in its processes is decided here: `kernel_keys` names them in verl's
`model.external_lib`, and `CPU_ENV` / `CPU_PLUGINS` load the CPU platform shims through
`VERL_USE_EXTERNAL_MODULES` when `launch.device=cpu` (tests, the demo).
"""
from __future__ import annotations

import difflib
import json
import os
import sys
from functools import lru_cache
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
        # verl's @hydra.main would write outputs/<date>/<time>/ into the working directory: its run folder (the
        # composed config, .hydra/config.yaml, and Hydra's log) goes into the stage folder instead
        f"hydra.run.dir={out.resolve() / 'logs' / 'hydra'}",
    ]
    if cfg.launch.device == "cpu":
        keys.append("trainer.device=cpu")
    return keys


def torchrun_command(cfg, module: str, keys: list[str], out: Path) -> list[str]:
    """`python -m torch.distributed.run … -m MODULE keys…` of this interpreter: --standalone on one node.

    torchrun's per-launch folder goes to the run's logs/torchrun: by default torchrun makes a torchelastic_* folder
    in the temp dir for each launch and never removes it."""
    launch = cfg.launch
    if int(launch.nnodes) > 1:
        where = [f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
                 f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}"]
    else:
        where = ["--standalone", "--nnodes=1"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={launch.n_gpus}",
            f"--log-dir={out.resolve() / 'logs' / 'torchrun'}", "-m", module, *keys]


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


# ---- before anything starts: the machine, and the keys against verl's own config schema
def check_device(cfg, stage: str) -> None:
    """A CUDA run (launch.device=cuda, the default) on a machine where torch sees no CUDA GPU stops here, saying
    how to run on the CPU, instead of 20 s later inside torchrun (`Distributed package doesn't have NCCL`)."""
    if cfg.launch.device != "cuda":
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not have:
        raise SystemExit(f"[{stage}] no CUDA GPU found (torch {torch.__version__} sees none), and launch.device is "
                         "cuda. To try ladder on the CPU (tiny models only; slow): add --device cpu, or run "
                         "`make demo`")
    if int(cfg.launch.n_gpus) > have:
        raise SystemExit(f"[{stage}] launch.n_gpus={cfg.launch.n_gpus} (--n_gpus / N_GPUS) but torch sees {have} "
                         f"GPU(s) on this machine: pass --n_gpus {have}")


VERL_ENTRY = {"verl.trainer.sft_trainer": "sft_trainer_engine", "verl.trainer.main_ppo": "ppo_trainer"}


def verl_schema_compose(entry: str, overrides: list[str]):
    """verl's own Hydra config `entry` (sft_trainer_engine, ppo_trainer) composed with `overrides`, as its
    @hydra.main composes it; Hydra raises on a key verl does not have. Found without importing verl (seconds)."""
    from importlib.util import find_spec

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    folder = Path(find_spec("verl").submodule_search_locations[0]) / "trainer" / "config"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(folder), version_base=None):
        return compose(config_name=entry, overrides=overrides)


@lru_cache(maxsize=None)
def _verl_defaults(entry: str):
    return verl_schema_compose(entry, [])


def _kind(default) -> tuple[str, tuple] | None:
    """What a value must be, from the type of verl's default: true/false, or a number (yaml writes 0 for a float
    field, so int and float are one kind). Others take anything: verl reads some list keys from a plain string
    (trainer.logger=console), and None, a string or an interpolation says nothing about the type."""
    if isinstance(default, bool):
        return "true or false", (bool,)
    if isinstance(default, (int, float)):
        return "a number", (int, float)
    return None


def _origin(cfg, stage: str, key: str) -> str:
    """Where ladder set a verl key: ' (sft.lr: --lr, LEARNING_RATE)' when config.yaml interpolates it, else ''."""
    from stages import cli, registry

    parent, _, leaf = f"{registry.get(stage).verl}.verl.{key}".rpartition(".")
    node = OmegaConf.select(cfg, parent) if cfg is not None else None
    raw = OmegaConf.to_container(node, resolve=False).get(leaf) if OmegaConf.is_dict(node) else None
    if not (isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and raw.count("${") == 1):
        return ""
    ladder_key, section = raw[2:-1], registry.get(stage).flags
    names = [f"--{f.name}" + (f", {f.env}" if f.env else "") for f in cli.FLAGS
             if f.key.format(stage=section) == ladder_key]
    return f" ({ladder_key}" + (f": {', '.join(names)}" if names else "") + ")"


def check_verl_keys(cfg, stage: str, module: str, keys: list[str]) -> None:
    """Every key verl will be given exists in verl's own config (`module`'s @hydra.main schema), and every value
    has the kind of verl's default; else SystemExit naming the key, where ladder set it, and a close match.

    verl itself would find a misspelt key only after ~25 s of imports, and `optim.lr=abc` or
    `trainer.save_freq=abc` only inside its trainer, in a traceback naming no key. Keys added with `+`/`++` and
    Hydra's own (`hydra.*`) are not checked against defaults.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entry = VERL_ENTRY[module]
    defaults = _verl_defaults(entry)
    try:
        parsed = OverridesParser.create().parse_overrides(keys)
    except Exception as err:  # Hydra's grammar: its message shows the override
        raise SystemExit(f"[{stage}] {err}") from None
    for raw, item in zip(keys, parsed):
        key = item.key_or_group
        if item.is_hydra_override() or item.is_delete():
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(defaults, parent) if parent else defaults
        known = OmegaConf.is_dict(node) and leaf in node.keys()  # `in node` is False for a ??? (missing) value
        if not known and not (item.is_add() or item.is_force_add()):
            near = difflib.get_close_matches(key, _leaf_keys(defaults), n=1, cutoff=0.75)
            raise SystemExit(f"[{stage}] {key}{_origin(cfg, stage, key)}: verl's {entry} config has no such key"
                             + (f"; did you mean {near[0]}?" if near else "")
                             + f" (its keys: python -m {module} --cfg job)")
        default = _default(node, leaf) if known else None
        kind, value = _kind(default), item.value()
        wrong = kind and value is not None and (not isinstance(value, kind[1])
                                                or isinstance(value, bool) and kind[1] != (bool,))  # bool is an int
        if wrong:
            raise SystemExit(f"[{stage}] {key}={raw.split('=', 1)[1]}{_origin(cfg, stage, key)}: verl expects "
                             f"{kind[0]} (its default is {default!r})")
    try:  # what is left (interpolations, list edits): Hydra's own composition
        verl_schema_compose(entry, [k for k, item in zip(keys, parsed) if not item.is_hydra_override()])
    except Exception as err:
        raise SystemExit(f"[{stage}] verl's {entry} config refuses these keys: {err}") from None


def _default(node, leaf):
    """verl's default for `leaf` of `node` as written (an interpolation stays a string: not checked)."""
    child = node._get_node(leaf)
    return child if OmegaConf.is_config(child) else child._value()


def _leaf_keys(node, prefix: str = "") -> list[str]:
    out = []
    for key in node:
        child = node._get_node(key)
        out += _leaf_keys(child, f"{prefix}{key}.") if OmegaConf.is_dict(child) else [f"{prefix}{key}"]
    return out


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
