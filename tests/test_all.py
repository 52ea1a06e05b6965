"""`--stage all`: SFT → GRPO → eval chained through manifests on CPU, and a rerun that resumes.

Two chains, each run once by a module fixture: SFT → GRPO → eval with LoRA (ei.rounds=0), and SFT → EI → GRPO →
eval with full weights. Their GRPO stages also carry the checks of a plain and of a LoRA GRPO run on CPU (a Ray
run costs about a minute on 2 cores: a chain's GRPO run serves both)."""
import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from stages import launch
from stages.__main__ import main as stages_main

ALL = ["--stage", "all", "--device", "cpu", "--train_size", "8", "ei.rounds=0", "run.name=chain",
       # SFT: one step of 8 rows
       "--batch_size", "8", "--micro_batch_size", "4", "--lr", "1e-3", "sft.verl.data.num_workers=0",
       "model.gradient_checkpointing=false",
       # GRPO: two steps of 4 prompts x 2 samples, the hf rollout
       "grpo.rollout=hf", "grpo.lr=1e-2", "grpo.weight_decay=0", "grpo.entropy_coef=0.01", "grpo.batch_size=4",
       "grpo.group_size=2", "grpo.mini_batch_size=4", "grpo.micro_batch_size=4", "grpo.max_response_length=16",
       "grpo.total_steps=2", "grpo.save_freq=2", "grpo.test_freq=2", "grpo.val_size=4",
       "+grpo.verl.data.dataloader_num_workers=0", "+grpo.verl.actor_rollout_ref.rollout.dtype=float32",
       "+grpo.verl.actor_rollout_ref.rollout.agent.num_workers=1", "+grpo.verl.reward.num_workers=1",
       "+grpo.verl.ray_kwargs.ray_init.num_cpus=4",
       # the closing evaluation
       "eval.limit=4", "eval.max_new_tokens=16", "eval.backend=hf"]


def need_cachetools():
    if find_spec("cachetools") is None:
        pytest.fail("verl's main_ppo imports cachetools (verl's verl-core extra): add it to pyproject.toml")


def manifests(run: Path, *stages: str) -> list[dict]:
    return [json.loads((run / s / "manifest.json").read_text()) for s in stages]


@pytest.fixture(scope="module")
def lora_chain(tiny_model, gsm8k_dir, tmp_path_factory):
    """ei.rounds=0 with LoRA (`./train.sh --stage all --use_lora ei.rounds=0`, stages/all.py's example):
    (its argv, outputs/chain)."""
    need_cachetools()
    root = tmp_path_factory.mktemp("lora_chain")
    argv = [*ALL, "--use_lora", "--lora_rank", "4", "--model", str(tiny_model), f"run.output_dir={root}"]
    assert stages_main(argv) == 0
    return argv, root / "chain"


