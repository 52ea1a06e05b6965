"""SFT stage: config.yaml → `torchrun … -m verl.trainer.sft_trainer`, then export and a manifest.

    ./train.sh                                                       # one GPU, config.yaml's defaults
    ./train.sh --use_lora --model Qwen/Qwen2.5-1.5B
    N_GPUS=8 ./train.sh                                              # one node, 8 GPUs
    N_GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train.sh    # on every node, each its NODE_RANK
    ./train.sh --resume_from outputs/<run>/sft/global_step_200       # default: resume the latest one
    ./train.sh --dry_run                                             # print the command and config only

The launch is `python -m torch.distributed.run` (torchrun) of this interpreter: `--standalone` on one
node, `--nnodes/--node_rank/--master_addr/--master_port` on several (all nodes must share
outputs/, as verl resumes from and writes checkpoints to one folder). Where ladder departs from verl:
  - kernels (`launch.kernels()`, measured in docs/benchmarks.md): on CUDA without flash-attn the attention
    is `ladder_varlen` (plugins/attention.py, loaded through verl's model.external_lib; verl's default
    flash_attention_2 needs the flash-attn package, and sdpa over packed rows builds a dense mask),
    with liger-kernel when installed and ladder's fused loss (plugins/fused_ce.py: cuBLAS matmuls plus two
    triton passes, swapped in for verl's torch backend) when triton is; on CPU plain sdpa;
  - torch.compile off by default; `model.compile=true` compiles each decoder layer (plugins/compile.py:
    verl's own engine.use_torch_compile only compiles an entropy helper SFT never calls); dynamic batching on, cosine schedule with 5% warmup, lr 1e-5;
  - checkpoints also hold `huggingface/` weights (`hf_model`), so export needs no merger run;
  - loggers: console, TensorBoard and verl's JSONL `file` logger; wandb only when WANDB_PROJECT is
    set and wandb imports (verl's default list includes wandb and dies without it);
  - resume is `auto` from outputs/<run>/sft. A checkpoint taken exactly at an epoch boundary has
    its dataloader state (data_*.pt → data_*.pt.epoch_end) set aside first: verl 0.9.1 would
    restore an exhausted loader into the next epoch and silently train 0 steps of it (upstream
    #5725/#7401). A run that already holds all its steps is not relaunched, only exported;
  - keep-last-N (`sft.keep_ckpts`) holds across attempts: verl forgets the checkpoints of an earlier
    (killed) attempt, so ladder deletes the surplus after training;
  - `--init` (`model.init`: a run, stage, checkpoint or HF folder) replaces model.path as the starting weights.
  - before anything starts (seconds, before data prep or verl's ~25 s of imports): the files named, the resume
    folder, every verl key and value against verl's own schema (launch.check_verl_keys), a CUDA GPU when
    launch.device=cuda; verl runs under stages/supervise.py (its output to a log file, a progress bar on the
    console, signals passed on, failure advice by kind, `failed` manifests).
Outputs: outputs/<run>/sft/{global_step_N/, logs/{metrics.K.jsonl, verl.K.log (one each per attempt),
attempts.jsonl, hydra/}, tensorboard/, hf/ (+ adapter/ for LoRA), manifest.json}, and an SFT section with the
loss curve in outputs/<run>/report.md. `launch.device=cpu` (tests, demo) loads the CPU platform
shim plugins/cpu_platform.py into every rank: gloo, FSDP2, sdpa.
"""
from __future__ import annotations

import math
import shlex
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from stages import launch, report, supervise
from stages.config import stage_dir, verl_overrides, write_manifest


