"""config.yaml and run folders: compose the config, name the run folder, read and write manifests.

Stages hand off through run folders, `outputs/<run>/<stage>/manifest.json`, never through globals.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"

if not OmegaConf.has_resolver("if"):
    OmegaConf.register_new_resolver("if", lambda cond, a, b: a if cond else b)
if not OmegaConf.has_resolver("sum"):
    OmegaConf.register_new_resolver("sum", lambda *terms: sum(terms))


def load_config(stage: str | None, overrides: list[str], config_path: Path = CONFIG) -> DictConfig:
    """config.yaml + `key=value` overrides. A key outside ladder's sections is a verl key of `stage`.

    Composed with Hydra's compose API so override grammar (`+key=`, lists, `~key`) is Hydra's own.
    """
    from hydra import compose, initialize_config_dir

    from stages import registry

    sections = tuple(_raw(config_path))
    section = registry.get(stage).verl if stage else None
    routed, added = [], []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" not in item and not item.startswith("~"):
            raise ValueError(f"override {item!r} is not key=value")
        if key.split(".", 1)[0] not in sections:
            if section is None:
                raise ValueError(f"override {item!r}: '{key.split('.')[0]}' is not a section of "
                                 f"{config_path.name} ({', '.join(sections)}) and stage {stage!r} "
                                 "has no verl block to pass it to")
            prefix = item[: len(item) - len(item.lstrip("+~"))]
            item = f"{prefix}{section}.verl.{item.lstrip('+~')}"
        if item.startswith("+") and f"{section}.verl." in item.split("=", 1)[0]:  # the user's own +: Hydra's add
            added.append(item.split("=", 1)[0].lstrip("+").split(f"{section}.verl.", 1)[1])
        # a verl key (bare, or spelled out as sft.verl.… in a recipe) that config.yaml does not list yet must be
        # added, not overridden
        key = item.split("=", 1)[0]
        if (key[0] not in "+~" and (".verl." in key or key.startswith(tuple(k + "." for k in OPEN_KEYS)))
                and OmegaConf.select(_raw(config_path), key) is None):
            item = "+" + item
        routed.append(item)
    with initialize_config_dir(config_dir=str(config_path.parent), version_base=None):
        cfg = compose(config_name=config_path.stem, overrides=routed)
    if added:
        cfg[section].verl_added = sorted(set(cfg[section].verl_added) | set(added))
    return cfg


def verl_overrides(block: DictConfig) -> list[str]:
    """A stage's `verl` block as verl's overrides; the keys the user added with `+` (`block.verl_added`) go as
    `++key` (add, or override where verl has the key), so verl's Hydra takes them and check_verl_keys skips them."""
    added = tuple(block.get("verl_added") or [])

    def was_added(key: str) -> bool:  # the key itself, or inside a dict value the user added
        return any(key == a or key.startswith(a + ".") for a in added)
    return [("++" + item if was_added(item.split("=", 1)[0]) else item) for item in flatten(block.verl)]


_RAW: dict[Path, DictConfig] = {}


def _raw(path: Path) -> DictConfig:
    if path not in _RAW:
        _RAW[path] = OmegaConf.load(path)
    return _RAW[path]


# ladder keys whose value is a free-form dict handed to a library: `eval.engine_kwargs.max_num_seqs=2048` adds the key
OPEN_KEYS = ("eval.engine_kwargs",)

# verl keys whose value is a free-form dict (empty in verl's schema): their items go as `++key.a=b`
FREE_FORM = ("override_config", "apply_chat_template_kwargs", "engine_kwargs", "override_optimizer_config")


def flatten(node: Any, prefix: str = "") -> list[str]:
    """A resolved config block as verl's dotted `key=value` overrides (lists in Hydra syntax)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key in FREE_FORM:
            out += ["++" + item for item in flatten(value, name + ".")]
        elif isinstance(value, dict) and value:
            out += flatten(value, name + ".")
        else:
            out.append(f"{name}={_hydra_value(value)}")
    return out


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and any(c in value for c in " ,[]{}=:'\"()"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def run_name(cfg: DictConfig) -> str:
    if cfg.run.name:
        return str(cfg.run.name)
    base = Path(str(cfg.model.path).rstrip("/")).name or "model"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """outputs/<run>/<stage>; the run name is fixed into cfg on first use so all stages agree."""
    if not cfg.run.name:
        cfg.run.name = run_name(cfg)
    return Path(cfg.run.output_dir) / str(cfg.run.name) / stage


def write_manifest(folder: Path, **fields: Any) -> Path:
    """A stage's manifest.json, written whole (atomically). A `running` one names its launcher (pid, host, start
    time), so read_manifest can tell a run in progress from one whose launcher died without a word."""
    from plugins.lifeline import start_time

    folder.mkdir(parents=True, exist_ok=True)
    fields.setdefault("written_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    if fields.get("status") == "running":
        fields["launcher"] = {"pid": os.getpid(), "host": socket.gethostname(), "started": start_time(os.getpid())}
    path = folder / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(fields, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict:
    """A stage's manifest. One that says `running` while its launcher is gone from this host (SIGKILL, the OOM
    killer, a closed terminal: nothing could write `failed`) reads as `interrupted`, with the reason."""
    from plugins.lifeline import start_time

    path = Path(folder)
    path = path if path.name == "manifest.json" else path / "manifest.json"
    manifest = json.loads(path.read_text())
    launcher = manifest.get("launcher") or {}
    if (manifest.get("status") == "running" and launcher.get("host") == socket.gethostname()
            and start_time(int(launcher["pid"])) != launcher.get("started")):
        manifest.update(status="interrupted", interrupted=(
            f"its launcher (pid {launcher['pid']}) ended without recording an outcome (killed?); rerun the same "
            "command to resume from its last checkpoint"))
    return manifest


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
