"""GRPO stage: config.yaml's `grpo:` → `python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo …`,
rewarded by ladder's own grader (rewards.compute_score), then export and a manifest.

    ./train.sh --stage grpo --init outputs/<run>/sft                        # one GPU
    ./train.sh --stage grpo --init outputs/<run>/sft --rollout hf           # no vLLM: transformers rollout
    N_GPUS=8 ./train.sh --stage grpo --init outputs/<run>/sft               # one node, 8 GPUs
    N_GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train.sh --stage grpo --init …   # on each node,
        its own NODE_RANK: node 0 starts a Ray head on MASTER_PORT, waits for NNODES nodes, trains and
        stops its own Ray (not `ray stop`, which stops every Ray of its host); the others join it (`ray
        start --address … --block`) and return once they lose it (Ray waits 60 s); `launch.ray_start_args`
        adds flags to every `ray start`; outputs/ must be one shared folder, as every rank writes its
        checkpoint shard there
    ./train.sh --stage grpo --init outputs/<run>/sft --dry_run             # print the command and config

Each step samples `grpo.group_size` completions for each of `grpo.batch_size` training prompts, scores
them with rewards.compute_score (1 for a strict-correct answer, else 0), and normalises rewards within
each prompt's group (GRPO, outcome reward, no critic). Validation is greedy on the test split.
What ladder sets on top of verl's defaults (all visible with --dry_run):
  - the legacy trainer (`trainer.use_v1=false`: verl's v1 trainer needs the TransferQueue package);
  - rollout `auto`: vLLM when it imports, else `hf`, ladder's transformers backend (stages/hf_rollout.py,
    registered in every Ray process through VERL_USE_EXTERNAL_MODULES; always tensor parallel 1);
  - KL as a loss (low_var_kl, 0.001) against the initial policy, no KL in the reward, no entropy bonus;
    lr 1e-6, response length 1024, dynamic batching, torch.compile off; the actor's attention is
    model.attn_implementation as the SFT stage resolves it (`auto`: ladder_varlen on CUDA without
    flash-attn, sdpa on CPU); liger and the fused loss are SFT-only for now (not measured in GRPO);
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

import argparse
import copy
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from omegaconf import OmegaConf

from stages.common import REPO, flatten, read_manifest, stage_dir, write_manifest
from stages.sft import CPU_ENV, environment, kernel_keys, latest_step, loggers, read_metrics

RL_COLUMNS = ("data_source", "prompt", "reward_model")


# ---- inputs: data, rollout backend, initial policy
def data_files(cfg, prepare: bool = True) -> tuple[str, str]:
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


def initial_policy(cfg, args) -> tuple[str, dict]:
    """The HF folder to start from (--init through resolve_init, else model.path) and what it was.

    An --init inside outputs/<run> also names this stage's run, so GRPO lands in outputs/<run>/grpo.
    """
    from stages.evaluate import run_folder
    from stages.export import STAGE_ORDER, resolve_init

    given = args.init or str(cfg.model.path)
    run = run_folder(given) if args.init else None
    if run is not None and not cfg.run.name:
        cfg.run.output_dir, cfg.run.name = str(run.parent), run.name
    info = {"init": given}
    folder = Path(given)
    candidates = [folder] + [folder / s for s in STAGE_ORDER if s != "grpo"]  # a stage, or a run's stages
    manifest = next((c / "manifest.json" for c in candidates if (c / "manifest.json").is_file()), None)
    if manifest is not None:  # what the init stage was: LoRA runs hand over their merged export
        m = read_manifest(manifest)
        info.update(init_stage=m.get("stage"), init_was_lora=bool(m.get("lora")), init_base_model=m.get("base_model"))
    return resolve_init(given), info


# ---- the verl command
def external_modules(cfg) -> str:
    """Modules verl imports in every process: the hf rollout, and on CPU the test platform shims."""
    mods = ["tests.cpu_platform", "tests.cpu_platform_rl"] if cfg.launch.device == "cpu" else []
    return ",".join(mods + ["stages.hf_rollout"])


def verl_overrides(cfg, out: Path, init: str, train: str, val: str, rollout: str) -> list[str]:
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
        f"trainer.default_local_dir={out.resolve()}",
        f"trainer.rollout_data_dir={(out / 'rollouts').resolve()}",  # per-step samples: grpo_report counts groups
        f"trainer.project_name={cfg.logging.wandb_project or 'ladder'}",
        f"trainer.experiment_name={cfg.run.name}-grpo",
        f"trainer.logger=[{','.join(loggers(cfg))}]",
        f"trainer.resume_mode={'resume_path' if resume else 'auto'}",
        f"trainer.resume_from_path={Path(resume).resolve() if resume else 'null'}",
        f"trainer.nnodes={cfg.launch.nnodes}",
        f"trainer.n_gpus_per_node={cfg.launch.n_gpus}",
        # Ray workers inherit the driver's environment too; this also reaches a cluster started elsewhere
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES={modules}",
    ]
    # the actor's and reference's packed forward passes; the hf rollout decodes with sdpa whatever this is
    keys += kernel_keys(cfg, cfg.grpo.verl.actor_rollout_ref.model, "actor_rollout_ref.model.", attention_only=True)
    if lora and rollout == "vllm":
        keys.append("actor_rollout_ref.rollout.load_format=safetensors")
    if lora and rollout == "hf":
        keys.append("actor_rollout_ref.model.lora.merge=true")
    if cfg.launch.device == "cpu":
        keys.append("trainer.device=cpu")
    return keys


def command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", *overrides]


def grpo_environment(cfg, out: Path | None) -> dict[str, str]:
    """The trainer's environment; out=None: only what a Ray process needs (for another node's `ray start`)."""
    if out is None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if cfg.launch.device == "cpu":  # that node's workers start from its raylet's environment
            env.update(CPU_ENV)
    else:
        env = environment(cfg, out.resolve())  # PYTHONPATH, metrics/TensorBoard paths, wandb, CPU platform
    env["VERL_USE_EXTERNAL_MODULES"] = external_modules(cfg)
    if env.pop("LADDER_COMPILE", None):  # kernel_keys(attention_only=True) loads no stages.compile here
        print("[grpo] model.compile applies to the SFT stage only: GRPO's actor runs eager", file=sys.stderr)
    return env


# ---- several nodes: one Ray cluster, main_ppo on the head
def ray_commands(cfg) -> list[str]:
    """This node's `ray start`, blocking: stopping it stops this node's Ray and no other Ray of its host."""
    launch, ray = cfg.launch, str(Path(sys.executable).with_name("ray"))
    extra = shlex.split(str(launch.ray_start_args or ""))
    if int(launch.node_rank) == 0:
        return [ray, "start", "--head", f"--node-ip-address={launch.master_addr}", f"--port={launch.master_port}",
                "--block", *extra]
    return [ray, "start", f"--address={launch.master_addr}:{launch.master_port}", "--block", *extra]


def agree_on_ray_auth() -> None:
    """`ray start --head` turns token auth on by itself when it finds a token (any earlier local ray.init
    writes ~/.ray/auth_token), but a node joining it or a client connecting to it does not: without
    RAY_AUTH_MODE=token they are refused. Set here, it reaches this process and every one it starts."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def answers(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=5).close()
        return True
    except OSError:
        return False


