"""`--stage all`: SFT → EI → GRPO → eval chained through manifests on CPU, and a rerun that resumes.

One chain, run once by a module fixture: SFT → EI (one round) → GRPO → eval with LoRA. Its GRPO stage also carries
the checks of a LoRA GRPO run on CPU, and its EI stage those of a real EI round (a Ray run costs about a minute on 2
cores: the chain's serves both). A plain (full-weight) GRPO run's checks are made on tests/test_grpo.py's two-node
run, which runs the same settings."""
import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from stages import launch
from stages.__main__ import main as stages_main

ALL = ["--stage", "all", "--device", "cpu", "--train_size", "8", "run.name=chain",
       # SFT (and EI's round): one step of 8 rows
       "--epochs", "1", "--batch_size", "8", "--micro_batch_size", "4", "--lr", "1e-3", "sft.verl.data.num_workers=0",
       "model.gradient_checkpointing=false",
       # EI: one round of 3 samples a question (planted: see the chain fixture)
       "ei.rounds=1", "ei.samples=3",
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
def chain(tiny_model, gsm8k_dir, tmp_path_factory):
    """`./train.sh --stage all --use_lora` with one EI round. The tiny model is never right, so EI's sampler is planted
    (as in tests/test_ei.py): a right, a duplicate and a wrong completion per question; everything else is real.
    (its argv, outputs/chain, the policies EI sampled)."""
    import pandas as pd

    import stages.ei as ei
    from stages.generate import Generation

    need_cachetools()
    root = tmp_path_factory.mktemp("chain")
    run = root / "chain"
    policies = []

    def planted(cfg, policy, tok, prompts, stops):
        policies.append(policy)
        golds = [r["ground_truth"] for r in pd.read_parquet(run / "data" / "rl_train.parquet")["reward_model"]]
        assert len(golds) == len(prompts)
        right, wrong = (lambda gold: Generation(f"So.\n#### {gold}", "stop", 5)), Generation("#### -1", "stop", 3)
        # question 0 always right (two texts), question 1 never, the others right twice (the same text), wrong once
        other = (lambda gold: Generation(f"Yes.\n#### {gold}", "stop", 5))
        return [g for i, gold in enumerate(golds)
                for g in ([right(gold), other(gold), right(gold)] if i == 0 else [wrong] * 3 if i == 1
                          else [right(gold)] * 2 + [wrong])]

    # GRPO on the 6 questions EI's round solved sometimes: one batch of 4 an epoch, so 2 epochs for 2 steps
    argv = [*ALL, "--use_lora", "--lora_rank", "4", "--model", str(tiny_model), f"run.output_dir={root}",
            "grpo.prompts=mixed"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ei, "sample", planted)
        assert stages_main(argv) == 0
    return argv, run, policies


@pytest.mark.slow
def test_all_chains_sft_ei_grpo_eval_and_reports_every_rung(chain):
    import pandas as pd

    _, run, policies = chain
    sft, ei_, grpo, final = manifests(run, "sft", "ei", "grpo", "eval")
    assert sft["status"] == ei_["status"] == grpo["status"] == final["status"] == "done"
    # EI started from the SFT export, sampled it once, and kept one completion per question
    assert policies == [sft["hf_model"]] and Path(ei_["base_model"]) == Path(sft["hf_model"])
    (round_1,) = ei_["rounds"]
    # 8 questions x 3 samples: duplicate right ones are dropped, wrong ones are not kept
    assert (round_1["questions"], round_1["samples"], round_1["correct_samples"], round_1["kept"]) == (8, 24, 15, 8)
    assert round_1["solve_rate"] == 7 / 8 and round_1["eval_accuracy"] == 0.0
    assert len(pd.read_parquet(run / "ei" / "round_1" / "kept.parquet")) == 8
    solve = pd.read_parquet(run / "ei" / "round_1" / "solve.parquet")
    assert solve["correct"].tolist() == [3, 0, 2, 2, 2, 2, 2, 2] and set(solve["samples"]) == {3}
    # grpo.prompts=mixed: GRPO trained on the six questions in between, two epochs of one step
    assert (grpo["prompts"], grpo["prompt_counts"]["rows"], grpo["prompt_counts"]["mixed"]) == ("mixed", 6, 6)
    picked = pd.read_parquet(grpo["train_file"])["extra_info"].map(lambda info: dict(info)["index"]).tolist()
    assert picked == solve["index"].tolist()[2:] and grpo["config"]["grpo"]["epochs"] == 2
    assert json.loads((run / "ei" / "round_1" / "sft" / "manifest.json").read_text())["status"] == "done"
    # GRPO started from EI's last round, and the closing eval measured GRPO's export
    assert grpo["init_stage"] == "ei" and Path(grpo["base_model"]) == Path(ei_["hf_model"]) == Path(round_1["policy"])
    assert Path(final["model"]) == Path(grpo["hf_model"]) and final["metrics"]["n"] == 4
    # every rung measured on the same test set and listed in report.md's opening section, in order
    for rung in ("base/eval", "sft/eval", "ei/round_1/eval", "eval"):
        assert json.loads((run / rung / "metrics.json").read_text())["n"] == 4, rung
    report = (run / "report.md").read_text()
    assert "## GRPO" in report and "all_equal_groups" in report and "Evaluation on" in report
    assert report.index("## The ladder") < report.index("## Expert iteration") < report.index("## GRPO")
    ladder = report.split("## The ladder")[1].split("\n## ")[0]
    assert [line.split("|")[1].strip() for line in ladder.splitlines() if line.startswith("| ")][1:] == [
        "base", "sft", "ei round 1", "grpo"]
    assert (run / "report" / "figures" / "ladder.png").stat().st_size > 1000
    assert set(json.loads((run / "chain.json").read_text())) == {"base-eval", "sft", "sft-eval", "ei", "grpo", "eval"}
    # every training step's groups were counted from verl's rollout dump: 4 prompts, 2 samples each
    assert [(r["step"], r["groups"]) for r in grpo["curve"] if "groups" in r] == [(1, 4), (2, 4)]
    assert all(0 <= r["all_equal_groups"] <= 1 for r in grpo["curve"] if "groups" in r)


@pytest.mark.slow
def test_a_rerun_of_the_chain_or_of_its_ei_stage_does_nothing_again(chain, capsys):
    import stages.ei as ei

    argv, run, _ = chain
    capsys.readouterr()
    sampled = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ei, "sample", lambda cfg, policy, *args: sampled.append(policy) or [])
        assert stages_main(argv) == 0  # nothing left to do: every stage is skipped
        said = capsys.readouterr().out
        assert all(f"[all] {s}: done earlier" in said for s in ("sft", "ei", "grpo", "eval")), said
        # the EI stage run again on its own (`--stage ei`): its finished round is not sampled again
        (ei_,) = manifests(run, "ei")
        assert stages_main(["--stage", "ei", "--device", "cpu", "--train_size", "8", "--samples", "3", "--rounds", "1",
                            "--use_lora", "--init", str(run / "sft"), f"run.output_dir={run.parent}",
                            f"run.name={run.name}"]) == 0
    assert sampled == [] and manifests(run, "ei")[0]["hf_model"] == ei_["hf_model"]


