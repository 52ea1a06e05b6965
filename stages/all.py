"""`./train.sh --stage all`: data → SFT → expert iteration → GRPO → evaluation, one run folder.

    ./train.sh --stage all --model Qwen/Qwen2.5-1.5B
    ./train.sh --stage all --model Qwen/Qwen2.5-0.5B --use_lora ei.rounds=0      # SFT → GRPO → eval
    ./train.sh --stage all --run_name myrun …                                     # rerun: resumes

The chain is the stage table's (stages/registry.py). Each stage starts from the one before it through its
folder (`model.init=outputs/<run>/<stage>`), exactly as if the stages were run one by one with `--init`. A
stage whose manifest says `done` is skipped, so rerunning the same command resumes at the first unfinished
stage (and inside it, from its last checkpoint or round). Without --run_name the run is named after the
model (no timestamp), so the rerun finds it.
Flags such as --lr or --batch_size set the SFT stage; set other stages with their keys (ei.rounds=2,
grpo.lr=1e-6, grpo.verl.trainer.test_freq=10); a bare verl key is refused as ambiguous.
`ei.rounds=0` skips expert iteration.
"""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import OmegaConf

from stages import chain, registry
from stages.config import stage_dir


def plan(cfg) -> list[str]:
    return [s for s in registry.chain() if not (s == "ei" and int(cfg.ei.rounds) <= 0)]


def run(cfg) -> int:
    if not cfg.run.name:
        cfg.run.name = Path(str(cfg.model.path).rstrip("/")).name or "model"
    run_dir = stage_dir(cfg, "data").parent
    stages = plan(cfg)
    print(f"[all] {run_dir}: {' -> '.join(['data', *stages])}", flush=True)
    if cfg.run.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    from data_prep import prepare

    prepare(cfg.data, run_dir / "data")  # once, for every stage (each would otherwise check it again)
    previous = None
    for stage in stages:
        folder = run_dir / stage
        if chain.is_done(folder):
            print(f"[all] {stage}: done earlier ({folder / 'manifest.json'})", flush=True)
            previous = stage
            continue
        stage_cfg = copy.deepcopy(cfg)
        if stage == "grpo":
            stage_cfg.grpo.final_eval = False  # the chain's own eval stage follows
        if stage == "eval":
            stage_cfg.eval.output_dir = str(folder)
        if previous:
            stage_cfg.model.init = str(run_dir / previous)
        print(f"[all] {stage}: from {stage_cfg.model.init or stage_cfg.model.path}", flush=True)
        rc = registry.run(stage_cfg, stage)
        if rc:
            print(f"[all] {stage} failed ({rc}); rerun the same command to resume at {stage}")
            return rc
        previous = stage
    print(f"[all] done: {run_dir / 'report.md'}")
    return 0
