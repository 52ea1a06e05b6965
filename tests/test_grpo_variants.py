"""grpo.loss / grpo.overlong / grpo.rewards: the verl keys each value sets (composed against verl's schema), bad
values refused before anything starts, plugins/grpo_variants.py on its own, and three real GRPO runs on CPU whose
metrics and rollout dumps show each key's effect (what verl computed, recomputed here from the dumped samples)."""
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import stages.grpo as grpo
from rewards.terms import length_reward
from stages import launch
from stages.__main__ import main as stages_main
from tests.test_grpo import CPU_RUN, dry_run, main_ppo_args, rl_files, verl_schema_compose  # noqa: F401 (fixture)

ACTOR = "actor_rollout_ref.actor."
LOSS_KEYS = [ACTOR + "loss_agg_mode", "algorithm.norm_adv_by_std_in_grpo", ACTOR + "clip_ratio_low",
             ACTOR + "clip_ratio_high", ACTOR + "loss_scale_factor"]
# what each variant means in verl 0.9.1's terms (its core_algos.agg_loss and compute_grpo_outcome_advantage)
EXPECTED = {"grpo": ["seq-mean-token-mean", True, 0.2, 0.2, None],
            "dapo": ["token-mean", True, 0.2, 0.28, None],
            "dr_grpo": ["seq-mean-token-sum-norm", False, 0.2, 0.2, 1024]}


def composed(tiny_model, rl_files, capsys, monkeypatch, *argv):
    (cmd,) = dry_run(["--init", str(tiny_model), *rl_files, "run.name=x", *argv], capsys, monkeypatch)
    return main_ppo_args(cmd), verl_schema_compose(main_ppo_args(cmd))


# ---- the keys each value sets
@pytest.mark.parametrize("loss", list(EXPECTED))
def test_each_loss_sets_exactly_verls_keys(tiny_model, rl_files, capsys, monkeypatch, loss):
    args, cfg = composed(tiny_model, rl_files, capsys, monkeypatch, f"grpo.loss={loss}")
    assert [OmegaConf.select(cfg, key) for key in LOSS_KEYS] == EXPECTED[loss]
    assert set(grpo.LOSSES[loss]) == set(LOSS_KEYS)  # every variant names the same keys: a switch shows them all
    assert sum(a.split("=", 1)[0] in LOSS_KEYS for a in args) == len(LOSS_KEYS)  # each once, on the command line
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_default_is_dapo_and_a_verl_key_given_wins(tiny_model, rl_files, capsys, monkeypatch):
    _, cfg = composed(tiny_model, rl_files, capsys, monkeypatch)
    assert [OmegaConf.select(cfg, key) for key in LOSS_KEYS] == EXPECTED["dapo"]
    args, cfg = composed(tiny_model, rl_files, capsys, monkeypatch, "grpo.loss=dr_grpo",
                         "actor_rollout_ref.actor.clip_ratio_high=0.3", "grpo.max_response_length=512")
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == 0.3 and args.count(ACTOR + "clip_ratio_high=0.3") == 1
    assert cfg.actor_rollout_ref.actor.loss_scale_factor == 512  # Dr. GRPO's constant is the response budget


def test_rewards_reach_combined_score_through_verls_loader(tiny_model, rl_files, capsys, monkeypatch):
    """The weights and limits, as verl's own loader hands them to rewards.combined_score."""
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

    from plugins.grpo_variants import TokenCountRewardManager

    _, cfg = composed(tiny_model, rl_files, capsys, monkeypatch, "grpo.overlong=penalty", "grpo.rewards.format=0.5",
                      "grpo.overlong_buffer=256")
    assert resolve_reward_manager_cls(cfg) is TokenCountRewardManager
    fn = get_custom_reward_fn(cfg)
    got = fn(data_source="openai/gsm8k", solution_str="#### 71", ground_truth="72", extra_info={"response_length": 896})
    # wrong (0) + 0.5 x formatted (1) + 1.0 (penalty's default weight) x (768 - 896) / 256
    assert (got["score"], got["reward_correct"], got["reward_format"], got["reward_length"]) == (0.0, 0.0, 1.0, -0.5)
    assert dict(cfg.reward.custom_reward_function.reward_kwargs.weights) == {"correct": 1.0, "format": 0.5, "length": 1.0}
    _, cfg = composed(tiny_model, rl_files, capsys, monkeypatch)  # default: strict correctness, nothing else
    got = get_custom_reward_fn(cfg)(data_source="openai/gsm8k", solution_str="#### 72", ground_truth="72")
    assert (got["score"], got["reward_length"]) == (1.0, 0.0) and "max_response_length" not in \
        cfg.reward.custom_reward_function.reward_kwargs


