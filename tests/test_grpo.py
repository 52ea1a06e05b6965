"""GRPO stage: the hf rollout server on its own, real GRPO runs through verl's main_ppo on CPU (rewarded samples,
two nodes, which also carries a plain run's checks; a LoRA run's are in test_all.py), and the composed command checked
against verl's own config schema (vLLM, LoRA, several nodes)."""
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import stages.grpo as grpo
from stages import launch
from stages.__main__ import main as stages_main
from stages.config import REPO


# ---- the hf rollout server, in this process
@pytest.fixture(scope="module")
def server(tiny_model):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from plugins.hf_rollout import HFServer
    from verl.workers.rollout.replica import RolloutMode

    config = RolloutConfig(name="hf", dtype="float32", prompt_length=64, response_length=8, max_num_seqs=16,
                           tensor_model_parallel_size=1, free_cache_engine=False)
    return HFServer(config, HFModelConfig(path=str(tiny_model)), RolloutMode.HYBRID, 0, "")


def generate(server, prompts, **sampling):
    async def go():
        return await asyncio.gather(*[server.generate(p, dict(sampling, logprobs=True), str(i))
                                      for i, p in enumerate(prompts)])
    return asyncio.run(go())


def teacher_forced_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = model(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # different lengths: left padding in one batch


def test_hf_server_greedy_batch_matches_single_requests_and_scores_its_tokens(server):
    batched = generate(server, PROMPTS, temperature=0)
    for prompt, out in zip(PROMPTS, batched):
        alone = generate(server, [prompt], temperature=0)[0]
        assert out.token_ids == alone.token_ids and 1 <= len(out.token_ids) <= 8
        reference = teacher_forced_logprobs(server.model, prompt, out.token_ids)
        assert torch.allclose(torch.tensor(out.log_probs), reference, atol=1e-4)


def test_hf_server_sampling_logprobs_follow_temperature(server):
    out = generate(server, PROMPTS[:1], temperature=0.7)[0]
    logits = server.model(torch.tensor([PROMPTS[0] + out.token_ids])).logits[0, len(PROMPTS[0]) - 1:-1]
    reference = (logits.float() / 0.7).log_softmax(-1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(out.log_probs), reference.detach(), atol=1e-4)


def test_hf_server_decodes_requests_sent_in_bursts_as_one_batch(server):
    """verl's agent-loop workers send a step's requests in bursts; one decode must serve them all."""
    async def go():
        async def burst(delay, prompts):
            await asyncio.sleep(delay)
            return await asyncio.gather(*[server.generate(p, {"temperature": 0}, str(i)) for i, p in enumerate(prompts)])
        return await asyncio.gather(burst(0.0, PROMPTS[:1]), burst(0.2, PROMPTS[1:2]), burst(0.4, PROMPTS[2:]))

    before = server.batches
    outs = [o for burst in asyncio.run(go()) for o in burst]
    assert server.batches - before == 1 and all(o.token_ids for o in outs)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_pick_top_k_one_is_greedy_and_top_p_keeps_the_head():
    from plugins.hf_rollout import pick

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 64)
    assert pick(logits, 1.0, 1, 1.0, generators(range(64)))[0].tolist() == [1] * 64
    token, logprob = pick(logits, 1.0, -1, 0.5, generators(range(64)))  # p(1)=0.64 covers 0.5: only token 1 survives
    assert token.tolist() == [1] * 64 and torch.allclose(logprob, torch.zeros(64))


def test_pick_draws_each_row_from_its_own_generator():
    from plugins.hf_rollout import pick

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4000, 4)

    def draw(seeds):
        return pick(logits[:len(seeds)], 1.0, -1, 1.0, generators(seeds))[0]

    tokens = draw(range(4000))
    assert torch.equal(draw(range(4000)), tokens)  # the same seeds draw the same tokens
    assert torch.equal(draw(range(1, 4000, 2)), tokens[1::2])  # a row's token does not depend on the other rows
    # rows of different seeds are independent draws: their frequencies are the softmax odds (0.03, 0.09, 0.24, 0.64)
    frequencies = torch.bincount(tokens, minlength=4) / len(tokens)
    assert torch.allclose(frequencies, logits[0].softmax(-1), atol=0.03), frequencies


