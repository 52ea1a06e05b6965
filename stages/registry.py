"""The one table of ladder's stages. The CLI, config routing, `--stage all`, report order and `--init`
resolution all read it: adding a stage (DPO, say) is a row here plus its module with `run(cfg) -> int`.

    from stages import registry
    registry.get("grpo").module          # "stages.grpo"
    registry.chain()                     # ("sft", "ei", "grpo", "eval"): what --stage all runs, in order
    registry.trainers()                  # ("sft", "ei", "grpo"): stages that export a model
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str          # --stage NAME; its folder is outputs/<run>/<NAME>
    module: str        # a module with run(cfg) -> exit code
    flags: str | None  # config section that --lr, --batch_size, --epochs ... set (None: those flags do not apply)
    verl: str | None   # section whose `verl:` block takes bare verl keys (trainer.save_freq=…); None: refused
    chain: int | None  # place in `--stage all` (None: not part of it)
    report: int        # order of its section in report.md
    trains: bool       # exports a model (outputs/<run>/<NAME>/hf), so `--init outputs/<run>` can mean it
    dry_run: bool      # run() handles run.dry_run itself; otherwise the CLI prints the resolved config
    help: str


STAGES = (
    Stage("sft", "stages.sft", "sft", "sft", 1, 10, True, True, "supervised fine-tuning (verl's sft_trainer)"),
    Stage("ei", "stages.ei", "sft", "sft", 2, 30, True, True,
          "expert iteration: sample, keep what the grader accepts, fine-tune, evaluate; round after round"),
    Stage("grpo", "stages.grpo", "grpo", "grpo", 3, 40, True, True, "GRPO (verl's main_ppo, ladder's grader as reward)"),
    Stage("eval", "stages.evaluate", None, None, 4, 20, False, True, "greedy evaluation on a test set"),
    Stage("all", "stages.all", "sft", None, None, 50, False, True, "data -> sft -> ei -> grpo -> eval in one run folder"),
    Stage("data", "stages.data", "sft", None, None, 50, False, False, "only prepare the parquet files"),
    Stage("sweep", "stages.sweep", "sft", None, None, 50, False, False, "SFT + eval per data size / learning rate"),
    Stage("demo", "stages.demo", "sft", None, None, 50, False, False, "the embedded CPU demo (tiny model, no hub)"),
)
_BY_NAME = {s.name: s for s in STAGES}


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def get(name: str) -> Stage:
    if name not in _BY_NAME:
        raise KeyError(f"no stage {name!r}: use one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def chain() -> tuple[str, ...]:
    return tuple(s.name for s in sorted((s for s in STAGES if s.chain), key=lambda s: s.chain))


def trainers() -> tuple[str, ...]:
    """Stages that export a model, in chain order (sft, ei, grpo)."""
    return tuple(name for name in chain() if get(name).trains)


def report_order(key: str) -> int:
    """A report section's place: its stage's (`eval-gsm8k` is eval's), else after every stage."""
    stage = _BY_NAME.get(key.split("-")[0])
    return stage.report if stage else 50


def run(cfg, name: str) -> int:
    return int(importlib.import_module(get(name).module).run(cfg) or 0)