def test_overlong_filter_is_loaded_into_every_ray_process_only_when_asked(tiny_model, rl_files, capsys, monkeypatch):
    from stages.config import load_config

    _, cfg = composed(tiny_model, rl_files, capsys, monkeypatch, "grpo.overlong=filter")
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == \
        "plugins.hf_rollout,plugins.overlong_filter"
    assert grpo.grpo_environment(load_config("grpo", ["grpo.overlong=filter"]), None)["VERL_USE_EXTERNAL_MODULES"] \
        == "plugins.hf_rollout,plugins.overlong_filter"  # another node's `ray start` too
    _, cfg = composed(tiny_model, rl_files, capsys, monkeypatch)
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "plugins.hf_rollout"


def test_grpo_plugins_join_ladders_modules_in_every_ray_process_and_a_bad_value_is_named(
        tiny_model, rl_files, capsys, monkeypatch):
    from stages.config import load_config

    _, cfg = composed(tiny_model, rl_files, capsys, monkeypatch, "grpo.plugins=[bench.stale_rollout]")
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == \
        "plugins.hf_rollout,bench.stale_rollout"
    for bad in ("grpo.plugins=bench.stale_rollout", "grpo.plugins=['a,b']"):
        with pytest.raises(SystemExit, match="grpo.plugins"):
            grpo.external_modules(load_config("grpo", [bad]))


def test_stale_rollout_control_keeps_the_first_steps_weights_and_refuses_a_full_vllm_update():
    import asyncio

    from bench import stale_rollout
    from bench.stale_rollout import stale

    stale_rollout._FIRST.clear()

    class Adapter:
        async def update_weights(self, weights, global_steps=None, **kwargs):
            self.got = [*getattr(self, "got", []), (global_steps, list(weights))]

    Adapter.update_weights = stale(Adapter.update_weights, keeps_weights_asleep=False)
    a = Adapter()
    for step, peft in ((1, None), (1, {"r": 4}), (2, {"r": 4}), (3, {"r": 4})):  # base + adapter, then adapters
        asyncio.run(a.update_weights(iter([("w", step)]), global_steps=step, peft_config=peft))
    assert a.got == [(1, [("w", 1)]), (1, [("w", 1)])]  # only the first step's two updates arrived
    with pytest.raises(RuntimeError, match="LoRA"):
        asyncio.run(a.update_weights(iter([]), global_steps=4, peft_config=None))
    assert stale(Adapter.update_weights, True) is Adapter.update_weights  # wrapped once, whatever imports it


def test_stale_rollout_control_reaches_the_class_verl_builds_in_a_worker():
    """As in a Ray worker: the hf rollout's module is imported first, `import verl` inside it loads the external
    modules, this one among them, while plugins.hf_rollout is still half-imported."""
    import subprocess
    import sys

    code = ("import plugins.hf_rollout\n"
            "from verl.workers.rollout.base import get_rollout_class\n"
            "c = get_rollout_class('hf', 'async')\n"
            "print(c.__name__, c.__mro__[1].__name__, c.update_weights._ladder_stale)")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="plugins.hf_rollout,bench.stale_rollout",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["Stale_hf", "HFServerAdapter", "True"], done.stdout[-500:]


