"""Stages run one after another: what `--stage all`, expert iteration, the sweep and the demo share.

A stage is called through its `run(cfg)` with its own copy of the config, never through fake command lines;
a stage starts from the previous one through `model.init` (its folder), as `--init` would say on the command line.

    metrics = train_then_evaluate(cfg)     # SFT per cfg, then greedy eval of its export: metrics, or an exit code
    metrics = evaluate_into(cfg, model, outputs/<run>/base/eval)       # the eval stage on any model
    is_done(outputs/<run>/sft)             # its manifest says `done` (a rerun skips it)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from stages.config import read_manifest, stage_dir


def is_done(folder: Path) -> bool:
    manifest = Path(folder) / "manifest.json"
    return manifest.is_file() and read_manifest(manifest).get("status") == "done"


def evaluate_into(cfg, model: str, out: Path) -> dict | int:
    """The eval stage on `model` (anything --init takes) into `out`: its metrics, or its exit code. A folder
    that already holds metrics.json is not evaluated again (a rerun resumes)."""
    from stages import evaluate

    out = Path(out)
    if not (out / "metrics.json").exists():
        cfg = copy.deepcopy(cfg)
        cfg.model.init, cfg.eval.output_dir = str(model), str(out)
        rc = evaluate.run(cfg)
        if rc:
            return rc
    return json.loads((out / "metrics.json").read_text())


def train_then_evaluate(cfg) -> dict | int:
    """SFT per cfg (from model.init or model.path), then the eval stage on its export, into
    eval.output_dir or outputs/<run>/eval. Returns the eval metrics, or the first non-zero exit code."""
    from stages import sft

    cfg = copy.deepcopy(cfg)
    rc = sft.run(cfg)
    if rc:
        return rc
    return evaluate_into(cfg, str(stage_dir(cfg, "sft")), Path(cfg.eval.output_dir or stage_dir(cfg, "eval")))
