"""Flags of `./train.sh` / `python -m stages`, turned into config.yaml overrides.

train.sh turns environment variables (MODEL_PATH, N_GPUS, …) into these same flags ahead of the
user's own, so a flag given on the command line wins over its environment variable.
"""
from __future__ import annotations

import argparse

STAGES = ("sft", "eval", "ei", "grpo", "all", "data", "sweep", "demo")

# flag -> config key; "{stage}" is the running stage's section (sft, ei or grpo)
KEYS = {
    "model": "model.path",
    "tokenizer": "model.tokenizer_path",
    "train_data": "data.train_file",
    "val_data": "data.val_file",
    "dataset": "data.dataset",
    "template": "data.template",
    "train_size": "data.train_size",
    "val_size": "data.val_size",
    "max_length": "{stage}.max_length",
    "batch_size": "{stage}.batch_size",
    "micro_batch_size": "{stage}.micro_batch_size",
    "lr": "{stage}.lr",
    "epochs": "{stage}.epochs",
    "warmup_ratio": "{stage}.warmup_ratio",
    "weight_decay": "{stage}.weight_decay",
    "grad_clip": "{stage}.grad_clip",
    "save_freq": "{stage}.save_freq",
    "resume_from": "{stage}.resume_from",
    "n_gpus": "launch.n_gpus",
    "nnodes": "launch.nnodes",
    "node_rank": "launch.node_rank",
    "master_addr": "launch.master_addr",
    "master_port": "launch.master_port",
    "device": "launch.device",
    "strategy": "model.strategy",
    "lora_rank": "model.lora_rank",
    "lora_alpha": "model.lora_alpha",
    "lora_targets": "model.lora_targets",
    "attn": "model.attn_implementation",
    "output_dir": "run.output_dir",
    "run_name": "run.name",
    "backend": "eval.backend",
    "limit": "eval.limit",
    "max_new_tokens": "eval.max_new_tokens",
    "eval_batch_size": "eval.batch_size",
    "rounds": "ei.rounds",
    "samples": "ei.samples",
    "rollout": "grpo.rollout",
}
SWITCHES = {  # flag -> (config key, value)
    "use_lora": ("model.use_lora", "true"),
    "no_lora": ("model.use_lora", "false"),
    "param_offload": ("model.param_offload", "true"),
    "optimizer_offload": ("model.optimizer_offload", "true"),
    "no_grad_ckpt": ("model.gradient_checkpointing", "false"),
    "compile": ("model.compile", "true"),
    "skip_bad": ("data.skip_bad", "true"),
    "answer_only": ("data.answer_only", "true"),
    "all_checkpoints": ("eval.all_checkpoints", "true"),
}
HELP = {
    "model": "HF model id or folder (MODEL_PATH)", "lr": "learning rate (LEARNING_RATE)",
    "epochs": "epochs (NUM_EPOCHS)", "batch_size": "global batch size in samples (BATCH_SIZE)",
    "strategy": "fsdp or fsdp2 (STRATEGY)", "init": "warm start: a run/stage folder, manifest, "
    "verl global_step_N folder or HF model", "train_size": "seeded subset of N training examples; "
    "a comma list sweeps (with --stage sweep)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.sh", description="ladder: SFT -> expert iteration -> GRPO on verl.",
        epilog="Any key=value argument is a config override (see config.yaml's header).")
    p.add_argument("--stage", choices=STAGES, default="sft")
    p.add_argument("--init", default=None, help=HELP["init"])
    p.add_argument("--dry_run", action="store_true", help="print the command and resolved config, run nothing")
    p.add_argument("--demo", action="store_true", help="the embedded CPU demo (same as --stage demo)")
    for flag in KEYS:
        p.add_argument(f"--{flag}", default=None, help=HELP.get(flag, KEYS[flag]))
    for flag, (key, value) in SWITCHES.items():
        p.add_argument(f"--{flag}", action="store_true", help=f"{key}={value}")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Return the parsed flags and the override list they stand for (flags first, then key=value)."""
    args = parser().parse_intermixed_args(argv)
    if args.demo:
        args.stage = "demo"
    section = {"ei": "sft", "all": "sft", "sweep": "sft", "demo": "sft", "data": "sft"}.get(args.stage, args.stage)
    overrides = []
    for flag, key in KEYS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if "{stage}" in key:
            if section not in ("sft", "grpo"):
                raise SystemExit(f"--{flag} does not apply to --stage {args.stage}")
            key = key.format(stage=section)
        if flag in ("train_size", "lr") and args.stage == "sweep":
            continue  # the sweep reads the comma list itself
        if flag == "dataset" and args.stage == "eval":
            key = "eval.dataset"  # what to evaluate on, not what to train on
        overrides.append(f"{key}={value}")
    for flag, (key, value) in SWITCHES.items():
        if getattr(args, flag):
            overrides.append(f"{key}={value}")
    return args, overrides + list(args.overrides)