def test_filter_hands_the_update_a_mask_without_truncated_rows_and_restores_it():
    from verl import DataProto

    from plugins.overlong_filter import masking_truncated

    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    batch = DataProto.from_single_dict({"response_mask": mask.clone(),
                                        "truncated": np.array([0.0, 1.0, 0.0], dtype=object)})
    seen = []
    update = masking_truncated(lambda self, b: seen.append(b.batch["response_mask"].clone()) or "metrics")
    assert update(None, batch) == "metrics"
    assert seen[0].tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]] and torch.equal(batch.batch["response_mask"], mask)
    with pytest.raises(RuntimeError, match="no `truncated` column"):
        update(None, DataProto.from_single_dict({"response_mask": mask}))


@pytest.mark.parametrize("argv, message", [
    (["grpo.loss=ppo"], "grpo.loss=ppo: use one of grpo, dapo, dr_grpo"),
    (["grpo.overlong=cut"], "grpo.overlong=cut: use one of none, filter, penalty"),
    (["grpo.rewards.length=0.5"], "grpo.rewards.length=0.5 weighs the overlong penalty"),
    (["grpo.overlong=penalty", "grpo.overlong_buffer=2000"], "grpo.overlong_buffer=2000"),
    (["grpo.overlong=penalty", "grpo.overlong_buffer=0"], "grpo.overlong_buffer=0"),
    (["grpo.rewards.format=abc"], "weights.format must be a number"),
    (["+grpo.rewards.formt=1"], r"unknown reward term\(s\) \['formt'\]"),
    (["grpo.rewards=5"], "grpo.rewards=5: a mapping"),
    (["algorithm.filter_groups.enable=true"], "only in its v1 trainer"),
])
def test_bad_values_stop_before_anything_naming_the_key(tiny_model, rl_files, gsm8k_dir, tmp_path, argv, message):
    # a dry run; a real launch stops before it prepares its data (outputs/x/data), writes a manifest or starts Ray
    for launch_args in (["--dry_run", *rl_files], ["--train_size", "8"]):
        with pytest.raises(SystemExit, match=message):
            stages_main(["--stage", "grpo", *launch_args, "--init", str(tiny_model), "--rollout", "hf",
                         f"run.output_dir={tmp_path}", "run.name=x", *argv])
    assert not (tmp_path / "x").exists()


