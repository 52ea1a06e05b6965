"""SFT stage: config.yaml → `torchrun … -m verl.trainer.sft_trainer`, then export and a manifest.

    ./train.sh                                               # one GPU, config.yaml's defaults
    ./train.sh --use_lora --model Qwen/Qwen2.5-1.5B
    N_GPUS=8 ./train.sh                                      # one node, 8 GPUs
    N_GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train.sh   # on each node, its own NODE_RANK
    ./train.sh --resume_from outputs/<run>/sft/global_step_200

What ladder sets on top of verl's defaults (all visible with --dry_run):
  - attention `sdpa` (verl defaults to flash_attention_2, which needs the flash-attn package);
  - torch.compile off, dynamic batching on, cosine schedule with 5% warmup, lr 1e-5;
  - checkpoints also hold `huggingface/` weights (`hf_model`), so export needs no merger run;
  - loggers: console + TensorBoard + a JSONL file always, wandb only when WANDB_PROJECT is set and
    wandb imports (verl's default list includes wandb and dies without it);
  - resume `auto` from outputs/<run>/sft; a checkpoint taken exactly at an epoch boundary has its
    dataloader state set aside first, since verl 0.9.1 would otherwise replay an empty epoch and
    stop short (upstream #5725/#7401);
  - steps whose gradient norm is not finite are skipped by verl's engine; ladder counts them from
    the metrics log into the manifest.
Outputs: outputs/<run>/sft/{global_step_N/, logs/metrics.K.jsonl, tensorboard/, hf/ (+ adapter/
for LoRA), manifest.json}.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from stages.common import REPO, flatten, stage_dir, write_manifest


# ---- data
def data_files(cfg) -> tuple[str, str | None]:
    """A ready parquet (data.train_file) or what data_prep makes from config.yaml's data section."""
    given = cfg.data.train_file
    for name in ("train_file", "val_file"):
        path = cfg.data[name]
        if path and not Path(path).is_file():
            raise SystemExit(f"[sft] data.{name}={path}: no such file")
    if given and str(given).endswith(".parquet"):
        return str(Path(given).resolve()), (str(Path(cfg.data.val_file).resolve()) if cfg.data.val_file else None)
    from data_prep import prepare

    files = prepare(cfg.data, stage_dir(cfg, "data"))
    return str(Path(files["sft_train"]).resolve()), files.get("sft_val")


# ---- the verl command
def loggers(cfg) -> list[str]:
    """console + JSONL always; TensorBoard and wandb only when importable (a missing one is said)."""
    from importlib.util import find_spec

    names = ["console", "file"]
    wanted = ["tensorboard"] + (["wandb"] if cfg.logging.wandb_project else [])
    for name in wanted:
        if find_spec(name) is None:
            print(f"[ladder] {name} is not installed: logging without it")
        else:
            names.append(name)
    return names


def verl_overrides(cfg, out: Path, train: str, val: str | None) -> list[str]:
    resume = cfg.sft.resume_from
    keys = flatten(cfg.sft.verl) + [
        f"data.train_files={train}",
        f"data.val_files={val or 'null'}",
        f"trainer.default_local_dir={out.resolve()}",
        f"trainer.project_name={cfg.logging.wandb_project or 'ladder'}",
        f"trainer.experiment_name={cfg.run.name}-sft",
        f"trainer.logger=[{','.join(loggers(cfg))}]",
        f"trainer.resume_mode={'resume_path' if resume else 'auto'}",
        f"trainer.resume_from_path={Path(resume).resolve() if resume else 'null'}",
        f"trainer.nnodes={cfg.launch.nnodes}",
        f"trainer.n_gpus_per_node={cfg.launch.n_gpus}",
    ]
    if cfg.launch.device == "cpu":
        keys.append("trainer.device=cpu")
    return keys


def command(cfg, overrides: list[str]) -> list[str]:
    launch = cfg.launch
    if int(launch.nnodes) > 1:
        where = [f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
                 f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port}"]
    else:
        where = ["--standalone", "--nnodes=1"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={launch.n_gpus}",
            "-m", "verl.trainer.sft_trainer", *overrides]


def environment(cfg, out: Path) -> dict[str, str]:
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
    if cfg.launch.device == "cpu":  # test/demo only: verl 0.9.1 has no CPU platform of its own
        env.update(VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda", CUDA_VISIBLE_DEVICES="",
                   VERL_USE_EXTERNAL_MODULES="tests.cpu_platform")
    return env