# ---- data
def sft_files(cfg, prepare: bool = True) -> tuple[str, str | None]:
    """A ready parquet (data.train_file) or what data_prep makes from config.yaml's data section.

    Every sample is measured with the model's chat template before verl starts (verl would stop at the first
    one longer than sft.max_length, naming no file or row): data_prep names the source line, or skips and
    counts such samples with data.skip_bad. With prepare=False (--dry_run) nothing is written or measured.
    """
    check_files(cfg)
    v = cfg.sft.verl.data
    check = {"tokenizer": str(cfg.model.tokenizer_path or cfg.model.path), "max_length": int(cfg.sft.max_length),
             "chat_template_kwargs": OmegaConf.to_container(v.apply_chat_template_kwargs)
             if OmegaConf.select(v, "apply_chat_template_kwargs") else None} \
        if str(v.truncation) == "error" else None  # verl cuts long samples itself under left/right truncation
    given = cfg.data.train_file
    if given and str(given).endswith(".parquet"):
        files = [Path(given).resolve()] + ([Path(cfg.data.val_file).resolve()] if cfg.data.val_file else [])
        if prepare and check:
            from data_prep.stats import check_lengths

            for path in files:
                try:
                    check_lengths(path, check["tokenizer"], check["max_length"], check["chat_template_kwargs"])
                except ValueError as err:
                    raise SystemExit(f"[sft] {err}") from None
        return str(files[0]), (str(files[1]) if len(files) > 1 else None)
    folder = stage_dir(cfg, "data").resolve()
    if not prepare:
        return str(folder / "sft_train.parquet"), (str(folder / "sft_val.parquet") if cfg.data.val_size else None)
    from data_prep import prepare as prepare_data

    try:
        files = prepare_data(cfg.data, folder, **(check or {}))
    except ValueError as err:
        raise SystemExit(f"[sft] {err}") from None
    return str(Path(files["sft_train"]).resolve()), files.get("sft_val")


def check_files(cfg) -> None:
    for name in ("train_file", "val_file"):
        path = cfg.data[name]
        if path and not Path(path).is_file():
            raise SystemExit(f"[sft] data.{name}={path}: no such file")


# ---- the verl command
def trainer_keys(cfg, out: Path, train: str, val: str | None) -> list[str]:
    """verl.trainer.sft_trainer's overrides: config.yaml's sft.verl block, the kernels, data and trainer keys."""
    return verl_overrides(cfg.sft) + launch.kernel_keys(cfg, cfg.sft.verl.model) + [
        f"data.train_files={train}",
        f"data.val_files={val or 'null'}",
    ] + launch.trainer_keys(cfg, out, "sft", cfg.sft.resume_from)


def check_cpu(cfg) -> None:
    """What the CPU shim cannot do, said before anything starts."""
    if cfg.launch.device != "cpu":
        return
    if cfg.sft.verl.engine.strategy != "fsdp2":
        raise SystemExit(f"[sft] launch.device=cpu runs only with FSDP2 (got model.strategy="
                         f"{cfg.sft.verl.engine.strategy}); pass --strategy fsdp2")
    attn = OmegaConf.select(cfg.sft.verl, "model.override_config.attn_implementation") or launch.kernels(cfg)["attn"]
    if attn not in ("sdpa", "eager"):
        raise SystemExit(f"[sft] launch.device=cpu needs attention sdpa or eager (got {attn}); pass --attn sdpa")


# ---- checkpoints
def resume_dir(cfg, out: Path) -> Path | None:
    """The checkpoint verl will resume from: --resume_from, else the latest one in `out`."""
    if cfg.sft.resume_from:
        folder = Path(cfg.sft.resume_from)
        if not folder.name.startswith("global_step_") or not folder.is_dir():
            raise SystemExit(f"[sft] --resume_from {folder}: expected an existing verl checkpoint folder "
                             "named global_step_N (for example outputs/<run>/sft/global_step_200)")
        return folder
    step = launch.latest_step(out)
    return out / f"global_step_{step}" if step else None