# ---- plugins/grpo_variants.py on its own
def test_reward_manager_hands_each_sample_its_own_token_count(tiny_model):
    """Two samples of one group share an extra_info dict (verl repeats the prompt row): each call gets its own
    count, the shared dict is left alone, and the count and truncation come back for the rollout dump."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto

    from plugins.grpo_variants import TokenCountRewardManager

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eos, word = tok.eos_token_id, tok.encode(" 4")[0]
    seen = []

    def fn(data_source, solution_str, ground_truth, extra_info=None):
        seen.append(dict(extra_info))
        return {"score": 0.0, "acc": 0.0}

    config = OmegaConf.create({"actor_rollout_ref": {"model": {"path": str(tiny_model)}}})
    manager = TokenCountRewardManager(config, tok, fn)
    shared = {"index": 3}
    responses = torch.tensor([[word, word, eos, 0], [word, word, word, word], [word, word, word, eos]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    out = []
    for row in range(3):
        data = DataProto.from_single_dict({
            "responses": responses[row:row + 1], "prompts": torch.tensor([[7, 8]]),
            "attention_mask": torch.cat([torch.ones(1, 2, dtype=torch.long), mask[row:row + 1]], 1),
            "data_source": np.array(["openai/gsm8k"], dtype=object),
            "reward_model": np.array([{"ground_truth": "4"}], dtype=object),
            "extra_info": np.array([shared], dtype=object)})
        out.append(manager.loop.run_until_complete(manager.run_single(data))["reward_extra_info"])
    assert [s["response_length"] for s in seen] == [3, 4, 4] and shared == {"index": 3}
    assert all(s["index"] == 3 for s in seen)
    # full length without a stop token: cut; the one that ends with EOS at the limit finished
    assert [(o["response_length"], o["truncated"]) for o in out] == [(3.0, 0.0), (4.0, 1.0), (4.0, 0.0)]


def test_truncation_rule_docstring_examples_hold():
    import doctest

    import plugins.grpo_variants

    failed, tried = doctest.testmod(plugins.grpo_variants)
    assert tried >= 1 and failed == 0


def test_stop_ids_are_the_tokenizers_and_generation_configs_eos(tiny_model, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from plugins.grpo_variants import stop_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert stop_ids(tok, str(tiny_model)) == {tok.eos_token_id}
    GenerationConfig(eos_token_id=[tok.eos_token_id, 5]).save_pretrained(tmp_path)
    assert stop_ids(tok, str(tmp_path)) == {tok.eos_token_id, 5}


# ---- the report's diagnostics, from hand-made metrics and rollout dumps
def sample(prompt, score, acc, fmt, length, n, cut):
    return {"input": prompt, "output": "...", "score": score, "acc": acc, "reward_correct": acc, "reward_format": fmt,
            "reward_length": length, "response_length": n, "truncated": cut}


def test_report_rows_hold_each_term_and_the_lengths_of_right_and_wrong_answers(tmp_path):
    from stages import grpo_report

    out = tmp_path / "run" / "grpo"
    (out / "logs").mkdir(parents=True)
    (out / "rollouts").mkdir()
    metric = {"critic/score/mean": 0.5, "actor/entropy": 1.5, "actor/grad_norm": 0.25, "actor/pg_clipfrac": 0.125}
    (out / "logs" / "metrics.0.jsonl").write_text(json.dumps({"step": 1, "data": metric}) + "\n")
    rows = [sample("p", 1.0, 1.0, 1.0, 0.0, 10, 0.0), sample("p", 0.0, 0.0, 1.0, -0.5, 30, 0.0),
            sample("q", 0.0, 0.0, 0.0, -1.0, 40, 1.0), sample("q", 0.0, 0.0, 0.0, -1.0, 40, 1.0)]
    (out / "rollouts" / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = grpo_report.curve(out)
    assert {k: row[k] for k in ("entropy", "grad_norm", "clipfrac", "reward_correct", "reward_format", "reward_length",
                                "truncated", "len_correct", "len_incorrect", "all_equal_groups")} == \
        {"entropy": 1.5, "grad_norm": 0.25, "clipfrac": 0.125, "reward_correct": 0.25, "reward_format": 0.5,
         "reward_length": -0.625, "truncated": 0.5, "len_correct": 10.0, "len_incorrect": (30 + 40 + 40) / 3,
         "all_equal_groups": 0.5}
    grpo_report.add_to_report(out, [row], {"loss": "dapo", "overlong": "penalty", "rewards": {"length": 1.0}})
    text = (tmp_path / "run" / "report.md").read_text()
    assert "| 1 | 1.5000 | 0.2500 | 0.1250 | 0.2500 | 0.5000 | -0.6250 | 0.5000 | 10.0000 | 36.6667 |" in text
    # without the penalty the length term is not a column; a dump from before the terms reads acc and format_ok
    (out / "rollouts" / "1.jsonl").write_text(json.dumps({"input": "p", "score": 1.0, "acc": 1.0, "format_ok": 1.0}))
    (row,) = grpo_report.curve(out)
    assert (row["reward_correct"], row["reward_format"], row["len_correct"], row["truncated"]) == (1.0, 1.0, None, None)
    grpo_report.add_to_report(out, [row], {"loss": "dapo", "overlong": "none"})
    assert "reward_length" not in (tmp_path / "run" / "report.md").read_text()


# ---- real GRPO runs on CPU
TINY = [*CPU_RUN, "grpo.max_response_length=16", "grpo.val_size=2", "grpo.final_eval=false"]
GROUPS_OF_4 = ["grpo.group_size=4"]  # with samples that stop about half the time, 1 in 8 groups scores alike


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """The tiny model with an untied LM head whose EOS row is 17x larger: it stops within 16 tokens about half the
    time (most often at once), so samples of one prompt differ in length, in truncation and so in the length term."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from stages.tiny_model import build_model

    path = build_model(tmp_path_factory.mktemp("eos") / "model", tie=False)
    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    weights = load_file(str(path / "model.safetensors"))
    weights["lm_head.weight"][eos] *= 17
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def run_grpo(model, out, *argv):
    assert stages_main([*TINY, "--init", str(model), f"run.output_dir={out}", *argv]) == 0
    return out / "r" / "grpo"