def start_head(cfg, env: dict[str, str]) -> subprocess.Popen:
    """The Ray head, in the background, once its port answers."""
    addr, port = str(cfg.launch.master_addr), int(cfg.launch.master_port)
    if answers(addr, port):
        raise SystemExit(f"[grpo] {addr}:{port} (MASTER_ADDR:MASTER_PORT) is taken: if an old Ray head still runs "
                         "there, stop it (`ray stop`), or choose another MASTER_PORT")
    head = subprocess.Popen(ray_commands(cfg), env=env)
    while not answers(addr, port):
        if head.poll() is not None:
            raise SystemExit(f"[grpo] the Ray head did not start: {shlex.join(head.args)} exited {head.returncode}")
        time.sleep(1)
    return head


def stop_head(head: subprocess.Popen, port: int) -> None:
    """Stop this node's Ray; the other nodes' `ray start --block` exit once they lose it (Ray: 60 s)."""
    from ray._common.utils import get_ray_address_file

    head.terminate()
    head.wait()
    # as `ray stop` does: a plain ray.init() on this host would try to join the cluster named here
    named = Path(get_ray_address_file(None))
    if named.is_file() and named.read_text().strip().endswith(f":{port}"):
        named.unlink()


def wait_for_nodes(address: str, nnodes: int, timeout_s: float = 1800) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR")
    try:
        deadline = time.time() + timeout_s
        while (alive := sum(n["Alive"] for n in ray.nodes())) < nnodes:
            if time.time() > deadline:
                raise SystemExit(f"[grpo] only {alive} of {nnodes} nodes joined the Ray head at {address} in "
                                 f"{timeout_s:.0f}s: start this stage on every node with its own NODE_RANK")
            print(f"[grpo] {alive}/{nnodes} nodes in the Ray cluster at {address}; waiting", flush=True)
            time.sleep(10)
    finally:
        ray.shutdown()