@pytest.mark.slow
def test_lora_grpo_on_cpu_syncs_merged_weights_and_exports_the_adapter(chain):
    """The chain's GRPO stage: LoRA, from the LoRA EI round's merged export. (ladder's varlen attention in verl's Ray
    workers, which this test also ran, is test_grpo_variants.py's overlong-filter run: the SFT stage refuses it on CPU.)"""
    _, run, _ = chain
    out = run / "grpo"
    (sft, ei_, manifest) = manifests(run, "sft", "ei", "grpo")
    assert sft["lora"] and ei_["lora"]
    assert manifest["base_model"] == ei_["hf_model"]  # the merged export of EI's LoRA round, not the adapter
    assert manifest["lora"] and manifest["lora_to_rollout"] == "merged into the weights"
    assert "adapter disabled" in manifest["reference_policy"]
    assert Path(manifest["adapter"], "adapter_config.json").exists()  # export refuses an all-zero adapter
    gap = launch.read_metrics(out)[2]["training/rollout_probs_diff_max"]
    # the merged weights reached the rollout (tests/test_grpo.py's two-node run checks a full-weight run alike)
    assert gap < 2e-4, gap


def test_all_refuses_a_bare_verl_key(capsys):
    assert stages_main(["--stage", "all", "--dry_run", "trainer.total_epochs=2"]) == 2
    assert "has no verl block" in capsys.readouterr().err


