"""`./train.sh` / `python -m stages`: flags and environment variables, turned into config.yaml overrides.

FLAGS is the one table of flag ↔ environment variable ↔ config key ↔ help. A flag's environment variable
stands in for the flag when the flag is not given; `key=value` arguments come last and win over both. A
`--recipe` file's settings come first, so everything else wins over them. `{stage}` in a key is the running stage's section for such flags
(stages/registry.py: sft for sft/ei/all/..., grpo for grpo).

    parse(["--lr", "2e-5"], {"N_GPUS": "8"})  ->  ("sft", ["launch.n_gpus=8", "sft.lr=2e-5"])
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from stages import registry

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Flag:
    name: str               # --name
    key: str                # config key; "{stage}" = the running stage's flag section
    env: str | None = None  # environment variable that sets it when the flag is not given
    help: str = ""
    switch: str | None = None  # a switch (no value) that sets `key` to this; its env var takes a boolean


FLAGS = (
    Flag("init", "model.init", None, "warm start: a run/stage folder, manifest, verl global_step_N folder or HF model"),
    Flag("recipe", "run.recipe", "RECIPE", "a YAML file of config.yaml settings (recipes/): under every flag and key=value"),
    Flag("dry_run", "run.dry_run", None, "print the command and resolved config, run nothing", switch="true"),
    Flag("model", "model.path", "MODEL_PATH", "HF model id or folder"),
    Flag("tokenizer", "model.tokenizer_path", "TOKENIZER_PATH", "tokenizer, if not the model's"),
    Flag("train_data", "data.train_file", "TRAIN_DATA", "a ready parquet, or a JSON/JSONL file of your own"),
    Flag("val_data", "data.val_file", "VAL_DATA", "validation file"),
    Flag("dataset", "data.dataset", None, "gsm8k | math | user (with --stage eval: what to evaluate on)"),
    Flag("template", "data.template", None, "gsm8k | r1 | math"),
    Flag("train_size", "data.train_size", "TRAIN_SIZE",
         "seeded subset of N training examples; a comma list sweeps (with --stage sweep)"),
    Flag("val_size", "data.val_size", None, "validation rows carved out of train"),
    Flag("max_length", "{stage}.max_length", "MAX_LENGTH", "longest SFT sample in tokens"),
    Flag("batch_size", "{stage}.batch_size", "BATCH_SIZE", "global batch size (SFT: samples; GRPO: prompts)"),
    Flag("micro_batch_size", "{stage}.micro_batch_size", "MICRO_BATCH_SIZE", "per-GPU micro batch"),
    Flag("lr", "{stage}.lr", "LEARNING_RATE", "learning rate; a comma list sweeps (with --stage sweep)"),
    Flag("epochs", "{stage}.epochs", "NUM_EPOCHS", "epochs"),
    Flag("warmup_ratio", "{stage}.warmup_ratio", "WARMUP_RATIO", "share of steps with a rising lr"),
    Flag("weight_decay", "{stage}.weight_decay", "WEIGHT_DECAY", "AdamW weight decay"),
    Flag("grad_clip", "{stage}.grad_clip", "GRAD_CLIP", "gradient norm clip"),
    Flag("save_freq", "{stage}.save_freq", None, "checkpoint every N steps (-1: at the end)"),
    Flag("resume_from", "{stage}.resume_from", None, "a global_step_N folder (default: the latest one)"),
    Flag("n_gpus", "launch.n_gpus", "N_GPUS", "GPUs per node"),
    Flag("nnodes", "launch.nnodes", "NNODES", "nodes"),
    Flag("node_rank", "launch.node_rank", "NODE_RANK", "this node's rank"),
    Flag("master_addr", "launch.master_addr", "MASTER_ADDR", "node 0's address"),
    Flag("master_port", "launch.master_port", "MASTER_PORT", "node 0's port"),
    Flag("device", "launch.device", None, "cuda | cpu"),
    Flag("strategy", "model.strategy", "STRATEGY", "fsdp or fsdp2"),
    Flag("use_lora", "model.use_lora", "USE_LORA", "LoRA instead of full fine-tuning", switch="true"),
    Flag("no_lora", "model.use_lora", None, "full fine-tuning", switch="false"),
    Flag("lora_rank", "model.lora_rank", "LORA_RANK", "LoRA rank"),
    Flag("lora_alpha", "model.lora_alpha", "LORA_ALPHA", "LoRA alpha"),
    Flag("lora_targets", "model.lora_targets", "LORA_TARGETS", "LoRA target modules"),
    Flag("param_offload", "model.param_offload", "PARAM_OFFLOAD", "offload parameters to CPU", switch="true"),
    Flag("optimizer_offload", "model.optimizer_offload", "OPTIMIZER_OFFLOAD", "offload optimizer state to CPU",
         switch="true"),
    Flag("no_grad_ckpt", "model.gradient_checkpointing", "GRADIENT_CHECKPOINTING", "gradient checkpointing off",
         switch="false"),
    Flag("attn", "model.attn_implementation", None, "auto | sdpa | eager | ladder_varlen | flash_attention_2"),
    Flag("compile", "model.compile", None, "torch.compile each decoder layer (SFT)", switch="true"),
    Flag("output_dir", "run.output_dir", "OUTPUT_DIR", "where run folders go"),
    Flag("run_name", "run.name", "RUN_NAME", "outputs/<run_name>/…"),
    Flag("time_limit", "run.time_limit", None, "stop a trainer this many seconds after the command started "
         "(GRPO saves a checkpoint first); rerun to resume"),
    Flag("until", "run.until", None, "--stage all: stop after this stage (sft | ei | grpo) and its eval; rerun without it to go on"),
    Flag("skip_bad", "data.skip_bad", None, "skip (and count) bad records instead of stopping", switch="true"),
    Flag("answer_only", "data.answer_only", None, "supervise only the final answer", switch="true"),
    Flag("backend", "eval.backend", None, "auto | vllm | hf"),
    Flag("limit", "eval.limit", None, "evaluate the first N problems"),
    Flag("max_new_tokens", "eval.max_new_tokens", None, "generation length"),
    Flag("eval_batch_size", "eval.batch_size", None, "hf backend: prompts per generate() call"),
    Flag("all_checkpoints", "eval.all_checkpoints", None, "evaluate every saved checkpoint", switch="true"),
    Flag("rounds", "ei.rounds", None, "expert-iteration rounds"),
    Flag("samples", "ei.samples", None, "expert-iteration samples per question"),
    Flag("questions", "ei.questions", None, "expert-iteration questions per round (a seeded subset)"),
    Flag("rollout", "grpo.rollout", None, "auto | vllm | hf"),
)
SWEEP_KEYS = {"train_size": "sweep.train_sizes", "lr": "sweep.lrs"}  # comma lists, read by stages/sweep.py


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.sh", description="ladder: SFT -> expert iteration -> GRPO on verl.",
        epilog="Any key=value argument is a config override (see config.yaml's header). Environment variables: "
               + ", ".join(f"{f.env} (--{f.name})" for f in FLAGS if f.env))
    p.add_argument("--stage", choices=registry.names(), default="sft",
                   help="; ".join(f"{s.name}: {s.help}" for s in registry.STAGES))
    p.add_argument("--demo", action="store_true", help="the embedded CPU demo (same as --stage demo)")
    for f in FLAGS:
        text = f.help + (f" ({f.env})" if f.env else "") + f" [{f.key}]"
        if f.switch:
            p.add_argument(f"--{f.name}", action="store_true", help=text)
        else:
            p.add_argument(f"--{f.name}", default=None, help=text)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def from_environment(flag: Flag, environ) -> str | None:
    """The value flag's environment variable gives it (a switch's variable is a boolean), or None."""
    raw = environ.get(flag.env or "", "").strip()
    if not raw:
        return None
    if not flag.switch:
        return raw
    if raw.lower() not in TRUE + FALSE:
        raise SystemExit(f"ladder: {flag.env}={raw}: use 1/true/yes or 0/false/no")
    on = raw.lower() in TRUE
    # USE_LORA=1 means --use_lora; GRADIENT_CHECKPOINTING=0 means --no_grad_ckpt: the variable names the key
    return "true" if on else "false"


def parse(argv: list[str], environ=None) -> tuple[str, list[str]]:
    """(stage, overrides): a flag's own value, else its environment variable's; then the key=value arguments."""
    environ = os.environ if environ is None else environ
    args = parser().parse_intermixed_args(argv)
    stage = "demo" if args.demo else args.stage
    section = registry.get(stage).flags
    overrides = []
    for f in FLAGS:
        given = getattr(args, f.name)
        value = (f.switch if given else None) if f.switch else given
        env_value = from_environment(f, environ) if f.env else None
        if value is None and env_value is None:
            continue
        key = f.key
        if "{stage}" in key:
            if section is None:
                if value is None:  # an environment variable meant for training stages: said, not applied
                    print(f"ladder: {f.env} does not apply to --stage {stage}; ignored", file=sys.stderr)
                    continue
                raise SystemExit(f"--{f.name} does not apply to --stage {stage}")
            key = key.format(stage=section)
        if stage == "sweep" and f.name in SWEEP_KEYS:
            key = SWEEP_KEYS[f.name]
        if stage == "eval" and f.name == "dataset":
            key = "eval.dataset"  # what to evaluate on, not what to train on
        value = env_value if value is None else value
        # one Hydra value: a sweep's comma list, or a path with spaces, would otherwise be split
        if (" " in value or "," in value and key in SWEEP_KEYS.values()) and value[0] not in "'\"":
            value = f"'{value}'"
        overrides.append(f"{key}={value}")
    recipe = next((o.split("=", 1)[1].strip("'") for o in overrides if o.startswith("run.recipe=")), None)
    return stage, (recipe_overrides(recipe) if recipe else []) + overrides + list(args.overrides)


def recipe_overrides(path: str) -> list[str]:
    """A recipe file's settings as overrides, placed before everything the user sets (so theirs win)."""
    from omegaconf import OmegaConf

    from stages.config import flatten

    if not os.path.isfile(path):
        raise SystemExit(f"ladder: --recipe {path}: no such file")
    try:
        recipe = OmegaConf.load(path)
    except Exception as err:  # a YAML syntax error names its line and column
        raise SystemExit(f"ladder: --recipe {path}: not YAML ({err})") from None
    if not isinstance(recipe, type(OmegaConf.create({}))):
        raise SystemExit(f"ladder: --recipe {path}: expected a mapping of config.yaml sections")
    return flatten(recipe)
