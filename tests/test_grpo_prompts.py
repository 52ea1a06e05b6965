"""grpo.prompts=mixed: GRPO trains on the questions expert iteration's last round answered right sometimes but
not always (round_N/solve.parquet), chosen before anything starts and visible with --dry_run."""
from __future__ import annotations

import shlex

import pandas as pd
import pytest

from stages import grpo
from stages.__main__ import main as stages_main
from stages.config import load_config, write_manifest


@pytest.fixture
def ei_run(tiny_model, gsm8k_dir, tmp_path):
    """A finished EI stage over 12 training questions: round_2's counts (older) and round_10's (the last)."""
    from data_prep import prepare

    files = prepare({"dataset": "gsm8k", "train_size": 12, "seed": 42}, tmp_path / "data")
    index = [int(dict(info)["index"]) for info in pd.read_parquet(files["rl_train"])["extra_info"]]
    ei = tmp_path / "run" / "ei"
    write_manifest(ei, stage="ei", status="done", base_model=str(tiny_model), hf_model=str(tiny_model))
    # round 10: questions 0-1 always right, 2-3 never, 4-8 in between; 9-11 not sampled
    last = [4, 4, 0, 0, 1, 2, 3, 1, 3]
    for name, correct in (("round_2", [2] * 12), ("round_10", last)):
        (ei / name).mkdir(parents=True)
        pd.DataFrame({"index": index[:len(correct)], "correct": correct, "samples": 4}).to_parquet(
            ei / name / "solve.parquet")
    return {"ei": ei, "train": files["rl_train"], "test": files["rl_test"], "index": index}


def cfg_for(*keys):
    return load_config("grpo", ["grpo.batch_size=2", *keys])


def test_mixed_keeps_the_last_rounds_questions_solved_sometimes(ei_run, tmp_path):
    out = tmp_path / "run" / "grpo"
    info = {"init": str(ei_run["ei"]), "init_stage": "ei", "init_dir": str(ei_run["ei"])}
    path, counts = grpo.mixed_prompts(cfg_for("grpo.prompts=mixed"), ei_run["train"], info, out, dry_run=False)
    kept = pd.read_parquet(path)
    assert [int(dict(i)["index"]) for i in kept["extra_info"]] == ei_run["index"][4:9]  # round_10, not round_2
    assert set(kept.columns) == set(pd.read_parquet(ei_run["train"]).columns)
    assert (counts["sampled"], counts["mixed"], counts["all_right"], counts["none_right"], counts["rows"]) == \
        (9, 5, 2, 2, 5)
    assert counts["solve_file"].endswith("round_10/solve.parquet")
    # all: the training file untouched
    assert grpo.mixed_prompts(cfg_for(), ei_run["train"], info, out / "all", dry_run=False) == (ei_run["train"], None)


def test_mixed_reaches_verls_command_and_the_dry_run_writes_nothing(ei_run, capsys, monkeypatch):
    monkeypatch.setattr(grpo, "find_spec", lambda name: object())  # vLLM "importable": the default command
    argv = ["--stage", "grpo", "--dry_run", "--init", str(ei_run["ei"]), "--train_data", ei_run["train"],
            "--val_data", ei_run["test"], "grpo.prompts=mixed", "grpo.batch_size=2"]
    assert stages_main(argv) == 0
    out = capsys.readouterr().out
    picked = ei_run["ei"].parent / "grpo" / "train_mixed.parquet"
    assert f"grpo.prompts=mixed: 5 of 9 questions sampled in {ei_run['ei'] / 'round_10' / 'solve.parquet'}" in out
    cmd = next(shlex.split(line) for line in out.splitlines() if "verl.trainer.main_ppo" in line)
    assert f"data.train_files={picked}" in cmd
    assert not picked.exists()


@pytest.mark.parametrize("case,message", [
    ("not_ei", "--init must be an EI stage"),
    ("no_counts", "no round_*/solve.parquet in"),
    ("too_few", "fewer than grpo.batch_size=6"),
    ("no_index", "lacks in row 0"),
    ("typo", "grpo.prompts=mixd: use one of all, mixed"),
])
def test_mixed_names_what_is_missing_before_anything_starts(ei_run, tmp_path, case, message):
    info = {"init": str(ei_run["ei"]), "init_stage": "ei", "init_dir": str(ei_run["ei"])}
    train, keys = ei_run["train"], ["grpo.prompts=mixed"]
    if case == "not_ei":
        info["init_stage"] = "sft"
    elif case == "no_counts":
        for f in ei_run["ei"].glob("round_*/solve.parquet"):
            f.unlink()
    elif case == "too_few":
        keys.append("grpo.batch_size=6")
    elif case == "no_index":
        rows = pd.read_parquet(train)
        rows["extra_info"] = [{"split": "train"}] * len(rows)
        train = str(tmp_path / "no_index.parquet")
        rows.to_parquet(train)
    else:
        keys = ["grpo.prompts=mixd"]
    with pytest.raises(SystemExit) as err:
        grpo.mixed_prompts(load_config("grpo", keys), train, info, tmp_path / "out", dry_run=False)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_total_steps_beyond_the_epochs_data_raise_the_epochs(ei_run, capsys, monkeypatch):
    """verl's loop ends with its last epoch's data: 12 rows at batch 4 make 3 steps an epoch, so 7 steps need 3
    epochs, or the run would stop at step 3 without its last save and validation."""
    monkeypatch.setattr(grpo, "find_spec", lambda name: object())
    base = ["--stage", "grpo", "--dry_run", "--init", str(ei_run["ei"]), "--train_data", ei_run["train"],
            "--val_data", ei_run["test"], "grpo.batch_size=4"]
    for steps, epochs in (("7", "3"), ("3", "1"), ("null", "1")):
        assert stages_main([*base, f"grpo.total_steps={steps}"]) == 0
        cmd = next(shlex.split(line) for line in capsys.readouterr().out.splitlines() if "main_ppo" in line)
        assert f"trainer.total_epochs={epochs}" in cmd, (steps, [k for k in cmd if "total_" in k])
    # fewer rows than one batch: verl would run no step at all; a run refuses, a dry run says so and goes on
    with pytest.raises(SystemExit, match="fewer rows than grpo.batch_size=16: not one step"):
        grpo.fit_epochs(load_config("grpo", ["grpo.batch_size=16"]), ei_run["train"])
    assert stages_main([*base, "grpo.batch_size=16"]) == 0
    assert "fewer rows than grpo.batch_size=16: not one step (--dry_run goes on" in capsys.readouterr().err