# ---- checkpoints and metrics
def latest_step(out: Path) -> int:
    marker = out / "latest_checkpointed_iteration.txt"
    return int(marker.read_text().strip()) if marker.exists() else 0


def resume_step(path: str) -> int:
    folder = Path(path)
    if not folder.name.startswith("global_step_") or not folder.is_dir():
        raise SystemExit(f"[sft] --resume_from {path}: expected an existing verl checkpoint folder "
                         "named global_step_N (for example outputs/<run>/sft/global_step_200)")
    return int(folder.name.split("_")[-1])


def steps_per_epoch(cfg, train: str) -> int:
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(train).metadata.num_rows
    world = int(cfg.launch.n_gpus) * int(cfg.launch.nnodes)  # verl's sampler and loader drop the last partial batch
    return max((rows // world) // max(int(cfg.sft.verl.data.train_batch_size) // world, 1), 1)


def set_aside_epoch_end_state(out: Path, step: int, per_epoch: int) -> bool:
    """At an epoch boundary the saved dataloader state is 'epoch finished': drop it (see docstring)."""
    if step == 0 or step % per_epoch:
        return False
    moved = False
    for state in (out / f"global_step_{step}").glob("data_*.pt"):
        state.rename(state.with_suffix(".pt.epoch_end"))
        moved = True
    return moved


def read_metrics(out: Path) -> dict[int, dict]:
    """Step → metrics over all attempts; a later attempt's record of a step replaces an earlier one."""
    steps: dict[int, dict] = {}
    for path in sorted((out / "logs").glob("metrics.*.jsonl"), key=lambda p: int(p.suffixes[0][1:])):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                steps[int(record["step"])] = record["data"]
    return steps


# ---- the stage
def run(cfg, args) -> int:
    out = stage_dir(cfg, "sft")
    train, val = data_files(cfg)
    overrides = verl_overrides(cfg, out, train, val)
    cmd = command(cfg, overrides)
    if args.dry_run:
        print(shlex.join(cmd))
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    done = resume_step(cfg.sft.resume_from) if cfg.sft.resume_from else latest_step(out)
    per_epoch = steps_per_epoch(cfg, train)
    total = per_epoch * int(cfg.sft.epochs)
    if done and done >= total:
        print(f"[sft] {out} already holds step {done} of {total}: nothing to train, exporting")
    else:
        write_manifest(out, stage="sft", status="running", base_model=str(cfg.model.path),
                       lora=bool(cfg.model.use_lora), train_file=train, val_file=val)
        if done and set_aside_epoch_end_state(out, done, per_epoch):
            print(f"[sft] resuming at an epoch boundary (step {done}): starting the next epoch afresh")
        print("[sft] " + shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd, env=environment(cfg, out), cwd=REPO)
        if rc:
            print(f"[sft] verl's trainer exited with {rc}; rerun the same command to resume from "
                  f"the last checkpoint in {out}", file=sys.stderr)
            return rc
    return finish(cfg, out, train, val)


def finish(cfg, out: Path, train: str, val: str | None) -> int:
    from stages.export import export

    if int(cfg.launch.node_rank) != 0:  # verl's rank 0 (on node 0) writes the full checkpoint
        print(f"[sft] node {cfg.launch.node_rank} done; node 0 exports and writes the manifest")
        return 0
    step = latest_step(out)
    if not step:
        print(f"[sft] no checkpoint in {out}", file=sys.stderr)
        return 1
    exported = export(out / f"global_step_{step}", out, base_model=str(cfg.model.path),
                      lora=bool(cfg.model.use_lora))
    metrics = read_metrics(out)
    # verl logs a NaN/inf gradient norm as JSON null (and skips that optimizer step)
    nonfinite = [s for s, m in metrics.items()
                 if "train/grad_norm" in m and (m["train/grad_norm"] is None or not math.isfinite(m["train/grad_norm"]))]
    losses = [metrics[s]["train/loss"] for s in sorted(metrics) if "train/loss" in metrics[s]]
    write_manifest(out, stage="sft", status="done", base_model=str(cfg.model.path), lora=bool(cfg.model.use_lora),
                   global_step=step, hf_model=exported["hf"], adapter=exported.get("adapter"),
                   train_file=train, val_file=val, metrics_dir=str(out / "logs"),
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                   skipped_nonfinite_steps=len(nonfinite), config=OmegaConf.to_container(cfg, resolve=True))
    print(f"[sft] step {step}; exported {exported['hf']}; {len(nonfinite)} step(s) skipped for a "
          f"non-finite gradient norm")
    return 0
