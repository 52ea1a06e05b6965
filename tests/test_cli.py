"""train.sh's flags → config overrides, and config routing of bare verl keys."""
import pytest

from stages.cli import parse
from stages.common import load_config


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