def dumps(out: Path) -> dict[int, list[dict]]:
    return {int(p.stem): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((out / "rollouts").glob("*.jsonl"))}


def advantages(samples: list[dict], by_std: bool) -> list[float]:
    """verl's GRPO advantage per sample (core_algos.compute_grpo_outcome_advantage), from the dumped scores."""
    groups = defaultdict(list)
    for s in samples:
        groups[s["input"]].append(s["score"])
    out = []
    for s in samples:
        scores = torch.tensor(groups[s["input"]])
        centred = s["score"] - scores.mean().item()
        out.append(centred / (scores.std().item() + 1e-6) if by_std else centred)
    return out


def pg_losses(samples: list[dict], adv: list[float], max_len: int) -> dict[str, float]:
    """The policy-gradient loss of an on-policy step (ratio 1: each token's loss is -A) under each aggregation."""
    n = [s["response_length"] for s in samples]
    return {"token-mean": -sum(a * k for a, k in zip(adv, n)) / sum(n),
            "seq-mean-token-mean": -sum(adv) / len(samples),
            "seq-mean-token-sum-norm": -sum(a * k for a, k in zip(adv, n)) / len(samples) / max_len}


def check_terms(samples: list[dict], weights: dict, max_len: int, buffer: int):
    for s in samples:
        assert 1 <= s["response_length"] <= max_len and (not s["truncated"] or s["response_length"] == max_len)
        assert s["reward_length"] == length_reward(int(s["response_length"]), max_len, buffer)
        expected = sum(weights[t] * s[f"reward_{t}"] for t in weights)
        assert abs(s["score"] - expected) < 1e-6, s  # what verl trained on is the weighted sum


@pytest.mark.slow
def test_dr_grpo_with_the_overlong_penalty_trains_on_weighted_terms(eos_model, gsm8k_dir, tmp_path):
    out = run_grpo(eos_model, tmp_path, "grpo.loss=dr_grpo", "grpo.overlong=penalty", "grpo.overlong_buffer=8",
                   "grpo.rewards.format=0.5", "grpo.rewards.length=0.5", *GROUPS_OF_4)
    metrics, steps = launch.read_metrics(out), dumps(out)
    assert sorted(steps) == [1, 2]
    for step, samples in steps.items():
        check_terms(samples, {"correct": 1.0, "format": 0.5, "length": 0.5}, 16, 8)
        assert abs(metrics[step]["critic/score/mean"] - np.mean([s["score"] for s in samples])) < 1e-5
    samples = steps[1]
    # Dr. GRPO: advantages are score - group mean (no std), and the loss is token sums / (samples x 16)
    adv = advantages(samples, by_std=False)
    assert any(adv), "every group scored alike: nothing to check the loss on"
    assert abs(metrics[1]["critic/advantages/max"] - max(adv)) < 1e-5
    assert abs(max(advantages(samples, by_std=True)) - max(adv)) > 1e-3  # the std would have changed it
    losses = pg_losses(samples, adv, 16)
    assert abs(metrics[1]["actor/pg_loss"] - losses["seq-mean-token-sum-norm"]) < 1e-4, (metrics[1]["actor/pg_loss"], losses)
    assert min(abs(losses["seq-mean-token-sum-norm"] - losses[m]) for m in ("token-mean", "seq-mean-token-mean")) > 1e-3

    # and it trained on them: after one step at lr 1e-2 the penalty is smaller (here the policy learnt to stop early)
    assert np.mean([s["reward_length"] for s in steps[2]]) > np.mean([s["reward_length"] for s in samples])

    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["loss"], manifest["overlong"], manifest["rewards"]) == \
        ("dr_grpo", "penalty", {"correct": 1.0, "format": 0.5, "length": 0.5})
    # the report's per-step diagnostics: entropy, gradient norm, clip fraction, each term, lengths by outcome
    section = (out.parent / "report.md").read_text().split("## GRPO", 1)[1]
    header = "| step | entropy | grad_norm | clipfrac | reward_correct | reward_format | reward_length | truncated " \
             "| len_correct | len_incorrect |"
    assert header in section
    row = next(r for r in manifest["curve"] if r["step"] == 1)
    assert row["reward_length"] == pytest.approx(np.mean([s["reward_length"] for s in samples]))
    assert row["len_incorrect"] == pytest.approx(np.mean([s["response_length"] for s in samples]))
    assert row["len_correct"] is None and row["grad_norm"] == metrics[1]["actor/grad_norm"] > 0
    assert row["entropy"] == metrics[1]["actor/entropy"] and row["clipfrac"] == metrics[1]["actor/pg_clipfrac"]


