"""GRPO stage: config.yaml's `grpo:` → `python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo …`,
rewarded by ladder's own grader (rewards.compute_score), then export and a manifest.

    ./train.sh --stage grpo --init outputs/<run>/sft                        # one GPU
    ./train.sh --stage grpo --init outputs/<run>/sft --rollout hf           # no vLLM: transformers rollout
    N_GPUS=8 ./train.sh --stage grpo --init outputs/<run>/sft               # one node, 8 GPUs
    N_GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train.sh --stage grpo --init …   # on each node,
        its own NODE_RANK: one Ray cluster, node 0 the head (stages/ray_cluster.py); outputs/ must be one
        shared folder, as every rank writes its checkpoint shard there
    ./train.sh --stage grpo --init outputs/<run>/sft --dry_run             # print the command and config

Each step samples `grpo.group_size` completions for each of `grpo.batch_size` training prompts, scores
them with rewards.compute_score (1 for a strict-correct answer, else 0), and normalises rewards within
each prompt's group (GRPO, outcome reward, no critic). Validation is greedy on the test split.
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

from stages import launch, ray_cluster, registry
from stages.config import REPO, flatten, read_manifest, stage_dir, write_manifest

RL_COLUMNS = ("data_source", "prompt", "reward_model")


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
        info.update(init_stage=m.get("stage"), init_was_lora=bool(m.get("lora")), init_base_model=m.get("base_model"))
    return resolve_init(given), info


# ---- the verl command
def external_modules(cfg) -> str:
    """Modules verl imports in every process: the hf rollout, and on CPU the test platform shims."""
    mods = list(launch.CPU_RL_PLUGINS) if cfg.launch.device == "cpu" else []
    return ",".join(mods + ["plugins.hf_rollout"])


def main_ppo_keys(cfg, out: Path, init: str, train: str, val: str, rollout: str) -> list[str]:
    """verl.trainer.main_ppo's overrides: config.yaml's grpo.verl block, model, data, reward, trainer keys."""
    import rewards

    resume = cfg.grpo.resume_from
    lora = bool(cfg.model.use_lora)
    modules = external_modules(cfg)
    modules = f"'{modules}'" if "," in modules else modules  # a bare comma list would be a Hydra sweep
    tp = cfg.grpo.tensor_parallel_size if rollout == "vllm" else 1
    keys = flatten(cfg.grpo.verl) + [
        f"actor_rollout_ref.model.path={init}",
        f"actor_rollout_ref.rollout.name={rollout}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}",
        f"data.train_files={train}",
        f"data.val_files={val}",
        f"reward.custom_reward_function.path={Path(rewards.__file__).resolve()}",
        "reward.custom_reward_function.name=compute_score",
        f"trainer.rollout_data_dir={(out / 'rollouts').resolve()}",  # per-step samples: grpo_report counts groups
        # Ray workers inherit the driver's environment too; this also reaches a cluster started elsewhere
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES={modules}",
    ] + launch.trainer_keys(cfg, out, "grpo", resume)
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
    if env.pop("LADDER_COMPILE", None):  # kernel_keys(actor=True) loads no plugins.compile here
        print("[grpo] model.compile applies to the SFT stage only: GRPO's actor runs eager", file=sys.stderr)
    return env


def worker_env_keys(env: dict[str, str]) -> list[str]:
    """What Ray's workers must see wherever they run: the metrics paths (verl's TaskRunner, which logs, may be on
    another node) and every VLLM_* setting (VLLM_USE_FLASHINFER_SAMPLER=0 where flashinfer is not installed)."""
    names = ["VERL_FILE_LOGGER_PATH", "TENSORBOARD_DIR", *sorted(k for k in env if k.startswith("VLLM_"))]
    return [f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}='{env[key]}'" for key in names if key in env]  # quoted: Hydra reads a bare 0 as an int


# ---- the stage
def run(cfg) -> int:
    multinode, dry_run = int(cfg.launch.nnodes) > 1, bool(cfg.run.dry_run)
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
    init, init_info = initial_policy(cfg)  # may name the run after --init's, so before stage_dir
    out = stage_dir(cfg, "grpo")
    train, val = rl_files(cfg, prepare=not dry_run)
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *main_ppo_keys(cfg, out, init, train, val, rollout)]
    if dry_run:
        print("\n".join(shlex.join(c) for c in ([ray_cluster.ray_commands(cfg)] if multinode else []) + [cmd]))
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    lora = bool(cfg.model.use_lora)
    record = dict(stage="grpo", base_model=init, lora=lora, rollout=rollout, train_file=train, val_file=val,
                  **init_info, reference_policy=(f"{init} (the actor with its LoRA adapter disabled)" if lora
                                                 else f"{init} (a frozen copy)"),
                  lora_to_rollout=(None if not lora else "adapter; vLLM loads the init weights "
                                   "(load_format=safetensors)" if rollout == "vllm" else "merged into the weights"))
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
        print("[grpo] " + shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=REPO)
    finally:
        if head:
            ray_cluster.stop_head(head, int(cfg.launch.master_port))
    if rc:
        print(f"[grpo] verl's trainer exited with {rc}; rerun the same command to resume from the last "
              f"checkpoint in {out}", file=sys.stderr)
        return rc
    return export_and_record(cfg, out, record)


def export_and_record(cfg, out: Path, record: dict) -> int:
    """Export the last actor, evaluate it with the eval stage, write the manifest and the report section."""
    from stages import evaluate, grpo_report
    from stages.export import export

    step = launch.latest_step(out)
    if not step:
        print(f"[grpo] no checkpoint in {out}: set grpo.save_freq > 0 so the last step is saved", file=sys.stderr)
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
