"""train.sh's flags → config overrides, and config routing of bare verl keys."""
from pathlib import Path

import pytest

from stages.cli import parse
from stages.config import load_config


def test_flags_become_stage_keys():
    assert parse(["--lr", "2e-5", "--epochs", "2"])[1] == ["sft.lr=2e-5", "sft.epochs=2"]
    assert parse(["--stage", "eval", "--dataset", "math500", "--limit", "5"])[1] == ["eval.dataset=math500", "eval.limit=5"]
    assert parse(["--stage", "ei", "--samples", "8", "--lr", "1e-5"])[1] == ["sft.lr=1e-5", "ei.samples=8"]
    assert parse(["--use_lora", "trainer.save_freq=10"])[1] == ["model.use_lora=true", "trainer.save_freq=10"]


def test_flag_for_another_stage_is_refused():
    with pytest.raises(SystemExit, match="--lr does not apply to --stage eval"):
        parse(["--stage", "eval", "--lr", "1e-5"])


def test_bare_verl_keys_route_to_the_stage_block():
    cfg = load_config("sft", ["trainer.total_epochs=5", "optim.lr_scheduler_type=constant", "model.path=/m"])
    assert cfg.sft.verl.trainer.total_epochs == 5 and cfg.sft.verl.optim.lr_scheduler_type == "constant"
    assert cfg.model.path == "/m" and cfg.sft.verl.model.path == "/m"
    with pytest.raises(ValueError, match="not a section"):
        load_config("eval", ["trainer.total_epochs=5"])


def test_lora_rank_follows_use_lora():
    assert load_config("sft", []).sft.verl.model.lora_rank == 0
    assert load_config("sft", ["model.use_lora=true", "model.lora_rank=32"]).sft.verl.model.lora_rank == 32


# ---- environment variables: stages/cli.py's FLAGS table, read in Python (train.sh only execs python -m stages)
def test_environment_variables_stand_in_for_their_flags():
    env = {"N_GPUS": "8", "NNODES": "2", "MASTER_ADDR": "10.0.0.1", "LEARNING_RATE": "3e-5", "USE_LORA": "1",
           "GRADIENT_CHECKPOINTING": "0"}
    stage, overrides = parse(["--stage", "grpo"], env)
    assert stage == "grpo"
    assert set(overrides) == {"launch.n_gpus=8", "launch.nnodes=2", "launch.master_addr=10.0.0.1", "grpo.lr=3e-5",
                              "model.use_lora=true", "model.gradient_checkpointing=false"}
    # the flag wins over its variable, and key=value wins over both (it comes last)
    assert parse(["--lr", "1e-4", "sft.lr=2e-4"], {"LEARNING_RATE": "3e-5"})[1] == ["sft.lr=1e-4", "sft.lr=2e-4"]
    assert load_config("sft", parse(["--lr", "1e-4"], {"LEARNING_RATE": "3e-5"})[1]).sft.lr == 1e-4


def test_environment_switches_take_booleans_and_refuse_anything_else():
    assert parse([], {"USE_LORA": "0"})[1] == ["model.use_lora=false"]
    with pytest.raises(SystemExit, match="USE_LORA=maybe"):
        parse([], {"USE_LORA": "maybe"})


def test_a_training_variable_is_said_and_skipped_for_eval(capsys):
    assert parse(["--stage", "eval"], {"LEARNING_RATE": "3e-5"})[1] == []
    assert "LEARNING_RATE does not apply to --stage eval" in capsys.readouterr().err


def test_train_sh_only_hands_over_to_python(tmp_path):
    """train.sh names no variable or flag of its own: the one table is stages/cli.py's."""
    import subprocess
    import sys

    from stages.cli import FLAGS
    from stages.config import REPO

    script = (REPO / "train.sh").read_text()
    assert not [f.env for f in FLAGS if f.env and f.env in script]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "N_GPUS": "3", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(REPO / "train.sh"), "--stage", "data", "--dry_run", f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "n_gpus: 3" in done.stdout


def test_sweep_takes_comma_lists():
    assert parse(["--stage", "sweep", "--train_size", "128,full", "--lr", "1e-5,2e-5"])[1] == [
        "sweep.train_sizes='128,full'", "sweep.lrs='1e-5,2e-5'"]
    cfg = load_config("sweep", parse(["--stage", "sweep", "--train_size", "128,full"])[1])
    assert cfg.sweep.train_sizes == "128,full"


# ---- the stage table
def test_one_table_of_stages_drives_the_cli_the_chain_and_the_report():
    from stages import registry
    from stages.report import add_section

    assert parser_choices() == registry.names()
    assert registry.chain() == ("sft", "ei", "grpo", "eval") and registry.trainers() == ("sft", "ei", "grpo")
    assert [registry.report_order(k) for k in ("sft", "eval-gsm8k", "ei-round-2", "grpo", "sweep")] == [10, 20, 30, 40, 50]
    for stage in registry.STAGES:  # every row names a module with run(cfg)
        import importlib

        assert callable(importlib.import_module(stage.module).run)
    assert add_section  # report reads its order from the table (test_evaluate covers the section files)


def parser_choices():
    from stages.cli import parser

    return tuple(next(a for a in parser()._actions if a.dest == "stage").choices)