@pytest.fixture(scope="module")
def ei_chain(tiny_model, gsm8k_dir, tmp_path_factory):
    """ei.rounds=1 between SFT and GRPO. The tiny model is never right, so EI's sampler is planted (as in
    tests/test_ei.py): a right, a duplicate and a wrong completion per question; everything else is real.
    (outputs/chain, the policies EI sampled)."""
    import pandas as pd

    import stages.ei as ei
    from stages.generate import Generation

    need_cachetools()
    root = tmp_path_factory.mktemp("ei_chain")
    run = root / "chain"
    policies = []

    def planted(cfg, policy, tok, prompts, stops):
        policies.append(policy)
        golds = [r["ground_truth"] for r in pd.read_parquet(run / "data" / "rl_train.parquet")["reward_model"]]
        assert len(golds) == len(prompts)
        return [g for gold in golds for g in (Generation(f"So.\n#### {gold}", "stop", 5),) * 2
                + (Generation("#### -1", "stop", 3),)]

    argv = [a for a in ALL if a != "ei.rounds=0"] + ["ei.rounds=1", "ei.samples=3", "--model", str(tiny_model),
                                                     f"run.output_dir={root}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ei, "sample", planted)
        assert stages_main(argv) == 0
    return run, policies


@pytest.mark.slow
def test_all_chains_sft_grpo_eval_and_a_rerun_resumes(lora_chain, capsys):
    argv, run = lora_chain
    sft, grpo, final = manifests(run, "sft", "grpo", "eval")
    assert sft["status"] == grpo["status"] == final["status"] == "done"
    assert grpo["init_stage"] == "sft" and Path(grpo["base_model"]) == Path(sft["hf_model"])
    assert Path(final["model"]) == Path(grpo["hf_model"]) and final["metrics"]["n"] == 4
    report = (run / "report.md").read_text()
    assert "## GRPO" in report and "all_equal_groups" in report and "Evaluation on" in report
    # the ladder at a glance: every rung evaluated on the same test problems, in order
    ladder = report.split("## The ladder")[1].split("\n## ")[0]
    assert [line.split(" | ")[0].lstrip("| ") for line in ladder.splitlines() if line.startswith("| ") and
            "---" not in line][1:] == ["base", "sft", "grpo"]
    assert json.loads((run / "sft" / "eval" / "metrics.json").read_text())["n"] == 4
    assert (run / "report" / "figures" / "ladder.png").stat().st_size > 1000
    # every training step's groups were counted from verl's rollout dump: 4 prompts, 2 samples each
    assert [(r["step"], r["groups"]) for r in grpo["curve"] if "groups" in r] == [(1, 4), (2, 4)]
    assert all(0 <= r["all_equal_groups"] <= 1 for r in grpo["curve"] if "groups" in r)
    capsys.readouterr()

    assert stages_main(argv) == 0  # nothing left to do: every stage is skipped
    said = capsys.readouterr().out
    assert all(f"[all] {s}: done earlier" in said for s in ("sft", "grpo", "eval")), said


@pytest.mark.slow
def test_lora_grpo_on_cpu_syncs_merged_weights_and_exports_the_adapter(lora_chain):
    """The chain's GRPO stage: LoRA, from the LoRA SFT stage's merged export. (ladder's varlen attention in verl's Ray
    workers, which this test also ran, is test_grpo_variants.py's overlong-filter run: the SFT stage refuses it on CPU.)"""
    _, run = lora_chain
    out = run / "grpo"
    (sft, manifest) = manifests(run, "sft", "grpo")
    assert sft["lora"] and manifest["base_model"] == sft["hf_model"]  # the merged SFT export, not the adapter
    assert manifest["lora"] and manifest["lora_to_rollout"] == "merged into the weights"
    assert "adapter disabled" in manifest["reference_policy"]
    assert Path(manifest["adapter"], "adapter_config.json").exists()  # export refuses an all-zero adapter
    gap = launch.read_metrics(out)[2]["training/rollout_probs_diff_max"]
    assert gap < 2e-4, gap  # the merged weights reached the rollout (see the plain run's check below)


@pytest.mark.slow
def test_all_with_an_ei_round_chains_sft_ei_grpo_and_reports_every_rung(ei_chain):
    import pandas as pd

    run, policies = ei_chain
    sft, ei_, grpo, final = manifests(run, "sft", "ei", "grpo", "eval")
    assert sft["status"] == ei_["status"] == grpo["status"] == final["status"] == "done"
    # EI started from the SFT export, sampled it once, and kept one completion per question
    assert policies == [sft["hf_model"]] and Path(ei_["base_model"]) == Path(sft["hf_model"])
    (round_1,) = ei_["rounds"]
    assert (round_1["questions"], round_1["samples"], round_1["kept"]) == (8, 24, 8)
    assert len(pd.read_parquet(run / "ei" / "round_1" / "kept.parquet")) == 8
    # GRPO started from EI's last round, and the closing eval measured GRPO's export
    assert grpo["init_stage"] == "ei" and Path(grpo["base_model"]) == Path(ei_["hf_model"]) == Path(round_1["policy"])
    assert Path(final["model"]) == Path(grpo["hf_model"])
    # every rung measured on the same test set and listed in report.md's opening section
    for rung in ("base/eval", "sft/eval", "ei/round_1/eval", "eval"):
        assert json.loads((run / rung / "metrics.json").read_text())["n"] == 4, rung
    report = (run / "report.md").read_text()
    assert report.index("## The ladder") < report.index("## Expert iteration") < report.index("## GRPO")
    ladder = report.split("## The ladder")[1].split("\n## ")[0]
    assert [line.split("|")[1].strip() for line in ladder.splitlines() if line.startswith("| ")][1:] == [
        "base", "sft", "ei round 1", "grpo"]
    assert set(json.loads((run / "chain.json").read_text())) == {"base-eval", "sft", "sft-eval", "ei", "grpo", "eval"}


@pytest.mark.slow
def test_two_grpo_steps_on_cpu_change_the_actor_and_log_metrics(ei_chain):
    """The chain's GRPO stage: full weights, 2 steps of 4 prompts x 2 samples, greedy validation at steps 0 and 2."""
    run, _ = ei_chain
    out = run / "grpo"
    (manifest,) = manifests(run, "grpo")
    init = Path(manifest["base_model"])  # EI's last round
    assert (manifest["status"], manifest["global_step"], manifest["rollout"]) == ("done", 2, "hf")
    assert manifest["reference_policy"].startswith(str(init))

    # the step metrics and validations came back through verl's JSONL logger (and TensorBoard)
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

    # the exported actor differs from the initial weights and loads in plain transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(Path(manifest["hf_model"]) / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert changed, "no weight changed in 2 GRPO steps"
    AutoModelForCausalLM.from_pretrained(manifest["hf_model"])


def test_all_refuses_a_bare_verl_key(capsys):
    assert stages_main(["--stage", "all", "--dry_run", "trainer.total_epochs=2"]) == 2
    assert "has no verl block" in capsys.readouterr().err


def test_all_dry_run_names_the_chain(tiny_model, tmp_path, capsys):
    assert stages_main(["--stage", "all", "--dry_run", "--model", str(tiny_model), f"run.output_dir={tmp_path}"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"[all] {tmp_path / tiny_model.name}: data -> sft -> ei -> grpo -> eval"
