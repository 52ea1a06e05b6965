"""GRPO stage: config.yaml's `grpo:` → `python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo …`,
rewarded by ladder's own grader (rewards.combined_score: strict correctness, optionally format and length terms),
then export and a manifest.

    ./train.sh --stage grpo --init outputs/<run>/sft                        # one GPU
    ./train.sh --stage grpo --init outputs/<run>/sft --rollout hf           # no vLLM: transformers rollout
    N_GPUS=8 ./train.sh --stage grpo --init outputs/<run>/sft               # one node, 8 GPUs
    N_GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train.sh --stage grpo --init …   # on each node,
        its own NODE_RANK: one Ray cluster, node 0 the head (stages/ray_cluster.py); outputs/ must be one
        shared folder, as every rank writes its checkpoint shard there
    ./train.sh --stage grpo --init outputs/<run>/sft --dry_run             # print the command and config

Each step samples `grpo.group_size` completions for each of `grpo.batch_size` training prompts, scores
them with rewards.combined_score (`grpo.rewards`: by default 1 for a strict-correct answer, else 0), and
normalises rewards within each prompt's group (GRPO, outcome reward, no critic). Validation is greedy on
the test split and graded the same way (val-core/*/acc is strict correctness whatever the weights).
Three keys choose among the variants peers offer (LOSSES and variant_keys below give verl's keys; all
checked before anything starts, all visible with --dry_run):
  - `grpo.loss`: dapo (default: token-level mean, clip-higher 0.2/0.28), grpo (DeepSeekMath: each
    response's token mean, then the mean over responses), dr_grpo (token sums / max_response_length, no
    division by the group's std);
  - `grpo.overlong`: none, filter (truncated responses add no gradient: plugins/overlong_filter.py zeroes
    their response_mask for the actor update), penalty (DAPO's soft overlong punishment over the last
    `grpo.overlong_buffer` tokens, the `length` term of rewards/terms.py);
  - `grpo.rewards`: {correct, format, length} weights of rewards/terms.py's terms; each term is logged per
    sample in the rollout dumps (reward_correct, reward_format, reward_length) and averaged per step in
    the report. The token count the length term needs reaches the reward function through
    plugins/grpo_variants.py's reward manager (verl 0.9.1's managers pass none).
verl 0.9.1's dynamic sampling (algorithm.filter_groups: drop or resample groups whose rewards are all equal)
exists only in its v1 trainer (TransferQueue); with the legacy trainer ladder runs, the key is refused.
Ladder's offline counterpart, `grpo.prompts: mixed`, trains on the questions expert iteration's last round
(the `--init` EI stage) answered right sometimes but not always, from its round_N/solve.parquet.
What ladder sets on top of verl's defaults (all visible with --dry_run):
  - the legacy trainer (`trainer.use_v1=false`: verl's v1 trainer needs the TransferQueue package);
  - rollout `auto`: vLLM when it imports, else `hf`, ladder's transformers backend (plugins/hf_rollout.py,
    registered in every Ray process through VERL_USE_EXTERNAL_MODULES; always tensor parallel 1);
  - KL as a loss (low_var_kl, 0.001) against the initial policy, no KL in the reward, no entropy bonus;
    lr 1e-6, response length 1024, dynamic batching, torch.compile off; the actor's attention is
    model.attn_implementation as the SFT stage resolves it (`auto`: ladder_varlen on CUDA without
    flash-attn, sdpa on CPU), and so is the fused loss (model.fused_ce: plugins/fused_ce.py in the update and
    the old/reference log-prob passes); liger and compile are SFT-only (not measured in GRPO);
  - the reference policy is the `--init` model. With LoRA (`--use_lora`) verl's reference is the actor
    with its adapter disabled, so the init must already hold the SFT weights: resolve_init hands over
    the SFT stage's *merged* export. vLLM then loads real weights (`rollout.load_format=safetensors`) and
    takes the adapter; the hf rollout takes merged weights (`model.lora.merge=true`). The manifest says which;
  - checkpoints hold `huggingface/` weights; loggers: console + TensorBoard + JSONL, wandb when
    WANDB_PROJECT is set; resume `auto` from outputs/<run>/grpo.
Outputs: outputs/<run>/grpo/{global_step_N/, logs/metrics.K.jsonl, tensorboard/, hf/ (+ adapter/ for
LoRA), manifest.json}.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

from omegaconf import OmegaConf

from stages import launch, ray_cluster, registry, supervise
from stages.config import REPO, read_manifest, stage_dir, verl_overrides, write_manifest

RL_COLUMNS = ("data_source", "prompt", "reward_model")
EXPIRATION_ENV = "MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP"  # verl.utils.checkpoint.should_save_ckpt_esi


# ---- inputs: data, rollout backend, initial policy
def rl_files(cfg, prepare: bool = True) -> tuple[str, str]:
    """RL parquet files: data.train_file/val_file when given, else data_prep's rl_train / rl_test.

    With prepare=False (--dry_run) nothing is written: the paths data_prep would write are named.
    """
    import pyarrow.parquet as pq

    train, val = cfg.data.train_file, cfg.data.val_file
    if not train:
        folder = stage_dir(cfg, "data").resolve()
        if not prepare:
            return str(folder / "rl_train.parquet"), str(val or folder / "rl_test.parquet")
        from data_prep import prepare as prepare_data

        files = prepare_data(cfg.data, folder)
        if "rl_train" not in files:
            raise SystemExit(f"[grpo] data.dataset={cfg.data.dataset} makes no RL rows: use gsm8k or math")
        train, val = files["rl_train"], val or files["rl_test"]
    if not val:
        raise SystemExit(f"[grpo] data.train_file={train} is given but no data.val_file: GRPO validates on a "
                         "held-out RL parquet (data_prep's rl_test.parquet); pass --val_data")
    for path in (train, val):
        if not Path(path).is_file():
            raise SystemExit(f"[grpo] {path}: no such file")
        missing = [c for c in RL_COLUMNS if c not in pq.read_schema(path).names]
        if missing:
            raise SystemExit(f"[grpo] {path} lacks {missing}: GRPO reads RL rows (data_prep's rl_*.parquet: "
                             "prompt, data_source, reward_model.ground_truth), not SFT messages")
    return str(Path(train).resolve()), str(Path(val).resolve())


PROMPTS = ("all", "mixed")  # grpo.prompts


def mixed_prompts(cfg, train: str, init_info: dict, out: Path, dry_run: bool) -> tuple[str, dict | None]:
    """grpo.prompts=mixed: the training rows whose question the init policy answered right sometimes but not
    always in expert iteration's last round (round_N/solve.parquet: 0 < correct < samples). A GRPO group whose
    rewards are all equal has zero advantage, so no gradient: in the sixth session's run 33-53% of the groups
    each step were such. Writes out/train_mixed.parquet and returns it with the counts; all: the file as is."""
    import pandas as pd

    from stages.ei import SOLVE_FILE, round_dirs

    choice = str(cfg.grpo.prompts)
    if choice not in PROMPTS:
        raise SystemExit(f"[grpo] grpo.prompts={choice}: use one of {', '.join(PROMPTS)}")
    if choice == "all":
        return train, None
    where = Path(init_info.get("init_dir") or "")
    if init_info.get("init_stage") != "ei":
        raise SystemExit(f"[grpo] grpo.prompts=mixed keeps the questions expert iteration's last round solved "
                         f"sometimes: --init must be an EI stage (outputs/<run>/ei), not {init_info['init']} "
                         f"(stage {init_info.get('init_stage')}); or grpo.prompts=all")
    rounds = [d / SOLVE_FILE for d in round_dirs(where) if (d / SOLVE_FILE).is_file()]
    if not rounds:
        raise SystemExit(f"[grpo] grpo.prompts=mixed: no round_*/{SOLVE_FILE} in {where} (an EI run older than "
                         "this key writes none): rerun the EI round, or grpo.prompts=all")
    solve = pd.read_parquet(rounds[-1])
    mixed = set(solve.loc[(solve["correct"] > 0) & (solve["correct"] < solve["samples"]), "index"].tolist())
    picked = out / "train_mixed.parquet"
    counts = {"solve_file": str(rounds[-1]), "sampled": len(solve), "mixed": len(mixed),
              "all_right": int((solve["correct"] == solve["samples"]).sum()), "none_right": int((solve["correct"] == 0).sum())}
    if dry_run:
        print(f"[grpo] grpo.prompts=mixed: {counts['mixed']} of {counts['sampled']} questions sampled in "
              f"{rounds[-1]} -> {picked}")
        return str(picked), counts
    rows = pd.read_parquet(train)
    index = rows["extra_info"].map(lambda info: (dict(info) if info is not None else {}).get("index"))
    if index.isna().any():
        raise SystemExit(f"[grpo] grpo.prompts=mixed matches rows by extra_info.index, which {train} lacks in row "
                         f"{int(index.isna().values.argmax())}: use data_prep's rl_train.parquet, or grpo.prompts=all")
    keep = rows[index.isin(mixed).values].reset_index(drop=True)
    counts["rows"] = len(keep)
    if len(keep) < int(cfg.grpo.batch_size):
        raise SystemExit(f"[grpo] grpo.prompts=mixed leaves {len(keep)} of {len(rows)} training prompts ({counts}), "
                         f"fewer than grpo.batch_size={cfg.grpo.batch_size}: sample more questions in EI "
                         "(ei.questions, ei.samples), or grpo.prompts=all")
    out.mkdir(parents=True, exist_ok=True)
    keep.to_parquet(picked, index=False)
    print(f"[grpo] grpo.prompts=mixed: {len(keep)} of {len(rows)} training prompts (of {counts['sampled']} "
          f"sampled in {rounds[-1]}: {counts['all_right']} always right, {counts['none_right']} never)", flush=True)
    return str(picked.resolve()), counts


def fit_epochs(cfg, train: str, dry_run: bool = False) -> None:
    """grpo.total_steps beyond grpo.epochs' worth of batches: verl's loop would end with the data, before its
    last step, so without the last step's save and validation. Raise grpo.epochs to cover the steps asked for
    (verl's train loader drops the last partial batch: rows // batch_size steps an epoch)."""
    import math

    import pyarrow.parquet as pq

    if not Path(train).is_file():  # --dry_run before data_prep: nothing to count
        return
    per_epoch = pq.ParquetFile(train).metadata.num_rows // int(cfg.grpo.batch_size)
    if per_epoch < 1:
        said = f"[grpo] {train} has fewer rows than grpo.batch_size={cfg.grpo.batch_size}: not one step"
        if not dry_run:
            raise SystemExit(said)
        print(f"{said} (--dry_run goes on; a run stops here)", file=sys.stderr)
        return
    if cfg.grpo.total_steps is None:
        return
    need = math.ceil(int(cfg.grpo.total_steps) / per_epoch)
    if need > int(cfg.grpo.epochs):
        print(f"[grpo] grpo.total_steps={cfg.grpo.total_steps} at {per_epoch} steps an epoch: grpo.epochs "
              f"{cfg.grpo.epochs} -> {need}", flush=True)
        cfg.grpo.epochs = need


def rollout_name(cfg) -> str:
    name = str(cfg.grpo.rollout)
    if name == "auto":
        return "vllm" if find_spec("vllm") else "hf"
    if name not in ("vllm", "hf"):
        raise SystemExit(f"[grpo] grpo.rollout={name}: use auto, vllm or hf")
    if name == "vllm" and not find_spec("vllm"):
        raise SystemExit("[grpo] grpo.rollout=vllm but vllm does not import here: install ladder[gpu], "
                         "or use --rollout hf")
    return name


def initial_policy(cfg) -> tuple[str, dict]:
    """The HF folder to start from (--init through resolve_init, else model.path) and what it was.

    An --init inside outputs/<run> also names this stage's run, so GRPO lands in outputs/<run>/grpo.
    """
    from stages.export import resolve_init, run_folder

    given = str(cfg.model.init or cfg.model.path)
    run = run_folder(given) if cfg.model.init else None
    if run is not None and not cfg.run.name:
        cfg.run.output_dir, cfg.run.name = str(run.parent), run.name
    info = {"init": given}
    folder = Path(given)
    # a stage, or a run's stages, the most advanced first
    candidates = [folder] + [folder / s for s in reversed(registry.trainers()) if s != "grpo"]
    manifest = next((c / "manifest.json" for c in candidates if (c / "manifest.json").is_file()), None)
    if manifest is not None:  # what the init stage was: LoRA runs hand over their merged export
        m = read_manifest(manifest)
        info.update(init_stage=m.get("stage"), init_was_lora=bool(m.get("lora")), init_base_model=m.get("base_model"),
                    init_dir=str(manifest.parent))
    return resolve_init(given), info


# ---- the verl command
def external_modules(cfg) -> str:
    """Modules verl imports in every process: the hf rollout, on CPU the test platform shims, with
    grpo.overlong=filter the actor-update wrapper that masks truncated responses (importing it turns it on),
    then the user's grpo.plugins (importable where verl's workers run: the repo is on their PYTHONPATH)."""
    mods = list(launch.CPU_RL_PLUGINS) if cfg.launch.device == "cpu" else []
    mods.append("plugins.hf_rollout")
    if str(cfg.grpo.overlong) == "filter":
        mods.append("plugins.overlong_filter")
    extra = cfg.grpo.plugins or []
    if isinstance(extra, str) or not all(isinstance(m, str) and m and "," not in m for m in extra):
        raise SystemExit(f"[grpo] grpo.plugins={extra!r}: a list of module names, e.g. grpo.plugins=[my_pkg.rm]")
    return ",".join(mods + [m for m in extra if m not in mods])


# ---- grpo.loss / grpo.overlong / grpo.rewards → verl's keys
ACTOR = "actor_rollout_ref.actor."
# Each variant sets the same keys, so --dry_run shows every one of them. TRL's GRPOConfig names the same choices
# loss_type (grpo / dapo / dr_grpo), scale_rewards ("group" divides by the group's std, "none" does not) and
# epsilon / epsilon_high (the clip range).
LOSSES = {
    # DeepSeekMath's GRPO: the mean over each response's tokens, then over responses (a long response's tokens
    # weigh less); advantages divided by the group's std. TRL: loss_type="grpo", scale_rewards="group"
    "grpo": {ACTOR + "loss_agg_mode": "seq-mean-token-mean", "algorithm.norm_adv_by_std_in_grpo": True,
             ACTOR + "clip_ratio_low": 0.2, ACTOR + "clip_ratio_high": 0.2, ACTOR + "loss_scale_factor": None},
    # DAPO (Yu et al. 2025): the mean over every token of the mini-batch (verl's default aggregation), and
    # clip-higher: the ratio may rise to 1.28 before the clip. TRL: loss_type="dapo", epsilon_high=0.28
    "dapo": {ACTOR + "loss_agg_mode": "token-mean", "algorithm.norm_adv_by_std_in_grpo": True,
             ACTOR + "clip_ratio_low": 0.2, ACTOR + "clip_ratio_high": 0.28, ACTOR + "loss_scale_factor": None},
    # Dr. GRPO (Liu et al. 2025): token sums over responses divided by one constant, max_response_length (verl's
    # null would mean each micro-batch's padded width, which dynamic batching varies), and no std division.
    # TRL: loss_type="dr_grpo", scale_rewards="none"
    "dr_grpo": {ACTOR + "loss_agg_mode": "seq-mean-token-sum-norm", "algorithm.norm_adv_by_std_in_grpo": False,
                ACTOR + "clip_ratio_low": 0.2, ACTOR + "clip_ratio_high": 0.2,
                ACTOR + "loss_scale_factor": "grpo.max_response_length"},  # the value, in variant_keys
}
OVERLONG = ("none", "filter", "penalty")
REWARD_KWARGS = "reward.custom_reward_function.reward_kwargs."


def reward_weights(cfg) -> dict[str, float]:
    """grpo.rewards with its defaults, checked: under grpo.overlong=penalty a length weight of 0 means 1.0
    (DAPO's penalty factor); a non-zero length weight needs grpo.overlong=penalty."""
    from rewards.terms import check_weights

    g = cfg.grpo
    given = g.get("rewards")
    if given is not None and not OmegaConf.is_dict(given):
        raise SystemExit(f"[grpo] grpo.rewards={given!r}: a mapping of term weights, e.g. "
                         "grpo.rewards.format=0.1 (terms: correct, format, length)")
    weights = OmegaConf.to_container(given, resolve=True) if given is not None else {}
    limits = {}
    if str(g.overlong) == "penalty":
        buffer, limit = g.overlong_buffer, g.max_response_length
        if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 < buffer <= int(limit):
            raise SystemExit(f"[grpo] grpo.overlong_buffer={buffer}: a whole number of tokens in (0, "
                             f"grpo.max_response_length={limit}]; the penalty falls from 0 to -1 over them")
        if not weights.get("length"):
            weights["length"] = 1.0
        limits = {"max_response_length": int(limit), "overlong_buffer": buffer}
    elif weights.get("length"):
        raise SystemExit(f"[grpo] grpo.rewards.length={weights['length']} weighs the overlong penalty, which "
                         f"grpo.overlong={g.overlong} does not compute: set grpo.overlong=penalty")
    try:
        return check_weights(weights, **limits)
    except ValueError as err:
        raise SystemExit(f"[grpo] grpo.rewards: {str(err).removeprefix('rewards: ')}") from None


def variant_keys(cfg) -> list[str]:
    """verl's keys for grpo.loss, grpo.overlong and grpo.rewards; a bad value stops here, naming its key. A key
    set in grpo.verl (a verl key on the command line) wins over the one derived here, as for the kernels."""
    g = cfg.grpo
    loss, overlong = str(g.loss), str(g.overlong)
    if loss not in LOSSES:
        raise SystemExit(f"[grpo] grpo.loss={loss}: use one of {', '.join(LOSSES)} (stages/grpo.py LOSSES)")
    if overlong not in OVERLONG:
        raise SystemExit(f"[grpo] grpo.overlong={overlong}: use one of {', '.join(OVERLONG)}")
    if OmegaConf.select(g.verl, "algorithm.filter_groups.enable") and not OmegaConf.select(g.verl, "trainer.use_v1"):
        raise SystemExit("[grpo] algorithm.filter_groups.enable=true: verl 0.9.1 filters or resamples all-equal groups "
                         "only in its v1 trainer (trainer.use_v1=true, which needs the TransferQueue package); the "
                         "legacy trainer ladder runs would ignore the key (README: all-equal groups)")
    keys = dict(LOSSES[loss])
    if loss == "dr_grpo":
        keys[ACTOR + "loss_scale_factor"] = int(g.max_response_length)
    # every run: the token count for the length term, and `response_length` / `truncated` in the batch (read by
    # plugins/overlong_filter.py) and the rollout dumps (read by stages/grpo_report.py)
    keys.update({"reward.reward_manager.source": "importlib", "reward.reward_manager.name": "TokenCountRewardManager",
                 "reward.reward_manager.module.path": "pkg://plugins.grpo_variants"})
    weights = reward_weights(cfg)
    keys.update({f"+{REWARD_KWARGS}weights.{term}": weight for term, weight in weights.items()})
    if overlong == "penalty":
        keys.update({f"+{REWARD_KWARGS}max_response_length": int(g.max_response_length),
                     f"+{REWARD_KWARGS}overlong_buffer": int(g.overlong_buffer)})
    return [f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
            for key, value in keys.items() if OmegaConf.select(g.verl, key.lstrip("+")) is None]


def main_ppo_keys(cfg, out: Path, init: str, train: str, val: str, rollout: str) -> list[str]:
    """verl.trainer.main_ppo's overrides: config.yaml's grpo.verl block, model, data, reward, trainer keys."""
    import rewards

    resume = cfg.grpo.resume_from
    lora = bool(cfg.model.use_lora)
    modules = external_modules(cfg)
    modules = f"'{modules}'" if "," in modules else modules  # a bare comma list would be a Hydra sweep
    tp = cfg.grpo.tensor_parallel_size if rollout == "vllm" else 1
    keys = verl_overrides(cfg.grpo) + [
        f"actor_rollout_ref.model.path={init}",
        f"actor_rollout_ref.rollout.name={rollout}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}",
        f"data.train_files={train}",
        f"data.val_files={val}",
        f"reward.custom_reward_function.path={Path(rewards.__file__).resolve()}",
        "reward.custom_reward_function.name=combined_score",  # grpo.rewards' weighted terms (rewards/terms.py)
        f"trainer.rollout_data_dir={(out / 'rollouts').resolve()}",  # per-step samples: grpo_report counts groups
        # Ray workers inherit the driver's environment too; this also reaches a cluster started elsewhere
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES={modules}",
    ] + variant_keys(cfg) + launch.trainer_keys(cfg, out, "grpo", resume)
    # the actor's and reference's packed forward passes; the hf rollout decodes with sdpa whatever this is
    keys += launch.kernel_keys(cfg, cfg.grpo.verl.actor_rollout_ref.model, "actor_rollout_ref.model.", actor=True)
    if lora and rollout == "vllm":
        keys.append("actor_rollout_ref.rollout.load_format=safetensors")
    if lora and rollout == "hf":
        keys.append("actor_rollout_ref.model.lora.merge=true")
    return keys


def grpo_environment(cfg, out: Path | None) -> dict[str, str]:
    """The trainer's environment; out=None: only what a Ray process needs (for another node's `ray start`)."""
    if out is None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if cfg.launch.device == "cpu":  # that node's workers start from its raylet's environment
            env.update(launch.CPU_ENV)
    else:
        env = launch.environment(cfg, out.resolve())  # PYTHONPATH, metrics/TensorBoard paths, wandb, CPU platform
    env["VERL_USE_EXTERNAL_MODULES"] = external_modules(cfg)
    if supervise.deadline and out is not None:
        # verl's capacity-expiration save: after a step's update, a checkpoint when EXPIRATION - now <= 60 s (its
        # estimate of a save) + the longest step so far. Shifted so that it saves once less than the longest
        # step + DEADLINE_SAVE_S is left before the deadline; the launcher then stops it (supervise._follow)
        env[EXPIRATION_ENV] = f"{supervise.deadline + 60 - supervise.DEADLINE_SAVE_S:.0f}"
    if env.pop("LADDER_COMPILE", None):  # kernel_keys(actor=True) loads no plugins.compile here
        print("[grpo] model.compile applies to the SFT stage only: GRPO's actor runs eager", file=sys.stderr)
    return env


def worker_env_keys(env: dict[str, str]) -> list[str]:
    """What Ray's workers must see wherever they run: the metrics paths (verl's TaskRunner, which logs and saves,
    may be on another node), the time-limit save's deadline and every VLLM_* setting (VLLM_USE_FLASHINFER_SAMPLER=0
    where flashinfer is not installed)."""
    names = ["VERL_FILE_LOGGER_PATH", "TENSORBOARD_DIR", EXPIRATION_ENV, *sorted(k for k in env if k.startswith("VLLM_"))]
    return [f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}='{env[key]}'" for key in names if key in env]  # quoted: Hydra reads a bare 0 as an int


# ---- the stage
def run(cfg) -> int:
    multinode, dry_run = int(cfg.launch.nnodes) > 1, bool(cfg.run.dry_run)
    variant_keys(cfg)  # grpo.loss / overlong / rewards: a wrong value is named before anything else is looked at
    if not dry_run:
        launch.check_device(cfg, "grpo")
    if multinode and not dry_run:
        ray_cluster.agree_on_ray_auth()
    if multinode and int(cfg.launch.node_rank) != 0:  # this node only lends its GPUs to the head's cluster
        cmd = ray_cluster.ray_commands(cfg)
        print(shlex.join(cmd) if dry_run else f"[grpo] node {cfg.launch.node_rank}: {shlex.join(cmd)}", flush=True)
        if not dry_run:
            rc = subprocess.call(cmd, env=grpo_environment(cfg, None))
            print(f"[grpo] node {cfg.launch.node_rank}: Ray exited ({rc}); node 0 exports and writes the manifest")
        return 0
    rollout = rollout_name(cfg)
    try:
        init, init_info = initial_policy(cfg)  # may name the run after --init's, so before stage_dir
    except (FileNotFoundError, ValueError) as err:  # each names the folder and what is missing
        raise SystemExit(f"[grpo] {err}") from None
    out = stage_dir(cfg, "grpo")
    train, val = rl_files(cfg, prepare=not dry_run)
    train, prompt_counts = mixed_prompts(cfg, train, init_info, out, dry_run)
    fit_epochs(cfg, train, dry_run)
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *main_ppo_keys(cfg, out, init, train, val, rollout)]
    launch.check_verl_keys(cfg, "grpo", "verl.trainer.main_ppo", cmd[3:])
    if dry_run:
        print("\n".join(shlex.join(c) for c in ([ray_cluster.ray_commands(cfg)] if multinode else []) + [cmd]))
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    lora = bool(cfg.model.use_lora)
    record = dict(stage="grpo", base_model=init, lora=lora, rollout=rollout, train_file=train, val_file=val,
                  prompts=str(cfg.grpo.prompts), prompt_counts=prompt_counts,
                  **init_info, reference_policy=(f"{init} (the actor with its LoRA adapter disabled)" if lora
                                                 else f"{init} (a frozen copy)"),
                  lora_to_rollout=(None if not lora else "adapter; vLLM loads the init weights "
                                   "(load_format=safetensors)" if rollout == "vllm" else "merged into the weights"))
    supervise.say_if_interrupted(out, "grpo")
    write_manifest(out, status="running", **record)
    env = grpo_environment(cfg, out)
    # verl's TaskRunner, which logs, may run on another node, whose raylet's environment lacks these
    cmd += worker_env_keys(env)
    head = ray_cluster.start_head(cfg, env) if multinode else None
    if not head:  # one node: a Ray of its own, even where another job's cluster runs (ray.init would join it)
        env.setdefault("RAY_ADDRESS", "local")
    try:
        if head:
            env["RAY_ADDRESS"] = f"{cfg.launch.master_addr}:{cfg.launch.master_port}"
            ray_cluster.wait_for_nodes(env["RAY_ADDRESS"], int(cfg.launch.nnodes))
        result = supervise.run_trainer(cmd, env, out, "grpo", cfg.grpo.total_steps)
    finally:
        if head:
            ray_cluster.stop_head(head, int(cfg.launch.master_port))
    if result.rc:
        return result.fail(**record)
    return export_and_record(cfg, out, record)