def test_hf_server_samples_by_seed_step_prompt_and_repeat_not_by_batch(server):
    """A request's sample is a function of rollout.seed, the step, its prompt and how many times this step has seen
    that prompt (so a GRPO group's copies differ), or of the seed it sends; never of the rest of its batch."""
    prompt = [21, 22, 23]

    def at_step(step, prompts, **sampling):
        asyncio.run(server.set_global_steps(step))
        return [out.token_ids for out in generate(server, prompts, temperature=1.0, **sampling)]

    before = server.global_steps
    try:
        first, second = at_step(3, [prompt, prompt])
        assert first != second  # the second copy of a prompt is the group's next sample, not the first again
        assert at_step(4, [prompt]) != [first]  # another step samples afresh
        # step 3 again (its counts start over), the prompt's two copies in a batch of four rows padded wider
        assert at_step(3, [PROMPTS[0], prompt, PROMPTS[1], prompt])[1::2] == [first, second]
        # a request's own seed decides alone, whatever the step, the repeat and the batch
        seeded = at_step(5, [prompt], seed=11)
        assert at_step(6, [PROMPTS[2], prompt, prompt], seed=11)[1:] == [seeded[0]] * 2 and seeded != [first]
    finally:
        asyncio.run(server.set_global_steps(before))


def test_hf_server_serves_weights_it_is_sent(server, tiny_model):
    before = generate(server, PROMPTS[:1], temperature=0)[0]
    saved = {k: v.detach().clone() for k, v in server.model.state_dict().items()}
    try:
        named = [(name, torch.randn_like(p)) for name, p in server.model.named_parameters()]
        asyncio.run(server.load_weights(named, global_steps=7, last=True))
        after = generate(server, PROMPTS[:1], temperature=0)[0]
        assert after.extra_fields["global_steps"] == 7
        assert (after.token_ids, after.log_probs) != (before.token_ids, before.log_probs)
        with pytest.raises(KeyError, match="lacks"):
            asyncio.run(server.load_weights([("model.no_such.weight", torch.zeros(1))]))
    finally:
        asyncio.run(server.load_weights(list(saved.items())))


# ---- a real GRPO run on CPU
# Ray's dashboard (a dozen processes) starts with every local Ray and nothing here reads it: 4-5 s less per run
NO_DASHBOARD = ["+ray_kwargs.ray_init.include_dashboard=false"]
CPU_RUN = ["--stage", "grpo", "--device", "cpu", "--rollout", "hf", "--train_size", "8", "--lr", "1e-2",
           "grpo.batch_size=4", "grpo.group_size=2", "grpo.mini_batch_size=4", "grpo.micro_batch_size=4",
           "grpo.max_response_length=16", "grpo.total_steps=2", "grpo.save_freq=2", "grpo.test_freq=2",
           "grpo.val_size=4", "model.gradient_checkpointing=false", "+grpo.verl.data.dataloader_num_workers=0",
           # a random model never earns the grader's reward, so every advantage is 0: an entropy bonus
           # gives the loss a gradient from step 1, and no weight decay means only gradients move weights
           "grpo.entropy_coef=0.01", "--weight_decay", "0",
           "actor_rollout_ref.rollout.dtype=float32", "actor_rollout_ref.rollout.agent.num_workers=1",
           "reward.num_workers=1", "ray_kwargs.ray_init.num_cpus=4", *NO_DASHBOARD,
           # the closing evaluation (grpo.final_eval): grpo.val_size problems, 16 tokens each, not eval's 1024
           "eval.max_new_tokens=16", "run.name=r"]


# A plain 2-step run's checks are made on the two-node run below, which runs CPU_RUN's settings, and a LoRA run's
# (test_lora_grpo_on_cpu_syncs_merged_weights_and_exports_the_adapter) on the GRPO stage of tests/test_all.py's
# chain, which runs them with LoRA: one Ray run fewer each.