def planned_steps(cfg, train: str) -> tuple[int, int]:
    """(steps per epoch, total steps) exactly as verl counts them: sampler and loader drop partial batches."""
    import pyarrow.parquet as pq

    v = cfg.sft.verl
    rows = pq.ParquetFile(train).metadata.num_rows
    cap = int(OmegaConf.select(v, "data.train_max_samples", default=-1) or -1)
    rows = min(rows, cap) if cap > 0 else rows
    sp = int(OmegaConf.select(v, "engine.ulysses_sequence_parallel_size", default=1) or 1)
    dp = int(cfg.launch.n_gpus) * int(cfg.launch.nnodes) // sp
    per_epoch = (rows // dp) // max(int(v.data.train_batch_size) // dp, 1)
    if per_epoch == 0:
        raise SystemExit(f"[sft] {train} has {rows} rows, fewer than one global batch "
                         f"(sft.batch_size={v.data.train_batch_size}): lower --batch_size")
    total = OmegaConf.select(v, "trainer.total_training_steps")
    return per_epoch, int(total) if total else per_epoch * int(v.trainer.total_epochs)


def set_aside_epoch_end_state(step_dir: Path, per_epoch: int) -> bool:
    """At an epoch boundary the saved loader state says 'epoch finished': let the next epoch start afresh."""
    if int(step_dir.name.rsplit("_", 1)[-1]) % per_epoch:
        return False
    moved = list(step_dir.glob("data_*.pt"))
    for state in moved:
        state.rename(state.with_suffix(".pt.epoch_end"))
    return bool(moved)


def prune(out: Path, keep, exported: Path | None = None) -> list[str]:
    """Keep the newest `keep` global_step_N folders (verl only prunes what the current attempt saved)
    and the one just exported."""
    if not keep or int(keep) <= 0:
        return []
    steps = sorted(out.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    gone = [p for p in steps[: max(len(steps) - int(keep), 0)] if not (exported and p.resolve() == exported.resolve())]
    for folder in gone:
        shutil.rmtree(folder)
    return [p.name for p in gone]


# ---- the stage
def run(cfg) -> int:
    out = stage_dir(cfg, "sft")
    if cfg.model.init:  # warm start from an earlier stage's export, a checkpoint or an HF folder
        from stages.export import resolve_init

        try:
            cfg.model.path = resolve_init(cfg.model.init)
        except (FileNotFoundError, ValueError) as err:  # each names the folder and what is missing
            raise SystemExit(f"[sft] {err}") from None
    check_cpu(cfg)
    # in seconds, before data prep (a tokenizer over every sample) or verl (~25 s of imports): what the user named,
    # every verl key and value against verl's own schema (with the file names data prep will write), the machine
    check_files(cfg)
    start = None if cfg.run.dry_run else resume_dir(cfg, out)
    launch.check_verl_keys(cfg, "sft", "verl.trainer.sft_trainer", trainer_keys(cfg, out, *sft_files(cfg, False)))
    if not cfg.run.dry_run:
        launch.check_device(cfg, "sft")
    train, val = sft_files(cfg, prepare=not cfg.run.dry_run)
    cmd = launch.torchrun_command(cfg, "verl.trainer.sft_trainer", trainer_keys(cfg, out, train, val), out)
    if cfg.run.dry_run:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in launch.CPU_ENV.items()) + " " if cfg.launch.device == "cpu" else ""
        print(env + shlex.join(cmd))
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    done = int(start.name.rsplit("_", 1)[-1]) if start else 0
    per_epoch, total = planned_steps(cfg, train)
    if done >= total:
        print(f"[sft] {start} is step {done} of {total}: training is complete, exporting it")
    else:
        record = dict(stage="sft", base_model=str(cfg.model.path), lora=bool(cfg.model.use_lora), train_file=train,
                      val_file=val)
        supervise.say_if_interrupted(out, "sft")
        write_manifest(out, status="running", **record)
        if start and set_aside_epoch_end_state(start, per_epoch):
            print(f"[sft] resuming at the end of epoch {done // per_epoch} (step {done}): epoch "
                  f"{done // per_epoch + 1} starts with a fresh data loader")
        print(f"[sft] {total - done} step(s) to train" + (f" from step {done}" if done else "")
              + f" ({per_epoch} per epoch, batch {cfg.sft.verl.data.train_batch_size}) into {out}", flush=True)
        result = supervise.run_trainer(cmd, launch.environment(cfg, out), out, "sft", total, done)
        if result.rc:
            return result.fail(**record)
        if int(cfg.launch.node_rank) != 0:  # verl's rank 0 (on node 0) writes the full checkpoint
            print(f"[sft] node {cfg.launch.node_rank} done; node 0 exports and writes the manifest")
            return 0
        if launch.latest_step(out) < total:  # verl exits 0 when it runs out of data early: never pass that off
            print(f"[sft] verl stopped at step {launch.latest_step(out)} of {total} without an error; see its log "
                  f"{result.log}. Rerun to resume from {out}", file=sys.stderr)
            write_manifest(out, status="failed", **record, failure=dict(result.record(), kind="stopped_early"))
            return 1
        start = out / f"global_step_{launch.latest_step(out)}"
    return export_and_record(cfg, out, start, train, val)


def export_and_record(cfg, out: Path, step_dir: Path, train: str, val: str | None) -> int:
    """Export the checkpoint to out/hf, prune old checkpoints, write the `done` manifest."""
    from stages.export import export

    if int(cfg.launch.node_rank) != 0:
        return 0
    exported = export(step_dir, out, base_model=str(cfg.model.path))
    pruned = prune(out, OmegaConf.select(cfg.sft.verl, "trainer.max_ckpt_to_keep"), step_dir)
    metrics = launch.read_metrics(out)
    # verl logs a NaN/inf gradient norm as JSON null (and skips that optimizer step)
    norms = {s: m["train/grad_norm"] for s, m in metrics.items() if "train/grad_norm" in m}
    nonfinite = [s for s, norm in norms.items() if norm is None or not math.isfinite(norm)]
    losses = [metrics[s]["train/loss"] for s in sorted(metrics) if "train/loss" in metrics[s]]
    step = int(step_dir.name.rsplit("_", 1)[-1])
    write_manifest(out, stage="sft", status="done", base_model=str(cfg.model.path), lora=exported["lora"],
                   global_step=step, checkpoint=str(step_dir.resolve()), hf_model=exported["hf"],
                   adapter=exported.get("adapter"), train_file=train, val_file=val,
                   metrics_files=[str(p.resolve()) for p in launch.metric_files(out)],
                   tensorboard_dir=str((out / "tensorboard").resolve()), steps_logged=len(metrics),
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                   skipped_nonfinite_steps=len(nonfinite), config=OmegaConf.to_container(cfg, resolve=True))
    add_report_section(cfg, out, metrics, step, train, exported)
    print(f"[sft] step {step}; exported {exported['hf']}"
          + (f" and {exported['adapter']}" if exported.get("adapter") else "")
          + (f"; removed old checkpoints {', '.join(pruned)}" if pruned else "")
          + (f"; {len(nonfinite)} step(s) skipped for a non-finite gradient norm" if nonfinite else ""))
    return 0


def add_report_section(cfg, out: Path, metrics: dict[int, dict], step: int, train: str, exported: dict) -> None:
    """report.md's SFT section: what was trained from what, steps, loss, time, and the loss curve (a PNG)."""
    import json

    import pyarrow.parquet as pq

    rows = [{"step": s, "loss": m["train/loss"]} for s, m in sorted(metrics.items()) if m.get("train/loss") is not None]
    figures = (report.plot_vs_step(rows, {"loss": "training loss"}, out.parent / "report" / "figures", "sft")
               if rows else [])
    log = out / "logs" / "attempts.jsonl"
    attempts = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    v, launched = cfg.sft.verl, f"{cfg.launch.nnodes} x {cfg.launch.n_gpus} {cfg.launch.device}"
    kind = f"LoRA rank {cfg.model.lora_rank}" if exported["lora"] else "full fine-tuning"
    table = report.table(["steps", "epochs", "train rows", "batch", "lr", "loss first", "loss last", "attempts",
                          "trainer seconds"],
                         [[step, v.trainer.total_epochs, pq.ParquetFile(train).metadata.num_rows,
                           v.data.train_batch_size, f"{v.optim.lr:g}", rows[0]["loss"] if rows else "n/a",
                           rows[-1]["loss"] if rows else "n/a", len(attempts),
                           f"{sum(a['seconds'] for a in attempts):.1f}"]])
    report.add_section(out.parent, "sft", "Supervised fine-tuning",
                       f"`{cfg.model.path}` → `{exported['hf']}` ({kind}; verl's sft_trainer on {launched}; "
                       f"data `{train}`). Trainer seconds: wall time of every attempt, verl's start-up included "
                       f"(`sft/logs/attempts.jsonl`).\n\n{table}", figures)