def export_and_record(cfg, out: Path, record: dict) -> int:
    """Export the last actor, evaluate it with the eval stage, write the manifest and the report section."""
    from stages import evaluate, grpo_report
    from stages.export import export

    # the variant trained, for the manifest and the report (the full config is in the manifest too)
    record = dict(record, loss=str(cfg.grpo.loss), overlong=str(cfg.grpo.overlong), rewards=reward_weights(cfg))
    step = launch.latest_step(out)
    if not step:
        said = f"no checkpoint in {out}: set grpo.save_freq > 0 so the last step is saved"
        write_manifest(out, status="failed", **record, failure={"kind": "no_checkpoint", "reason": said})
        print(f"[grpo] {said}", file=sys.stderr)
        return 1
    exported = export(out / f"global_step_{step}" / "actor", out, base_model=record["base_model"])
    rows = grpo_report.curve(out)
    val = [(r["step"], r["val_acc"]) for r in rows if r.get("val_acc") is not None]
    reward = [(r["step"], r["reward_mean"]) for r in rows if r.get("reward_mean") is not None]
    final = None
    if cfg.grpo.final_eval:  # the same evaluation stage as every other stage, on the validation set
        eval_cfg = copy.deepcopy(cfg)
        eval_cfg.eval.output_dir, eval_cfg.eval.dataset = str(out / "eval"), record["val_file"]
        if eval_cfg.eval.limit is None and int(cfg.grpo.val_size) > 0:  # as many problems as validation used
            eval_cfg.eval.limit = int(cfg.grpo.val_size)
        eval_cfg.model.init = exported["hf"]
        rc = evaluate.run(eval_cfg)
        if rc:
            return rc
        final = json.loads((out / "eval" / "metrics.json").read_text())
    write_manifest(out, status="done", **record, global_step=step, hf_model=exported["hf"],
                   adapter=exported.get("adapter"), metrics_dir=str(out / "logs"), curve=rows,
                   val_acc_first=val[0][1] if val else None, val_acc_last=val[-1][1] if val else None,
                   reward_first=reward[0][1] if reward else None, reward_last=reward[-1][1] if reward else None,
                   eval=final, config=OmegaConf.to_container(cfg, resolve=True))
    grpo_report.add_to_report(out, rows, record)
    print(f"[grpo] step {step}; exported {exported['hf']}; mean reward "
          f"{reward[0][1] if reward else '?'} -> {reward[-1][1] if reward else '?'}; validation accuracy "
          f"{val[0][1] if val else '?'} -> {val[-1][1] if val else '?'}"
          + (f"; eval accuracy {final['accuracy']:.4f}" if final else ""))
    return 0
