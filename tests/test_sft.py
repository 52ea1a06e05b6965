"""SFT stage: the real verl trainer on CPU (tiny model, 2 ranks), a SIGKILL mid-run, resume, an
epoch-boundary resume, keep-last-N, the loss mask verl trains on, and the composed command."""
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages import launch, sft, supervise
from stages.__main__ import main as stages_main
from stages.config import REPO, load_config

MAX_LENGTH = 256
# a CUDA launch's external libs: ladder's attention, and its fused loss where triton imports (the test extra has it)
CUDA_LIBS = ["plugins.attention"] + (["plugins.fused_ce"] if importlib.util.find_spec("triton") else [])
TRAIN = ["--device", "cpu", "--batch_size", "8", "--micro_batch_size", "4", "--max_length", str(MAX_LENGTH),
         "--lr", "1e-3", "sft.verl.data.max_token_len_per_gpu=2048", "sft.verl.data.num_workers=0",
         "model.gradient_checkpointing=false"]


def sft_parquet(model_dir: Path, gsm8k_dir: Path, out: Path, rows: int) -> Path:
    """The first `rows` GSM8K train problems that fit MAX_LENGTH tokens, as [user, assistant] messages."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    keep = []
    with open(gsm8k_dir / "train.jsonl") as f:
        for line in f:
            row = json.loads(line)
            messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            if len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) <= MAX_LENGTH:
                keep.append({"messages": messages})
            if len(keep) == rows:
                break
    pd.DataFrame(keep).to_parquet(out, index=False)
    return out


def steps_logged(sft_dir: Path) -> list[int]:
    return sorted(launch.read_metrics(sft_dir))


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


def chat_loss(folder: str, conversations: list[list[dict]]) -> float:
    """Mean next-token loss of whole chat-templated conversations under the model in `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    losses = []
    with torch.no_grad():
        for messages in conversations:
            ids = tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the stage, torchrun, and every rank: torchrun starts each rank in a session of its own."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    for child in tree:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # a rank's group: the rank and its data loader workers
        except (ProcessLookupError, PermissionError):
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


# ---- the real trainer
@pytest.mark.slow
def test_two_ranks_killed_resumed_then_extended_at_epoch_boundary(tiny_model, gsm8k_dir, tmp_path):
    data = sft_parquet(tiny_model, gsm8k_dir, tmp_path / "train.parquet", 48)  # 2 ranks x 4 per rank: 6 steps an epoch
    argv = ["--model", str(tiny_model), "--train_data", str(data), *TRAIN, "--n_gpus", "2", "--save_freq", "1",
            "sft.keep_ckpts=2", f"run.output_dir={tmp_path}", "run.name=r"]
    out = tmp_path / "r" / "sft"

    # ---- 1. SIGKILL everything once step 2's checkpoint is complete (verl writes the marker last)
    proc = subprocess.Popen([sys.executable, "-m", "stages", *argv, "--epochs", "1"], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and launch.latest_step(out) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
    kill_run(proc)
    saved, logged = launch.latest_step(out), steps_logged(out)
    assert 2 <= saved < 6 and max(logged) < 6, (saved, logged)

    # ---- 2. the same command resumes: the step count continues, at most one step is trained twice
    assert stages_main([*argv, "--epochs", "1"]) == 0
    first, second = [[json.loads(x)["step"] for x in p.read_text().splitlines()] for p in launch.metric_files(out)]
    assert second == list(range(saved + 1, 7)), second
    assert max(first) - saved <= 1, (first, saved)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    loss = {step: m["train/loss"] for step, m in launch.read_metrics(out).items()}
    assert loss[saved + 1] < loss[1]  # resumed from the trained weights, not from the random start
    assert checkpoints(out) == [5, 6]  # keep-last-2 across attempts: the killed attempt's 1 and 2 are gone too

    # ---- 3. one more epoch from the epoch-end checkpoint: verl 0.9.1 alone would train 0 steps here
    assert stages_main([*argv, "--epochs", "2"]) == 0
    assert steps_logged(out) == list(range(1, 13)) and checkpoints(out) == [11, 12]
    assert (out / "global_step_6").exists() is False and len(launch.metric_files(out)) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["global_step"] == 12 and manifest["status"] == "done" and not manifest["lora"]
    assert manifest["loss_last"] < manifest["loss_first"] and len(manifest["metrics_files"]) == 3

    # ---- 4. a finished run is not launched again, only exported
    assert stages_main([*argv, "--epochs", "2"]) == 0
    assert len(launch.metric_files(out)) == 3 and steps_logged(out) == list(range(1, 13))
    # torchrun's per-launch folders are the run's, one for each of the three launches (not torchelastic_* in /tmp)
    assert len(list((out / "logs" / "torchrun").iterdir())) == 3

    # ---- the export is a plain HF folder that moved away from the random start and generates
    from safetensors.torch import load_file

    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(Path(manifest["hf_model"]) / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    assert generate(manifest["hf_model"]).removeprefix("<|im_end|>")  # it says something before any end of turn
    # the last checkpoint's weights, which learned: the training conversations cost less than at the random start
    rows = [list(m) for m in pd.read_parquet(data)["messages"][:8]]
    trained, start = chat_loss(manifest["hf_model"], rows), chat_loss(str(tiny_model), rows)
    assert trained == chat_loss(str(out / "global_step_12" / "huggingface"), rows)
    assert trained < start - 0.1, (trained, start)


# ---- what verl trains on
def test_end_of_turn_token_is_in_the_loss_mask(tiny_model, tmp_path):
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    tok = AutoTokenizer.from_pretrained(tiny_model)
    answer = "3 + 4 = 7\n#### 7"
    path = tmp_path / "one.parquet"
    pd.DataFrame([{"messages": [{"role": "user", "content": "What is 3 + 4?"},
                                {"role": "assistant", "content": answer}]}]).to_parquet(path)
    data_cfg = verl_schema_compose(composed([f"model.path={tiny_model}"])).data  # the data config verl builds
    row = MultiTurnSFTDataset(str(path), tok, data_cfg)[0]
    ids, mask = row["input_ids"].tolist(), row["loss_mask"].tolist()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ids) if t == im_end]
    assert len(ends) == 2 and mask[ends[0]] == 0 and mask[ends[1]] == 1  # user turn's end: no; assistant's: yes
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == answer + "<|im_end|>\n"  # the answer and its end of turn, not `<|im_start|>assistant\n`


# ---- the composed command
def dry_run(capsys, *argv) -> tuple[str, str]:
    assert stages_main(["--dry_run", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines[0], "\n".join(lines[1:])


@pytest.fixture
def train_file(tmp_path) -> str:
    (tmp_path / "t.parquet").touch()
    return str(tmp_path / "t.parquet")


def test_dry_run_default_command(capsys, train_file, tmp_path):
    line, config = dry_run(capsys, "--train_data", train_file, f"run.output_dir={tmp_path}", "run.name=x")
    assert line.startswith(f"{sys.executable} -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=1 "
                           f"--log-dir={tmp_path.resolve() / 'x' / 'sft' / 'logs' / 'torchrun'} "
                           "-m verl.trainer.sft_trainer ")
    # a CUDA launch without flash-attn: ladder's varlen attention and loss, fused AdamW, 32k-token micro-batches
    libs = CUDA_LIBS[0] if len(CUDA_LIBS) == 1 else f"[{','.join(CUDA_LIBS)}]"
    for key in ("engine.strategy=fsdp2", "model.lora_rank=0", "++model.override_config.attn_implementation=ladder_varlen",
                shlex.quote(f"++model.external_lib={libs}"), "++optim.override_optimizer_config.fused=true",
                "data.max_token_len_per_gpu=32768",
                "optim.lr=1e-05", "trainer.total_epochs=3", "trainer.max_ckpt_to_keep=2", "trainer.resume_mode=auto",
                f"data.train_files={train_file}", f"trainer.default_local_dir={tmp_path.resolve() / 'x' / 'sft'}",
                "trainer.experiment_name=x-sft", "'checkpoint.save_contents=[model,optimizer,extra,hf_model]'"):
        assert f" {key}" in line, key
    assert "trainer.logger=[console,file,tensorboard" in line and "trainer.device" not in line
    assert "sft:" in config and "verl:" in config  # the resolved config follows the command
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


@pytest.mark.parametrize("flags,keys", [
    (["--use_lora", "--lora_rank", "32", "--lora_alpha", "64"], ["model.lora_rank=32", "model.lora_alpha=64"]),
    (["--strategy", "fsdp"], ["engine.strategy=fsdp"]),
    (["--param_offload", "--optimizer_offload"], ["engine.param_offload=true", "engine.optimizer_offload=true"]),
    (["--resume_from", "/tmp/x/sft/global_step_200"],
     ["trainer.resume_mode=resume_path", "trainer.resume_from_path=/tmp/x/sft/global_step_200"]),
    (["--device", "cpu"], ["trainer.device=cpu"]),
])
def test_dry_run_flags(capsys, train_file, flags, keys):
    line, _ = dry_run(capsys, "--train_data", train_file, *flags)
    for key in keys:
        assert f" {key}" in line, key
    if "--device" in flags:
        assert line.startswith("VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=plugins.cpu_platform ")


def test_dry_run_multinode_from_env(train_file):
    env = dict(os.environ, N_GPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")
    out = subprocess.run(["./train.sh", "--dry_run", "--train_data", train_file],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[0]
    for part in ("--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29600",
                 "--nproc_per_node=8", "-m verl.trainer.sft_trainer", "trainer.nnodes=2", "trainer.n_gpus_per_node=8"):
        assert part in line, part
    assert "--standalone" not in line


def test_dry_run_names_data_prep_files_without_writing(capsys, tmp_path):
    line, _ = dry_run(capsys, f"run.output_dir={tmp_path}", "run.name=x", "data.val_size=16")
    data = tmp_path.resolve() / "x" / "data"
    assert f"data.train_files={data / 'sft_train.parquet'}" in line
    assert f"data.val_files={data / 'sft_val.parquet'}" in line
    assert not data.exists()


def test_data_prep_is_called_with_the_data_section(monkeypatch, tmp_path):
    import data_prep

    calls = []
    monkeypatch.setattr(data_prep, "prepare", lambda cfg, out, **check: calls.append((cfg, out, check)) or
                        {"sft_train": str(out / "sft_train.parquet")})
    cfg = load_config("sft", [f"run.output_dir={tmp_path}", "run.name=x", "model.path=/m"])
    train, val = sft.sft_files(cfg)
    # the lengths are measured as verl will count them: the model's tokenizer, sft.max_length
    check = {"tokenizer": "/m", "max_length": 1024, "chat_template_kwargs": None}
    assert calls == [(cfg.data, tmp_path.resolve() / "x" / "data", check)] and train.endswith("x/data/sft_train.parquet")
    assert val is None


def test_flag_beats_environment(train_file):
    env = dict(os.environ, LEARNING_RATE="3e-4", N_GPUS="4")
    out = subprocess.run(["./train.sh", "--dry_run", "--lr", "2e-5", "--train_data", train_file],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert "optim.lr=2e-05" in out.stdout and "--nproc_per_node=4" in out.stdout, out.stderr


def test_missing_files_are_named(tmp_path, tiny_model):
    out = subprocess.run(["./train.sh", "--train_data", str(tmp_path / "none.parquet")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode != 0 and f"data.train_file={tmp_path / 'none.parquet'}: no such file" in out.stderr
    # a readable file and a local model, so that the samples' length check passes and --resume_from is next
    pd.DataFrame({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]}).to_parquet(
        tmp_path / "t.parquet")
    out = subprocess.run(["./train.sh", "--train_data", str(tmp_path / "t.parquet"), "--model", str(tiny_model),
                          "--resume_from", "/nope"], cwd=REPO, capture_output=True, text=True)
    assert "expected an existing verl checkpoint folder named global_step_N" in out.stderr


def test_cpu_refuses_what_the_shim_cannot_run(capsys, train_file):
    with pytest.raises(SystemExit, match="runs only with FSDP2"):
        stages_main(["--dry_run", "--train_data", train_file, "--device", "cpu", "--strategy", "fsdp"])
    with pytest.raises(SystemExit, match="needs attention sdpa"):
        stages_main(["--dry_run", "--train_data", train_file, "--device", "cpu", "--attn", "flash_attention_2"])


# ---- verl's own schema: a misspelt key fails before any run
def verl_schema_compose(overrides):
    return launch.verl_schema_compose("sft_trainer_engine", overrides)


def composed(argv):
    from stages.cli import parse

    _, overrides = parse(argv)
    cfg = load_config("sft", overrides)
    cfg.run.name = "x"
    return sft.trainer_keys(cfg, Path("/tmp/x/sft"), "/tmp/train.parquet", None)


@pytest.mark.parametrize("argv", [[], ["--use_lora"], ["--strategy", "fsdp", "--param_offload", "--optimizer_offload"],
                                  ["--device", "cpu", "--resume_from", "/tmp/x/sft/global_step_2"],
                                  ["trainer.total_epochs=5", "optim.lr_scheduler_type=constant"]])
def test_composed_overrides_fit_verls_schema(argv):
    verl_cfg = verl_schema_compose(composed(argv))
    assert verl_cfg.trainer.default_local_dir == "/tmp/x/sft"
    cpu = "--device" in argv
    assert verl_cfg.model.override_config.attn_implementation == ("sdpa" if cpu else "ladder_varlen")
    libs = verl_cfg.model.external_lib
    assert (libs if cpu or isinstance(libs, str) else list(libs)) == (
        None if cpu else CUDA_LIBS[0] if len(CUDA_LIBS) == 1 else CUDA_LIBS)


@pytest.mark.parametrize("device,installed,overrides,expect", [
    ("cuda", {"flash_attn", "liger_kernel", "triton"}, [], ("flash_attention_2", True, "ladder")),
    ("cuda", set(), [], ("ladder_varlen", False, "off")),
    ("cpu", {"flash_attn", "liger_kernel", "triton"}, [], ("sdpa", False, "off")),
    ("cuda", {"liger_kernel", "triton"}, ["model.attn_implementation=eager", "model.liger=false",
                                          "model.fused_ce=off"], ("eager", False, "off")),
    ("cpu", set(), ["model.liger=true", "model.fused_ce=torch"], ("sdpa", True, "torch")),
    ("cuda", {"liger_kernel", "triton"}, ["model.compile=true"], ("ladder_varlen", False, "ladder")),
    ("cuda", {"liger_kernel"}, ["model.compile=true", "model.liger=true"], ("ladder_varlen", True, "off")),
])
def test_auto_kernels_follow_what_the_machine_has(monkeypatch, device, installed, overrides, expect):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        object() if name in installed else None if name in ("flash_attn", "liger_kernel", "triton") else real(name)))
    cfg = load_config("sft", [f"launch.device={device}", *overrides])
    k = launch.kernels(cfg)
    assert (k["attn"], k["liger"], k["fused_ce"]) == expect


def test_unknown_fused_loss_backend_is_refused():
    with pytest.raises(SystemExit, match="model.fused_ce=fast"):
        launch.kernels(load_config("sft", ["model.fused_ce=fast"]))


def test_a_kernel_key_set_in_the_verl_block_wins():
    keys = composed(["--attn", "sdpa", "+sft.verl.model.use_liger=true"])
    # one use_liger key, the user's (added with +, so it goes as ++: add or override)
    assert [k for k in keys if k.lstrip("+").startswith("model.use_liger=")] == ["++model.use_liger=true"]


@pytest.mark.parametrize("key", ["trainer.totl_epochs=5", "optim.learning_rate=1e-4", "data.max_len=128"])
def test_misspelt_verl_key_is_refused(key, train_file):
    with pytest.raises(Exception, match=key.split("=")[0].split(".")[-1]):
        verl_schema_compose(composed([key]))
    argv = ["--dry_run", "--train_data", train_file, key]  # the dry run refuses it too
    if key.startswith("data."):  # a section of config.yaml: ladder's own composition refuses it
        assert stages_main(argv) == 2
    else:
        said = rf"\[sft\] {key.split('=')[0]}: verl's sft_trainer_engine config has no such key"
        with pytest.raises(SystemExit, match=said):
            stages_main(argv)


# ---- checkpoint bookkeeping, without the trainer
def test_epoch_end_state_is_set_aside_only_at_a_boundary(tmp_path):
    for step in (4, 6, 8):
        (tmp_path / f"global_step_{step}").mkdir()
        (tmp_path / f"global_step_{step}" / "data_0.pt").touch()
        (tmp_path / f"global_step_{step}" / "data_1.pt").touch()
    assert sft.set_aside_epoch_end_state(tmp_path / "global_step_8", per_epoch=4)
    assert sorted(p.name for p in (tmp_path / "global_step_8").iterdir()) == ["data_0.pt.epoch_end",
                                                                               "data_1.pt.epoch_end"]
    assert not sft.set_aside_epoch_end_state(tmp_path / "global_step_6", per_epoch=4)
    assert (tmp_path / "global_step_6" / "data_0.pt").exists()


def test_prune_keeps_the_newest_by_step_number(tmp_path):
    for step in (2, 9, 10, 11):
        (tmp_path / f"global_step_{step}").mkdir()
    assert sft.prune(tmp_path, 2) == ["global_step_2", "global_step_9"]
    assert checkpoints(tmp_path) == [10, 11]
    assert sft.prune(tmp_path, None) == [] and sft.prune(tmp_path, -1) == []
    (tmp_path / "global_step_12").mkdir()
    assert sft.prune(tmp_path, 1, exported=tmp_path / "global_step_10") == ["global_step_11"]


@pytest.mark.parametrize("rows,gpus,batch,epochs,expect", [(48, 2, 8, 1, (6, 6)), (50, 2, 8, 2, (6, 12)),
                                                           (33, 1, 8, 3, (4, 12)), (7, 1, 8, 1, None)])
def test_planned_steps_count_as_verl_does(tmp_path, rows, gpus, batch, epochs, expect):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": "q"}]] * rows}).to_parquet(path)
    cfg = load_config("sft", [f"launch.n_gpus={gpus}", f"sft.batch_size={batch}", f"sft.epochs={epochs}"])
    if expect is None:
        with pytest.raises(SystemExit, match="fewer than one global batch"):
            sft.planned_steps(cfg, str(path))
    else:
        assert sft.planned_steps(cfg, str(path)) == expect


def test_init_replaces_the_starting_model(capsys, tiny_model, train_file):
    line, _ = dry_run(capsys, "--train_data", train_file, "--init", str(tiny_model))
    assert f" model.path={tiny_model.resolve()} " in line


def finished_checkpoint(model, out, step: int = 4):
    """A stage folder whose verl checkpoint global_step_<step> holds `model` as its huggingface/ weights."""
    (out / f"global_step_{step}" / "huggingface").mkdir(parents=True)
    for f in model.iterdir():
        (out / f"global_step_{step}" / "huggingface" / f.name).write_bytes(f.read_bytes())
    (out / "latest_checkpointed_iteration.txt").write_text(str(step))
    return out


def test_finished_run_is_exported_not_relaunched(tiny_model, tmp_path, monkeypatch):
    """A checkpoint that already holds every planned step goes straight to export."""
    out = finished_checkpoint(tiny_model, tmp_path / "x" / "sft")
    data = tmp_path / "t.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": "q"}]] * 32}).to_parquet(data)
    monkeypatch.setattr(supervise, "run_trainer", lambda *a, **k: pytest.fail("relaunched a finished run"))
    cfg = load_config("sft", [f"run.output_dir={tmp_path}", "run.name=x", f"data.train_file={data}",
                              "sft.batch_size=8", "sft.epochs=1", "launch.device=cpu", f"model.path={tiny_model}"])
    assert sft.run(cfg) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["global_step"] == 4 and Path(manifest["hf_model"], "model.safetensors").exists()


def test_an_over_long_sample_stops_before_verl_naming_its_line(tiny_model, tmp_path, monkeypatch):
    """A user file with one huge record: the SFT stage names file:line before any trainer starts (verl would die
    ~30 s later with `sequence_length=… is larger than self.max_length`, naming no row), or skips it when asked."""
    rows = [{"prompt": f"What is {i} + 1?", "response": f"{i + 1}"} for i in range(20)]
    rows[6]["response"] = "word " * 3000
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(supervise, "run_trainer", lambda *a, **k: pytest.fail("launched verl"))
    argv = [*TRAIN, "--model", str(tiny_model), "--dataset", "user", "--train_data", str(data), "--max_length", "256",
            f"run.output_dir={tmp_path}", "run.name=long"]
    with pytest.raises(SystemExit, match=r"mine.jsonl:7: .*longer than max_length=256"):
        stages_main(argv)
    launched = []
    monkeypatch.setattr(supervise, "run_trainer", lambda cmd, env, out, *a, **k: launched.append(cmd) or
                        supervise.Result(1, out / "logs" / "verl.0.log", out, "sft", 0.0))
    assert stages_main([*argv, "--skip_bad"]) == 1 and launched  # skipped and counted, then verl starts
    prep = json.loads((tmp_path / "long" / "data" / "prep.json").read_text())
    assert prep["skipped_over_length"] == 1


# ---- failing early and clearly (issue 17)
def fail_if_called(what):
    def called(*args, **kwargs):
        pytest.fail(f"{what} ran")
    return called


@pytest.fixture
def nothing_runs(monkeypatch):
    """Data prep and verl's trainer fail the test if they start."""
    import data_prep

    monkeypatch.setattr(data_prep, "prepare", fail_if_called("data prep"))
    monkeypatch.setattr(supervise, "run_trainer", fail_if_called("verl's trainer"))


def test_no_gpu_is_said_before_anything_starts(monkeypatch, nothing_runs, tmp_path):
    """`./train.sh` with no flags on a machine without CUDA: one line naming --device cpu, not torchrun's NCCL error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^\[sft\] no CUDA GPU found .* add --device cpu"):
        stages_main([f"run.output_dir={tmp_path}"])


@pytest.mark.parametrize("argv,said", [
    (["--lr", "abc"], r"\[sft\] optim\.lr=abc \(sft\.lr: --lr, LEARNING_RATE\): verl expects a number \(its default"),
    (["trainer.save_freq=abc"], r"\[sft\] trainer\.save_freq=abc: verl expects a number"),
    (["--save_freq", "often"], r"\[sft\] trainer\.save_freq=often \(sft\.save_freq: --save_freq\): verl expects a"),
    (["trainer.sav_freq=1"], r"\[sft\] trainer\.sav_freq: verl's sft_trainer_engine config has no such key; did you "
                             r"mean trainer\.save_freq\?"),
])
def test_bad_verl_values_and_keys_stop_the_dry_run_and_the_run(argv, said, nothing_runs, tmp_path, train_file):
    """Found against verl's own schema in a second, not ~25 s later inside verl in a traceback naming no key."""
    with pytest.raises(SystemExit, match=said):
        stages_main(["--dry_run", "--train_data", train_file, *argv])
    with pytest.raises(SystemExit, match=said):
        stages_main(["--device", "cpu", f"run.output_dir={tmp_path}", *argv])  # data prep would come next


@pytest.mark.parametrize("argv", [["--dry_run"], ["--device", "cpu"]])
def test_a_missing_init_is_one_clean_line(argv, nothing_runs, tmp_path):
    with pytest.raises(SystemExit) as err:
        stages_main([*argv, "--init", str(tmp_path / "nonexistent"), f"run.output_dir={tmp_path}"])
    assert str(err.value) == f"[sft] --init {tmp_path / 'nonexistent'}: no such run, stage, checkpoint or model folder"


def test_hydras_run_folder_is_in_the_stage_folder(capsys, train_file, tmp_path):
    line, _ = dry_run(capsys, "--train_data", train_file, f"run.output_dir={tmp_path}", "run.name=x")
    assert f" hydra.run.dir={tmp_path.resolve() / 'x' / 'sft' / 'logs' / 'hydra'}" in line  # not ./outputs/<date>/


def tiny_sft_data(tiny_model, tmp_path, rows=16) -> Path:
    data = tmp_path / "t.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]] * rows}
                 ).to_parquet(data)
    return data


def test_a_failed_trainer_leaves_a_failed_manifest_with_its_reason(tiny_model, tmp_path, monkeypatch, capsys):
    fake = [sys.executable, "-c", "import sys; print('ValueError: batch size 8 is not divisible'); sys.exit(3)"]
    monkeypatch.setattr(launch, "torchrun_command", lambda *a: fake)
    argv = [*TRAIN, "--model", str(tiny_model), "--train_data", str(tiny_sft_data(tiny_model, tmp_path)),
            f"run.output_dir={tmp_path}", "run.name=x"]
    assert stages_main(argv) == 3
    manifest = json.loads((tmp_path / "x" / "sft" / "manifest.json").read_text())
    failure = manifest["failure"]
    assert manifest["status"] == "failed" and (failure["exit_code"], failure["signal"]) == (3, None)
    assert failure["kind"] == "before_first_step" and failure["reason"] == "ValueError: batch size 8 is not divisible"
    assert failure["log"] == str(tmp_path / "x" / "sft" / "logs" / "verl.0.log")
    err = capsys.readouterr().err
    assert "failed before its first step (exit code 3): ValueError" in err and "rerun the same command" not in err


def test_the_sft_stage_writes_its_report_section_and_loss_curve(tiny_model, tmp_path, monkeypatch):
    out = finished_checkpoint(tiny_model, tmp_path / "x" / "sft")
    (out / "logs").mkdir()
    (out / "logs" / "metrics.0.jsonl").write_text("".join(
        json.dumps({"step": s, "data": {"train/loss": 3.0 - s / 2}}) + "\n" for s in (1, 2, 3, 4)))
    (out / "logs" / "attempts.jsonl").write_text("".join(json.dumps({"seconds": s}) + "\n" for s in (12.5, 30)))
    monkeypatch.setattr(supervise, "run_trainer", fail_if_called("verl's trainer"))
    data = tiny_sft_data(tiny_model, tmp_path, 32)
    cfg = load_config("sft", [f"run.output_dir={tmp_path}", "run.name=x", f"data.train_file={data}", "sft.batch_size=8",
                              "sft.epochs=1", "launch.device=cpu", f"model.path={tiny_model}"])
    assert sft.run(cfg) == 0
    text = (tmp_path / "x" / "report.md").read_text()
    assert "## Supervised fine-tuning" in text and "(full fine-tuning; verl's sft_trainer on 1 x 1 cpu" in text
    assert "| 4 | 1 | 32 | 8 | 1e-05 | 2.5000 | 1.0000 | 2 | 42.5 |" in text, text
    assert "![sft_loss](report/figures/sft_loss.png)" in text
    assert (tmp_path / "x" / "report" / "figures" / "sft_loss.png").is_file()


@pytest.mark.slow
def test_sigkill_of_the_launchers_group_stops_the_training_ranks(tiny_model, gsm8k_dir, tmp_path):
    """The launcher's whole process group SIGKILLed mid-run (torchrun starts each rank in a session of its own):
    no rank trains on unattended (plugins/lifeline.py)."""
    import psutil

    data = sft_parquet(tiny_model, gsm8k_dir, tmp_path / "train.parquet", 48)
    out = tmp_path / "r" / "sft"
    proc = subprocess.Popen([sys.executable, "-m", "stages", "--model", str(tiny_model), "--train_data", str(data),
                             *TRAIN, "--save_freq", "1", f"run.output_dir={tmp_path}", "run.name=r"], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and launch.latest_step(out) < 1:
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert any(os.getsid(p.pid) != os.getsid(proc.pid) for p in tree)  # a rank in a session of its own
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"still running after the launcher's group was SIGKILLed: {alive}"
        assert launch.latest_step(out) < 6  # and it did not train on to the end
    finally:
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