# ---- the stage
def run(cfg, args) -> int:
    multinode = int(cfg.launch.nnodes) > 1
    if multinode and not args.dry_run:
        agree_on_ray_auth()
    if multinode and int(cfg.launch.node_rank) != 0:  # this node only lends its GPUs to the head's cluster
        cmd = ray_commands(cfg)
        print(shlex.join(cmd) if args.dry_run else f"[grpo] node {cfg.launch.node_rank}: {shlex.join(cmd)}", flush=True)
        if not args.dry_run:
            rc = subprocess.call(cmd, env=grpo_environment(cfg, None))
            print(f"[grpo] node {cfg.launch.node_rank}: Ray exited ({rc}); node 0 exports and writes the manifest")
        return 0
    rollout = rollout_name(cfg)
    init, init_info = initial_policy(cfg, args)  # may name the run after --init's, so before stage_dir
    out = stage_dir(cfg, "grpo")
    train, val = data_files(cfg, prepare=not args.dry_run)
    cmd = command(verl_overrides(cfg, out, init, train, val, rollout))
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in ([ray_commands(cfg)] if multinode else []) + [cmd]))
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
    cmd += [f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}={env[key]}"
            for key in ("VERL_FILE_LOGGER_PATH", "TENSORBOARD_DIR")]
    head = start_head(cfg, env) if multinode else None
    if not head:  # one node: a Ray of its own, even where another job's cluster runs (ray.init would join it)
        env.setdefault("RAY_ADDRESS", "local")
    try:
        if head:
            env["RAY_ADDRESS"] = f"{cfg.launch.master_addr}:{cfg.launch.master_port}"
            wait_for_nodes(env["RAY_ADDRESS"], int(cfg.launch.nnodes))
        print("[grpo] " + shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=REPO)
    finally:
        if head:
            stop_head(head, int(cfg.launch.master_port))
    if rc:
        print(f"[grpo] verl's trainer exited with {rc}; rerun the same command to resume from the last "
              f"checkpoint in {out}", file=sys.stderr)
        return rc
    return finish(cfg, out, record)


def finish(cfg, out: Path, record: dict) -> int:
    """Export the last actor, evaluate it with the eval stage, write the manifest and the report section."""
    from stages import evaluate, grpo_report
    from stages.export import export

    step = latest_step(out)
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
        eval_args = argparse.Namespace(init=exported["hf"], dry_run=False)
        rc = evaluate.run(eval_cfg, eval_args)
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