@pytest.mark.slow
def test_dapo_is_token_level_with_std_scaled_advantages(eos_model, gsm8k_dir, tmp_path):
    out = run_grpo(eos_model, tmp_path, "grpo.overlong=penalty", "grpo.overlong_buffer=8", *GROUPS_OF_4)  # dapo
    metrics, steps = launch.read_metrics(out), dumps(out)
    for samples in steps.values():
        check_terms(samples, {"correct": 1.0, "format": 0.0, "length": 1.0}, 16, 8)  # penalty weight 0 → 1.0
    samples = steps[1]
    adv = advantages(samples, by_std=True)
    assert any(adv), "every group scored alike: nothing to check the loss on"
    assert abs(metrics[1]["critic/advantages/max"] - max(adv)) < 1e-4
    losses = pg_losses(samples, adv, 16)
    assert abs(metrics[1]["actor/pg_loss"] - losses["token-mean"]) < 1e-4, (metrics[1]["actor/pg_loss"], losses)
    assert min(abs(losses["token-mean"] - losses[m]) for m in ("seq-mean-token-sum-norm", "seq-mean-token-mean")) > 1e-3


@pytest.mark.slow
def test_overlong_filter_leaves_truncated_samples_without_gradient(tiny_model, gsm8k_dir, tmp_path):
    """The plain tiny model rarely says EOS within 8 tokens: a step whose samples were all cut makes no update at all,
    although the entropy bonus (CPU_RUN) moves the weights unfiltered (test_grpo.py's
    test_two_node_grpo_on_one_host_trains_on_both_ray_nodes, which runs CPU_RUN)."""
    # also the plumbing of ladder's varlen attention into verl's Ray workers (on CPU: its per-sample path)
    out = run_grpo(tiny_model, tmp_path, "grpo.loss=grpo", "grpo.overlong=filter", "grpo.max_response_length=8",
                   "--attn", "ladder_varlen")
    metrics, steps = launch.read_metrics(out), dumps(out)
    # the actor's log-probs (ladder_varlen) are the hf rollout's (sdpa) at step 2 too
    assert metrics[2]["training/rollout_probs_diff_max"] < 2e-4, metrics[2]["training/rollout_probs_diff_max"]
    all_cut = [step for step, samples in steps.items() if all(s["truncated"] == 1.0 for s in samples)]
    assert all_cut, "no step had only truncated samples: nothing to check"
    for step, samples in steps.items():
        if step in all_cut:
            assert metrics[step]["actor/grad_norm"] == 0.0, step
        else:  # the samples that finished still train
            assert metrics[step]["actor/grad_norm"] > 0.0, step
    if all_cut == sorted(steps):
        from safetensors.torch import load_file

        manifest = json.loads((out / "manifest.json").read_text())
        before = load_file(str(tiny_model / "model.safetensors"))
        after = load_file(str(Path(manifest["hf_model"]) / "model.safetensors"))
        assert all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