def test_all_dry_run_names_the_chain(tiny_model, tmp_path, capsys):
    assert stages_main(["--stage", "all", "--dry_run", "--model", str(tiny_model), f"run.output_dir={tmp_path}"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"[all] {tmp_path / tiny_model.name}: data -> sft -> ei -> grpo -> eval"
    # GRPO's mixed prompts are EI's counts: without EI the chain says so before SFT starts
    with pytest.raises(SystemExit, match="grpo.prompts=mixed needs the expert-iteration stage"):
        stages_main(["--stage", "all", "--dry_run", "--model", str(tiny_model), "ei.rounds=0", "grpo.prompts=mixed"])
    # ei.rounds=0 (stages/all.py's LoRA example) skips expert iteration: GRPO follows SFT
    assert stages_main(["--stage", "all", "--dry_run", "--model", str(tiny_model), f"run.output_dir={tmp_path}",
                        "ei.rounds=0"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": data -> sft -> grpo -> eval")


def test_until_stops_the_chain_after_a_stage_and_the_same_command_goes_on(gsm8k_dir, tmp_path, monkeypatch, capsys):
    """--until sft: SFT and its eval, then stop; the same command without it resumes at EI. The stages are stand-ins
    that write a done manifest (the chain fixture runs real ones)."""
    from stages import all as chain_all
    from stages import registry

    ran = []

    def stage(cfg, name):
        ran.append(name)
        if name == "grpo":  # the EI rung's eval measured this model on this test set: no step-0 validation again
            assert cfg.grpo.verl.trainer.val_before_train is False
        folder = tmp_path / "u" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps({"stage": name, "status": "done"}))
        return 0

    monkeypatch.setattr(registry, "run", stage)
    monkeypatch.setattr(chain_all, "rung_eval", lambda cfg, run_dir, rung, model: ran.append(f"{rung} eval") and 0)
    args = ["--stage", "all", "--train_size", "8", "run.name=u", f"run.output_dir={tmp_path}"]
    assert stages_main([*args, "--until", "sft"]) == 0
    assert ran == ["base eval", "sft", "sft eval"] and "stopped after sft" in capsys.readouterr().out
    ran.clear()
    assert stages_main(args) == 0
    assert ran == ["base eval", "sft eval", "ei", "grpo", "eval"]  # (rung_eval itself skips a rung it has)
    with pytest.raises(SystemExit, match="run.until=rl: use one of sft, ei, grpo, eval"):
        stages_main([*args, "--until", "rl"])
    # validation on part of the test set (grpo.val_size) is not what the rung's eval measured: verl's step 0 stays
    monkeypatch.setattr(registry, "run", lambda cfg, name: ran.append(cfg.grpo.verl.trainer.val_before_train) or 0)
    (tmp_path / "u" / "grpo" / "manifest.json").unlink()
    ran.clear()
    assert stages_main([*args, "grpo.val_size=64"]) == 0 and ran == ["base eval", "sft eval", True]  # grpo only


def test_the_ladder_table_leaves_a_rungs_wall_time_blank_when_the_chain_did_not_time_it(tmp_path):
    """A base eval made beforehand by `--stage eval` into <run>/base/eval (the chain then skips it) has no time in
    chain.json: its cell is blank, not 0 s; the SFT rung sums training and eval."""
    from stages import all as chain_all

    metrics = {"accuracy": 0.2, "lenient_accuracy": 0.2, "format_accuracy": 0.9, "trunc_rate": 0.0, "avg_gen_len": 9.0,
               "n": 4}
    for rung in ("base", "sft"):
        (tmp_path / rung / "eval").mkdir(parents=True)
        (tmp_path / rung / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "chain.json").write_text(json.dumps({"sft": 100.4, "sft-eval": 20.0}))
    text = chain_all.chain_report(tmp_path).read_text()
    assert "| base | 0.2000 | 0.2000 | 0.9000 | 0.0000 | 9.0000 |  | 4 |" in text
    assert "| sft | 0.2000 | 0.2000 | 0.9000 | 0.0000 | 9.0000 | 120 | 4 |" in text


def test_a_stopped_grpo_leaves_the_ladder_so_far_in_the_report(gsm8k_dir, tmp_path, monkeypatch, capsys):
    """GRPO stopped by run.time_limit (a lease's end): the chain fails with it, and report.md still shows the rungs
    measured so far and GRPO's validation steps so far, with how it stopped (the seventh and eighth sessions' GPU
    chains ended so, and their report had no GRPO at all)."""
    from stages import all as chain_all
    from stages import registry

    metrics = {"lenient_accuracy": 0.3, "format_accuracy": 0.9, "trunc_rate": 0.0, "avg_gen_len": 9.0, "n": 4}
    run = tmp_path / "u"

    def rung_eval(cfg, run_dir, rung, model):
        (run_dir / rung / "eval").mkdir(parents=True, exist_ok=True)
        (run_dir / rung / "eval" / "metrics.json").write_text(json.dumps({**metrics, "accuracy": 0.2}))
        return 0

    def stage(cfg, name):
        folder = run / name
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        if name == "ei":
            (folder / "round_1" / "eval").mkdir(parents=True)
            (folder / "round_1" / "eval" / "metrics.json").write_text(json.dumps({**metrics, "accuracy": 0.34}))
        if name != "grpo":
            (folder / "manifest.json").write_text(json.dumps({"stage": name, "status": "done"}))
            return 0
        steps = [{"step": s, "data": {"critic/score/mean": 0.5, **({"val-core/gsm8k/acc/mean@1": 0.347} if s == 10
                                                                     else {})}} for s in range(1, 16)]
        (folder / "logs" / "metrics.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
        (folder / "manifest.json").write_text(json.dumps(
            {"stage": "grpo", "status": "failed", "failure": {"kind": "time_limit", "last_checkpoint_step": 15}}))
        return 1

    monkeypatch.setattr(registry, "run", stage)
    monkeypatch.setattr(chain_all, "rung_eval", rung_eval)
    assert stages_main(["--stage", "all", "--train_size", "8", "run.name=u", f"run.output_dir={tmp_path}"]) == 1
    assert f"the ladder so far: {run / 'report.md'}" in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert "| ei round 1 | 0.3400 |" in text
    assert ("GRPO has not finished (failed, time_limit; last checkpoint step 15): verl's validation on the test set so "
            "far: 0.3470 at step 10.") in text
    assert (run / "report" / "figures" / "ladder.png").stat().st_size > 0


def test_the_chain_starts_the_next_vllm_child_before_each_training_stage(gsm8k_dir, tmp_path, monkeypatch):
    """With vLLM, SFT, EI and GRPO each run with the vLLM child of the generation after them already started (its
    import overlaps the training: 18-24 s an eval on the H200 host); the closing eval stage starts its own; a stage
    that fails stops the child it left."""
    from stages import all as chain_all
    from stages import registry, vllm_engine

    started, closed, seen = [], [], []

    class Child:  # vllm_engine.VllmChild's stand-in
        def __init__(self, devices):
            self.devices = devices
            started.append(self)

        def close(self):
            closed.append(self)

    def stage(cfg, name, fail=""):
        seen.append((name, vllm_engine._early))
        if name != "eval":  # (the eval stage starts a child of its own: evaluate.run)
            vllm_engine.take(cfg)  # what the generation after the training does (the rung's eval, EI's sampling)
        if name == fail:
            return 1
        folder = tmp_path / "u" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps({"stage": name, "status": "done"}))
        return 0

    monkeypatch.setattr(vllm_engine, "_early", None)  # no child left by another test
    monkeypatch.setattr(vllm_engine, "VllmChild", Child)
    monkeypatch.setattr(vllm_engine, "likely_vllm", lambda cfg: True)
    monkeypatch.setattr(registry, "run", stage)
    monkeypatch.setattr(chain_all, "rung_eval", lambda cfg, run_dir, rung, model: 0)
    args = ["--stage", "all", "--train_size", "8", "run.name=u", f"run.output_dir={tmp_path}"]
    assert stages_main(args) == 0
    assert [name for name, _ in seen] == ["sft", "ei", "grpo", "eval"]
    assert [child for _, child in seen] == [*started, None] and len(started) == 3
    (tmp_path / "u" / "grpo" / "manifest.json").unlink()
    seen.clear()
    assert stages_main([*args, "--until", "grpo"]) == 0  # no eval after GRPO in this run: no child for it
    assert seen == [("grpo", None)] and len(started) == 4  # (GRPO's stand-in took one of its own)
    for name in ("grpo", "eval"):
        (tmp_path / "u" / name / "manifest.json").unlink()
    monkeypatch.setattr(registry, "run", lambda cfg, name: stage(cfg, name, fail="grpo") if name == "grpo" else 0)
    monkeypatch.setattr(vllm_engine, "take", lambda cfg=None: None)  # GRPO fails before anything takes its child
    assert stages_main(args) == 1
    assert closed == [started[-1]] and len(started) == 5 and vllm_engine._early is None
