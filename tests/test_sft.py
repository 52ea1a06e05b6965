"""SFT stage: the real verl trainer on CPU (tiny model), resume, faults, export, and the composed command."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.__main__ import main as stages_main
from stages.common import REPO, load_config
from stages.sft import command, read_metrics, verl_overrides

TRAIN = ["--device", "cpu", "--train_size", "32", "--batch_size", "8", "--micro_batch_size", "4",
         "--max_length", "1024", "--lr", "1e-3", "sft.verl.data.max_token_len_per_gpu=4096",
         "sft.verl.data.num_workers=0", "model.gradient_checkpointing=false"]


def train(tiny_model, out, *extra):
    argv = ["--model", str(tiny_model), *TRAIN, f"run.output_dir={out}", "run.name=r", *extra]
    return stages_main(argv)


def steps_logged(sft_dir: Path) -> list[int]:
    return sorted(read_metrics(sft_dir))


def checkpoints(sft_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in sft_dir.glob("global_step_*"))


def generate(folder: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_full_ft_resume_at_epoch_boundary_keep_last_and_export(tiny_model, tmp_path):
    sft = tmp_path / "r" / "sft"
    assert train(tiny_model, tmp_path, "--epochs", "1", "--save_freq", "1", "sft.keep_ckpts=2") == 0
    assert steps_logged(sft) == [1, 2, 3, 4]
    assert checkpoints(sft) == [3, 4]  # keep-last-2 really deleted steps 1 and 2
    # step 4 ends epoch 1: verl 0.9.1 alone would train 0 steps here; ladder continues with epoch 2
    assert train(tiny_model, tmp_path, "--epochs", "2", "--save_freq", "1", "sft.keep_ckpts=2") == 0
    assert steps_logged(sft) == list(range(1, 9))
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["global_step"] == 8 and manifest["status"] == "done" and not manifest["lora"]
    assert manifest["loss_last"] < manifest["loss_first"]
    # the export differs from the random start and generates
    from safetensors.torch import load_file

    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(Path(manifest["hf_model"]) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    assert isinstance(generate(manifest["hf_model"]), str)
    # a finished run is not trained again
    assert train(tiny_model, tmp_path, "--epochs", "2") == 0
    assert steps_logged(sft) == list(range(1, 9))


@pytest.mark.slow
def test_two_processes_lora_merges_adapter(tiny_model, tmp_path):
    assert train(tiny_model, tmp_path, "--epochs", "1", "--n_gpus", "2", "--use_lora", "--lora_rank", "4") == 0
    sft = tmp_path / "r" / "sft"
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["lora"] and Path(manifest["adapter"], "adapter_config.json").exists()
    assert steps_logged(sft) == [1, 2, 3, 4]
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(manifest["adapter"]).r == 4
    assert isinstance(generate(manifest["hf_model"]), str)  # merged: plain transformers loads it


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_loses_at_most_one_step(tiny_model, tmp_path):
    argv = ["--model", str(tiny_model), *TRAIN, "--train_size", "160", "--epochs", "1", "--save_freq", "1",
            f"run.output_dir={tmp_path}", "run.name=r"]
    sft = tmp_path / "r" / "sft"
    proc = subprocess.Popen([sys.executable, "-m", "stages", *argv], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = sft / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (marker.exists() and int(marker.read_text() or 0) >= 3):
        time.sleep(0.1)
    # SIGKILL the trainer itself and everything launched for this run (torchrun starts its workers
    # in their own session, so killing the launcher's process group alone would leave them running)
    import psutil

    victims = [p for p in psutil.process_iter(["cmdline"]) if str(sft) in " ".join(p.info["cmdline"] or [])]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=30)
    assert not [p for p in victims if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    killed_at = max(steps_logged(sft))
    assert 3 <= killed_at < 20, f"killed at step {killed_at}: too early or after the end"
    assert stages_main(argv) == 0
    steps = steps_logged(sft)
    assert steps == list(range(1, 21)), steps  # every step logged once, the count continued
    attempts = sorted((sft / "logs").glob("metrics.*.jsonl"))
    assert len(attempts) == 2
    resumed_at = json.loads(attempts[1].read_text().splitlines()[0])["step"]
    assert killed_at - (resumed_at - 1) <= 1, (killed_at, resumed_at)  # at most one step trained again


def verl_schema_compose(overrides):
    """Compose verl's own SFT config with ladder's overrides: a misspelt key fails here."""
    import verl
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name="sft_trainer_engine", overrides=overrides)


def composed(argv, env=None):
    from stages.cli import parse

    args, overrides = parse(argv)
    cfg = load_config("sft", overrides)
    cfg.run.name = "x"
    return cfg, verl_overrides(cfg, Path("/tmp/x/sft"), "/tmp/train.parquet", None)


@pytest.mark.parametrize("argv,expect", [
    ([], {"engine.strategy=fsdp2", "model.lora_rank=0", "++model.override_config.attn_implementation=sdpa",
          "trainer.resume_mode=auto", "optim.lr=1e-05"}),
    (["--use_lora", "--lora_rank", "32", "--lora_alpha", "32"], {"model.lora_rank=32", "model.lora_alpha=32"}),
    (["--strategy", "fsdp", "--param_offload", "--optimizer_offload"],
     {"engine.strategy=fsdp", "engine.param_offload=true", "engine.optimizer_offload=true"}),
    (["--resume_from", "/tmp/x/sft/global_step_200"],
     {"trainer.resume_mode=resume_path", "trainer.resume_from_path=/tmp/x/sft/global_step_200"}),
    (["trainer.total_epochs=5", "optim.lr_scheduler_type=cosine", "trainer.save_freq=100"],
     {"trainer.total_epochs=5", "optim.lr_scheduler_type=cosine", "trainer.save_freq=100"}),
])
def test_composed_overrides_fit_verls_schema(argv, expect):
    cfg, overrides = composed(argv)
    assert expect <= set(overrides), sorted(set(expect) - set(overrides))
    verl_cfg = verl_schema_compose(overrides)
    assert verl_cfg.trainer.default_local_dir == "/tmp/x/sft"


def test_misspelt_verl_key_is_refused():
    _, overrides = composed(["trainer.totl_epochs=5"])
    with pytest.raises(Exception, match="totl_epochs"):
        verl_schema_compose(overrides)


def test_multinode_command_from_env(tmp_path):
    (tmp_path / "t.parquet").touch()
    env = dict(os.environ, N_GPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")
    out = subprocess.run(["./train.sh", "--dry_run", "--train_data", str(tmp_path / "t.parquet")],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[0]
    for part in ("--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29600",
                 "--nproc_per_node=8", "-m verl.trainer.sft_trainer", "trainer.nnodes=2", "trainer.n_gpus_per_node=8"):
        assert part in line, part
    assert "--standalone" not in line


def test_flag_beats_environment(tmp_path):
    (tmp_path / "t.parquet").touch()
    env = dict(os.environ, LEARNING_RATE="3e-4", N_GPUS="4")
    out = subprocess.run(["./train.sh", "--dry_run", "--lr", "2e-5", "--train_data", str(tmp_path / "t.parquet")],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert "optim.lr=2e-05" in out.stdout and "--nproc_per_node=4" in out.stdout, out.stderr


def test_missing_files_are_named(tmp_path):
    out = subprocess.run(["./train.sh", "--train_data", str(tmp_path / "none.parquet")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0 and f"data.train_file={tmp_path / 'none.parquet'}: no such file" in out.stderr
    (tmp_path / "t.parquet").touch()
    out = subprocess.run(["./train.sh", "--train_data", str(tmp_path / "t.parquet"), "--resume_from", "/nope"],
                         cwd=REPO, capture_output=True, text=True)
    assert "expected an existing verl checkpoint folder named global_step_N" in out.stderr


def test_single_node_command():
    cfg, overrides = composed([])
    cmd = command(cfg, overrides)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