# A reward the random tiny model earns about 30% of the time: its first token starts with a space (its first
# tokens are near-uniform over the vocabulary), so rewards differ within most groups of 8.
SPACE_FIRST_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if solution_str[:1] == " " else 0.0
"""


def response_logprobs(folder, prompts, samples) -> list[float]:
    """Teacher-forced log-probability of each sampled response (verl's rollout dump: prompt and response
    decoded without special tokens; the response re-tokenized) under the model in `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.generate import prompt_ids

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    by_text = {tok.decode(ids, skip_special_tokens=True): ids for ids in prompt_ids(tok, prompts)}
    out = []
    with torch.no_grad():
        for sample in samples:
            prompt, response = by_text[sample["input"]], tok.encode(sample["output"], add_special_tokens=False)
            logp = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
            out.append(logp.gather(-1, torch.tensor(response)[:, None]).sum().item())
    return out


@pytest.mark.slow
def test_grpo_on_cpu_moves_the_policy_toward_rewarded_samples(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """reward → group advantage → update, with rewards that differ inside groups (a reward function of the test's
    own, passed as verl's reward.custom_reward_function): after three steps the samples that were rewarded
    are likelier than under the initial model, and those that were not are less likely."""
    reward = tmp_path / "space_first.py"
    reward.write_text(SPACE_FIRST_REWARD)
    ladder_keys = grpo.main_ppo_keys

    def keys(*args):  # ladder's command with the test's reward function in place of ladder's grader
        return [k for k in ladder_keys(*args) if not k.lstrip("+").startswith("reward.custom_reward_function.")] + [
            f"reward.custom_reward_function.path={reward}", "reward.custom_reward_function.name=compute_score"]

    monkeypatch.setattr(grpo, "main_ppo_keys", keys)
    # CPU_RUN's settings, but groups of 8, 4-token responses, 3 steps, no entropy bonus and no validation. Two
    # passes over each step's samples at 2e-3 move the policy further and more steadily than one pass at 5e-3
    # (rewarded seen as low as +0.17): over run.seed 0-9 (the rollout's and the data's seed) rewarded +0.50…+1.42,
    # the difference +1.33…+1.87
    argv = ["--stage", "grpo", "--device", "cpu", "--rollout", "hf", "--train_size", "8", "--lr", "2e-3",
            "--weight_decay", "0", "grpo.batch_size=4", "grpo.group_size=8", "grpo.mini_batch_size=4",
            "grpo.micro_batch_size=8", "grpo.max_response_length=4", "grpo.epochs=2", "grpo.total_steps=3",
            "actor_rollout_ref.actor.ppo_epochs=2",
            "grpo.save_freq=3", "grpo.test_freq=-1", "grpo.final_eval=false", "trainer.val_before_train=false",
            "model.gradient_checkpointing=false", "+grpo.verl.data.dataloader_num_workers=0",
            "actor_rollout_ref.rollout.dtype=float32", "actor_rollout_ref.rollout.agent.num_workers=1",
            "reward.num_workers=1", "ray_kwargs.ray_init.num_cpus=4", *NO_DASHBOARD, "run.name=r"]
    assert stages_main([*argv, "--init", str(tiny_model), f"run.output_dir={tmp_path}"]) == 0
    out = tmp_path / "r" / "grpo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["global_step"] == 3

    # every step's rewards differed within groups, so its advantages were not all zero
    metrics = launch.read_metrics(out)
    for step in (1, 2, 3):
        m = metrics[step]
        assert 0 < m["critic/score/mean"] < 1 and m["critic/advantages/min"] < 0 < m["critic/advantages/max"], m

    import pandas as pd

    samples = [json.loads(line) for step in (1, 2, 3) for line in (out / "rollouts" / f"{step}.jsonl").open()]
    samples = [s for s in samples if s["output"]]  # a response of only an end of turn decodes to nothing
    assert {s["score"] for s in samples} == {0.0, 1.0} and len(samples) > 80
    prompts = list(pd.read_parquet(manifest["train_file"])["prompt"])
    before = response_logprobs(str(tiny_model), prompts, samples)
    after = response_logprobs(manifest["hf_model"], prompts, samples)
    change = {score: [a - b for a, b, s in zip(after, before, samples) if s["score"] == score] for score in (0.0, 1.0)}
    rewarded, unrewarded = (sum(change[k]) / len(change[k]) for k in (1.0, 0.0))
    print(f"mean log-prob change: rewarded {rewarded:+.3f} ({len(change[1.0])}), "
          f"unrewarded {unrewarded:+.3f} ({len(change[0.0])})")
    # the relative shift is GRPO's signal (a flipped advantage makes it negative); each side's own sign is not:
    # how likely all short responses get overall drifts with the sampled batches (seen +0.49 unrewarded once)
    assert rewarded - unrewarded > 0.2 and rewarded > 0, (rewarded, unrewarded)


# Ray's own record of where verl's training workers ran, read while the cluster is up (it keeps dead actors)
WATCH_WORKERS = """
import json, socket, sys, time
from ray.util.state import list_actors, list_nodes
address, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        host, port = address.split(":")
        socket.create_connection((host, int(port)), timeout=2).close()  # asked before the head is up, it hangs
        workers = [a for a in list_actors(address=address, detail=True)
                   if a.class_name.endswith(".WorkerDict") and a.node_id]  # placed, not pending
        if len(workers) >= 2:
            nodes = {n.node_id: n.is_head_node for n in list_nodes(address=address)}
            print(json.dumps({"workers": [(a.name, a.node_id) for a in workers], "nodes": nodes}))
            sys.exit(0)
    except Exception as err:  # the head or its dashboard is not up yet
        print(repr(err)[:300], file=sys.stderr, flush=True)
    time.sleep(2)
sys.exit(1)
"""


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tail(path, lines=40):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_two_node_grpo_on_one_host_trains_on_both_ray_nodes(tiny_model, gsm8k_dir, tmp_path):
    """NODE_RANK=1 and NODE_RANK=0 of `./train.sh --stage grpo` on this host: two Ray nodes, one verl run. It runs
    CPU_RUN's settings (full weights, 2 steps of 4 prompts x 2 samples, greedy validation at steps 0 and 2), so it also
    carries the checks of a plain GRPO run on CPU: it changes the actor, logs verl's metrics and exports."""
    port, dashboard, agent = free_ports(3)
    token = tmp_path / "ray_token"  # a cluster token of the test's own (the stage turns token auth on for it)
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, N_GPUS="1", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               RAY_gcs_rpc_server_reconnect_timeout_s="15",  # node 1 gives the stopped head 15 s, not 60
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # train.sh: this python
    # One Ray CPU per node stands for its one device (N_GPUS=1): verl's per-node placement groups cannot
    # share a node. The cluster keeps its files (and its address, which a plain ray.init() on this host
    # would join) in a temp dir of its own, short for Ray's socket paths; node 1's dashboard agent must
    # not take the head's port.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray_args = {0: f"'--num-cpus 1 --temp-dir {temp} --dashboard-port {dashboard}'",
                1: f"'--num-cpus 1 --dashboard-agent-listen-port {agent}'"}
    # ray.init joins the cluster, whose head serves the state API the watcher reads (its dashboard)
    run = [a for a in CPU_RUN if not a.startswith("ray_kwargs.ray_init.num_cpus") and a not in NO_DASHBOARD]
    argv = ["./train.sh", *run, "--init", str(tiny_model), f"run.output_dir={tmp_path}"]
    ranks, logs = {}, {r: tmp_path / f"rank{r}.log" for r in (1, 0)}
    try:
        for r in (1, 0):
            with logs[r].open("w") as log:
                ranks[r] = subprocess.Popen([*argv, f"launch.ray_start_args={ray_args[r]}"], cwd=REPO,
                                            env=dict(env, NODE_RANK=str(r)), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        watch = subprocess.run([sys.executable, "-c", WATCH_WORKERS, f"127.0.0.1:{port}", "180"], cwd=REPO,
                               env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=200)
        assert ranks[0].wait(timeout=240) == 0, tail(logs[0])
        assert ranks[1].wait(timeout=60) == 0, tail(logs[1])  # it returns once the head has stopped
    finally:
        sessions = {proc.pid for proc in ranks.values()}  # each rank leads a session: every Ray process it
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):  # started is in it (workers too)
            with contextlib.suppress(OSError):
                if os.getsid(pid) in sessions:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)

    out = tmp_path / "r" / "grpo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["status"], manifest["global_step"], manifest["rollout"]) == ("done", 2, "hf")
    assert manifest["reference_policy"].startswith(str(tiny_model))

    # the step metrics and validations came back through verl's JSONL logger (and TensorBoard), wherever verl's
    # TaskRunner ran
    metrics = launch.read_metrics(out)
    assert sorted(metrics) == [0, 1, 2]
    for step in (1, 2):
        m = metrics[step]
        assert {"actor/pg_loss", "actor/kl_loss", "critic/score/mean", "critic/advantages/mean"} <= set(m)
        assert 0 < m["response_length/max"] <= 16
        # the hf rollout's log-probs are the actor's own: at step 2 that means it got step 1's weights. Measured
        # 5e-5 with the sync; a rollout that keeps the first weights (bench.stale_rollout) gave 8.8e-4
        assert m["training/rollout_probs_diff_max"] < 2e-4, m["training/rollout_probs_diff_max"]
    for step in (0, 2):  # ladder's grader scored the greedy validation: its extra keys are logged
        assert {"val-core/openai/gsm8k/acc/mean@1", "val-aux/openai/gsm8k/format_ok/mean@1"} <= set(metrics[step])
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    # and the eval stage measured the export (grpo.final_eval: the only real run here that leaves it on)
    assert (manifest["eval"]["n"], manifest["eval"]["max_new_tokens"]) == (4, 16)

    # the exported actor differs from the initial weights and loads in plain transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(Path(manifest["hf_model"]) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before), "no weight changed in 2 steps"
    AutoModelForCausalLM.from_pretrained(manifest["hf_model"])

    # verl trained with world size 2: one FSDP shard per rank in its checkpoint
    shards = sorted(p.name for p in (out / "global_step_2" / "actor").glob("model_world_size_*_rank_*.pt"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    # and its two training workers (named …WorkerDict_<node's placement group>:<local rank>) ran on the two
    # nodes of the cluster: the head and the one that joined it
    assert watch.returncode == 0, watch.stderr[-3000:]
    seen = json.loads(watch.stdout)
    print("verl's training workers and the Ray nodes:", seen)
    workers = dict(seen["workers"])
    assert sorted(name.rsplit("WorkerDict_", 1)[1] for name in workers) == ["0:0", "1:0"], workers
    assert set(workers.values()) == set(seen["nodes"]) and len(seen["nodes"]) == 2, seen
    assert sorted(seen["nodes"].values()) == [False, True], seen


# ---- the composed command against verl's schema
def verl_schema_compose(overrides):
    """Compose verl's own ppo_trainer config with the stage's overrides: a misspelt key fails here."""
    return launch.verl_schema_compose("ppo_trainer", overrides)


def dry_run(argv, capsys, monkeypatch, vllm=True):
    """The lines `--dry_run` prints before the YAML: [ray start …,] main_ppo …"""
    monkeypatch.setattr(grpo, "find_spec", lambda name: object() if name == "vllm" and vllm else find_spec(name))
    assert stages_main(["--stage", "grpo", "--dry_run", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines[: lines.index("run:")]]


@pytest.fixture
def rl_files(tmp_path):
    import pandas as pd

    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"1+{i}?"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": str(1 + i)}, "extra_info": {"index": i}} for i in range(4)]
    for name in ("train", "test"):  # 4 rows: one batch of CPU_RUN's 4 prompts (fewer is refused: not one step)
        pd.DataFrame(rows).to_parquet(tmp_path / f"rl_{name}.parquet")
    return ["--train_data", str(tmp_path / "rl_train.parquet"), "--val_data", str(tmp_path / "rl_test.parquet")]


def main_ppo_args(cmd):
    assert cmd[1:3] == ["-m", "verl.trainer.main_ppo"], cmd[:3]
    return cmd[3:]


def test_default_vllm_command_fits_verls_schema(tiny_model, rl_files, capsys, monkeypatch):
    (cmd,) = dry_run(["--init", str(tiny_model), *rl_files, "run.name=x"], capsys, monkeypatch)
    cfg = verl_schema_compose(main_ppo_args(cmd))
    ar = cfg.actor_rollout_ref
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.trainer.use_v1 is False
    assert (ar.rollout.name, ar.rollout.n, ar.rollout.load_format) == ("vllm", 8, "dummy")
    assert (cfg.data.max_response_length, cfg.data.train_batch_size, ar.actor.ppo_mini_batch_size) == (1024, 64, 32)
    assert (ar.actor.use_kl_loss, ar.actor.kl_loss_coef, ar.actor.entropy_coeff) == (True, 0.001, 0.0)
    assert (ar.rollout.val_kwargs.temperature, ar.rollout.val_kwargs.do_sample) == (0, False)
    assert ar.model.path == str(tiny_model) and ar.model.lora_rank == 0
    # a CUDA launch without flash-attn trains on packed rows through ladder's varlen attention, and the actor's
    # update and log-prob passes take ladder's fused loss (triton imports here: the test extra has it)
    assert ar.model.override_config.attn_implementation == "ladder_varlen"
    assert list(ar.model.external_lib) == ["plugins.attention", "plugins.fused_ce"]
    assert (ar.model.use_fused_kernels, ar.model.fused_kernel_options.impl_backend) == (True, "torch")
    # vLLM's KV cache sized for a prompt and its response, not the model's whole context
    assert (ar.rollout.max_model_len, ar.rollout.enforce_eager) == (512 + 1024, False)
    assert cfg.reward.custom_reward_function.path == str(REPO / "rewards" / "__init__.py")
    assert cfg.reward.custom_reward_function.name == "combined_score"  # grpo.rewards (rewards/terms.py)
    assert "wandb" not in cfg.trainer.logger and {"console", "tensorboard"} <= set(cfg.trainer.logger)
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "plugins.hf_rollout"
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_misspelt_verl_key_is_refused(tiny_model, rl_files, capsys, monkeypatch):
    with pytest.raises(SystemExit, match=r"actor_rollout_ref\.rollout\.temprature: .* no such key; did you mean "
                                         r"actor_rollout_ref\.rollout\.temperature\?"):  # the dry run refuses it
        dry_run(["--init", str(tiny_model), *rl_files, "actor_rollout_ref.rollout.temprature=0.7"], capsys, monkeypatch)
    with pytest.raises(Exception, match="temprature"):
        verl_schema_compose(["actor_rollout_ref.rollout.temprature=0.7"])


def test_a_verl_key_added_with_plus_reaches_verl(tiny_model, rl_files, capsys, monkeypatch):
    """`+key=value` is Hydra's add: a key verl's schema lacks (ray.init's own arguments, which verl passes on
    from ray_kwargs.ray_init) goes to verl as `++key`, while the same key without `+` is still refused."""
    added = "ray_kwargs.ray_init.object_store_memory"
    (cmd,) = dry_run(["--init", str(tiny_model), *rl_files, f"+{added}=4000000000",
                      "+grpo.verl.data.dataloader_num_workers=0"], capsys, monkeypatch)
    assert f"++{added}=4000000000" in cmd and "++data.dataloader_num_workers=0" in cmd
    cfg = verl_schema_compose(main_ppo_args(cmd))
    assert cfg.ray_kwargs.ray_init.object_store_memory == 4000000000 and cfg.data.dataloader_num_workers == 0
    with pytest.raises(SystemExit, match=rf"{added}: .* no such key"):
        dry_run(["--init", str(tiny_model), *rl_files, f"{added}=4000000000"], capsys, monkeypatch)


@pytest.mark.parametrize("rollout,expect", [("vllm", {"actor_rollout_ref.rollout.load_format=safetensors"}),
                                            ("hf", {"actor_rollout_ref.model.lora.merge=true"})])
def test_lora_dry_run_starts_from_the_merged_sft_export(tiny_model, rl_files, tmp_path, capsys, monkeypatch,
                                                         rollout, expect):
    sft = tmp_path / "outputs" / "myrun" / "sft"  # a LoRA SFT stage: its manifest names the merged export
    sft.mkdir(parents=True)
    (sft / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "done", "lora": True,
                                                   "base_model": "Qwen/Qwen2.5-0.5B", "hf_model": str(tiny_model)}))
    (cmd,) = dry_run(["--init", str(sft), *rl_files, "--use_lora", "--lora_rank", "16", "--rollout", rollout],
                     capsys, monkeypatch)
    args = main_ppo_args(cmd)
    assert expect <= set(args) and "actor_rollout_ref.model.lora_rank=16" in args
    cfg = verl_schema_compose(args)
    # the actor (and so the reference: the actor with its adapter off) starts from the merged SFT weights
    assert cfg.actor_rollout_ref.model.path == str(tiny_model) and cfg.actor_rollout_ref.model.lora_rank == 16
    assert cfg.trainer.default_local_dir == str(sft.parent / "grpo")  # beside the SFT stage, in its run
    if rollout == "hf":
        assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
        assert cfg.actor_rollout_ref.rollout.load_format == "dummy"  # the hf server loads real weights itself


def test_auto_rollout_is_hf_without_vllm(tiny_model, rl_files, capsys, monkeypatch):
    (cmd,) = dry_run(["--init", str(tiny_model), *rl_files], capsys, monkeypatch, vllm=False)
    assert "actor_rollout_ref.rollout.name=hf" in cmd


def test_multinode_dry_run_from_env(tiny_model, rl_files):
    env = dict(os.environ, N_GPUS="8", NNODES="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")
    argv = ["./train.sh", "--stage", "grpo", "--dry_run", "--init", str(tiny_model), *rl_files, "--rollout", "hf"]
    head = subprocess.run(argv, cwd=REPO, env=dict(env, NODE_RANK="0"), capture_output=True, text=True)
    assert head.returncode == 0, head.stderr
    ray_start, main_ppo = (shlex.split(line) for line in head.stdout.splitlines()[:2])
    assert ray_start[1:] == ["start", "--head", "--node-ip-address=10.0.0.1", "--port=29600", "--block"]
    assert {"trainer.nnodes=2", "trainer.n_gpus_per_node=8"} <= set(main_ppo_args(main_ppo))
    verl_schema_compose(main_ppo_args(main_ppo))
    worker = subprocess.run(argv, cwd=REPO, env=dict(env, NODE_RANK="1"), capture_output=True, text=True)
    assert worker.returncode == 0, worker.stderr
    assert shlex.split(worker.stdout.strip())[1:] == ["start", "--address=10.0.0.1:29600", "--block"]


def test_compile_is_sft_only_and_grpo_says_so(tiny_model, rl_files, capsys, monkeypatch, tmp_path):
    from stages.config import load_config

    (cmd,) = dry_run(["--init", str(tiny_model), *rl_files, "run.name=x", "model.compile=true"], capsys, monkeypatch)
    assert "plugins.compile" not in list(verl_schema_compose(main_ppo_args(cmd)).actor_rollout_ref.model.external_lib)
    env = grpo.grpo_environment(load_config("grpo", ["model.compile=true"]), tmp_path)
    assert "LADDER_COMPILE" not in env and "SFT stage only" in capsys.readouterr().err


def test_vllm_settings_and_metrics_paths_reach_rays_workers(tmp_path):
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VERL_FILE_LOGGER_PATH": "/m.jsonl", "TENSORBOARD_DIR": "/tb",
           "HOME": "/root"}
    keys = grpo.worker_env_keys(env)
    assert keys == ["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH='/m.jsonl'",
                    "+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR='/tb'",
                    "+ray_kwargs.ray_init.runtime_env.env_vars.VLLM_USE_FLASHINFER_SAMPLER='0'"]
    # Ray takes only strings there: a bare 0 reached it as an int and stopped GRPO on the GPU host (2026-12-03)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert [o.value() for o in OverridesParser.create().parse_overrides(keys)] == ["/m.jsonl", "/tb", "0"]


# ---- failing early and clearly (issue 17)
def test_grpo_without_a_gpu_says_so_before_anything_starts(tiny_model, rl_files, monkeypatch, tmp_path):
    from stages import supervise

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(supervise, "run_trainer", lambda *a, **k: pytest.fail("verl's trainer ran"))
    with pytest.raises(SystemExit, match=r"^\[grpo\] no CUDA GPU found .* add --device cpu"):
        stages_main(["--stage", "grpo", "--init", str(tiny_model), *rl_files, f"run.output_dir={tmp_path}"])


@pytest.mark.parametrize("argv,said", [
    (["--lr", "abc"], r"^\[grpo\] actor_rollout_ref\.actor\.optim\.lr=abc \(grpo\.lr: --lr, LEARNING_RATE\): verl "
                      r"expects a number \(its default is 1e-06\)$"),
    (["trainer.save_freq=abc"], r"^\[grpo\] trainer\.save_freq=abc: verl expects a number"),
])
def test_grpo_dry_run_refuses_a_bad_verl_value(tiny_model, rl_files, capsys, monkeypatch, argv, said):
    with pytest.raises(SystemExit, match=said):
        dry_run(["--init", str(tiny_model), *rl_files, *argv], capsys, monkeypatch)


def test_grpo_missing_init_is_one_clean_line(rl_files, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as err:
        dry_run(["--init", str(tmp_path / "nonexistent"), *rl_files], capsys, monkeypatch)
    assert str(err.value) == f"[grpo] --init {tmp_path / 'nonexistent'}: no such run, stage, checkpoint or model folder"


def test_a_failed_grpo_run_leaves_a_failed_manifest(tiny_model, rl_files, tmp_path, monkeypatch, capsys):
    from stages import supervise

    def fails(cmd, env, out, stage, *args, **kwargs):
        log = out / "logs" / "verl.0.log"
        log.write_text("ValueError: the CPU platform needs 4 Ray CPUs for its worker processes; Ray has 2\n")
        return supervise.Result(1, log, out, stage, 3.0)

    monkeypatch.setattr(supervise, "run_trainer", fails)
    assert stages_main([*CPU_RUN, "--init", str(tiny_model), *rl_files, f"run.output_dir={tmp_path}"]) == 1
    manifest = json.loads((tmp_path / "r" / "grpo" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["rollout"] == "hf"
    assert (manifest["failure"]["exit_code"], manifest["failure"]["kind"]) == (1, "before_first_step")
    assert manifest["failure"]["reason"].startswith("ValueError: the CPU platform needs 4 Ray CPUs")
    assert "failed before its first step" in capsys.readouterr().err


def test_a_run_that_saved_no_checkpoint_is_recorded_failed(tmp_path, capsys):
    """grpo.save_freq=-1 leaves nothing to export: the manifest says failed and why (not `running`)."""
    from stages.config import load_config, read_manifest

    out = tmp_path / "grpo"
    assert grpo.export_and_record(load_config("grpo", ["grpo.save_freq=-1"]), out, {"stage": "grpo"}) == 1
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and manifest["failure"]["kind"] == "no_checkpoint"
    assert "set grpo.save_freq > 0" in capsys.readouterr().err
