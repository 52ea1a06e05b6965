"""bench/: every variant flag composes into a verl command that fits verl's schema; trace_summary's breakdown."""
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import REPO, trace_summary, variants, verl_run
from bench.sft_throughput import main_parser
from tests.test_sft import verl_schema_compose


def launched(flags, tmp_path):
    """(verl's config composed from the command the bench would run for this variant, its environment, the variant)."""
    v = variants.variant_parser().parse_args(flags)
    v.name = variants.label(v)
    cmd, env, _ = verl_run.launch(v, Path("/m"), Path("/d.parquet"), tmp_path, "cuda")
    return verl_schema_compose(cmd[cmd.index("verl.trainer.sft_trainer") + 1:]), env, v


def main_args(argv):
    before, sweep = variants.split_sweep(argv)
    args = main_parser().parse_args(before)
    args.sweep = sweep
    return args


def test_sweep_variants_take_the_flags_before_sweep_as_defaults_and_keep_their_own():
    args = main_args(["--shape", "tiny", "--set", "a=1", "--steps", "3", "--sweep", "--set b=2", "--liger", "hand",
                      "--warmup 0"])
    first, liger, hand, no_warmup = variants.expand(args)
    assert (first.set, liger.set, hand.set) == (["a=1", "b=2"], ["a=1"], ["a=1"])  # b=2 stays in its variant
    assert liger.liger and not first.liger and hand.hand
    assert all(v.shape == "tiny" and v.steps == 3 for v in (first, hand))
    assert no_warmup.warmup == 1  # the first timed step is timed from the warmup's last metrics line
    assert hand.name == "tiny hand loop (sdpa, ckpt, fp32+autocast)"
    assert liger.name == "tiny ladder_varlen liger ckpt a=1"


def test_the_examples_in_variants_docstrings_hold():
    failed, tried = doctest.testmod(variants)
    assert tried >= 3 and failed == 0


def test_without_sweep_one_variant_and_the_hand_loop_on_request():
    (only,) = variants.expand(main_args(["--shape", "0.5b", "--liger"]))
    verl, hand = variants.expand(main_args(["--shape", "0.5b", "--liger", "--with_hand"]))
    assert only.name == verl.name == "0.5b ladder_varlen liger ckpt" and hand.hand and not verl.hand


def test_a_bad_env_flag_stops_before_any_work():
    with pytest.raises(SystemExit, match=r"--env FOO \(variant 'tiny ladder_varlen ckpt FOO'\): expected NAME=VALUE"):
        variants.expand(main_args(["--shape", "tiny", "--sweep", "--env A=1", "--env FOO"]))


def test_every_variant_flag_reaches_verl(tmp_path):
    flags = ["--fused_adam", "--no_reshard", "--workers", "3", "--liger", "--fused_ce", "triton", "--max_tokens",
             "8192", "--lora", "8", "--batch_size", "32", "--unpacked", "--compile", "--no_grad_ckpt"]
    c, _, _ = launched(flags, tmp_path)
    assert c.optim.override_optimizer_config.fused is True and c.engine.reshard_after_forward is False
    assert (c.data.num_workers, c.data.max_token_len_per_gpu, c.data.train_batch_size) == (3, 8192, 32)
    assert (c.model.use_liger, c.model.use_fused_kernels, c.model.fused_kernel_options.impl_backend) == (True, True, "triton")
    assert (c.model.lora_rank, c.model.use_remove_padding, c.engine.use_torch_compile) == (8, False, False)
    assert c.model.enable_gradient_checkpointing is False
    assert c.model.override_config.attn_implementation == "ladder_varlen"
    assert list(c.model.external_lib) == ["plugins.attention", "plugins.compile"]


def test_new_levers_reach_verl(tmp_path):
    """--compile is ladder's model.compile (verl's engine.use_torch_compile only compiles an entropy helper)."""
    flags = ["--compile", "--no_sync", "--pad_bucket", "2048", "--profile", "--steps", "3", "--warmup", "2",
             "--env", "LADDER_BENCH_X=a=b"]
    c, env, variant = launched(flags, tmp_path)
    assert "plugins.compile" in list(c.model.external_lib) and c.engine.use_torch_compile is False
    assert env["LADDER_COMPILE"] == "inductor" and env["LADDER_BENCH_X"] == "a=b"
    assert c.engine.use_no_sync_for_gradient_accumulation is True
    assert (c.engine.pad_to_length, c.engine.pad_to_length_bucket) == (True, 2048)
    # two traced steps after the 5 timed ones, and one more so the run does not end (and save) mid-trace
    assert c.profiler.enable is True and list(c.trainer.profile_interval) == [6, 7]
    assert c.trainer.total_training_steps == 8
    assert c.profiler.save_path == str(verl_run.profile_dir(variant, tmp_path))


# ---- bench/trace_summary.py on a hand-made trace (ms): two steps, the first with two micro-batches
def x(name, ts, dur, cat="cpu_op", tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts * 1e3, "dur": dur * 1e3, "cat": cat, "tid": tid, "args": args}


def launch(ts, corr):
    return x("cudaLaunchKernel", ts, 0.01, cat="cuda_runtime", correlation=corr)


def kernel(name, ts, dur, corr):
    return x(name, ts, dur, cat="kernel", tid=7, correlation=corr)


TRACE = [
    x("train_batch", 0, 100, cat="user_annotation"), x("train_batch", 0.5, 99, cat="user_annotation"),  # verl's two
    x("micro_batch0", 1, 40, cat="user_annotation"), launch(2, 1), launch(3, 2),
    x("aten::_local_scalar_dense", 30, 10),  # an .item(): the GPU drains and waits for the host
    x("micro_batch1", 45, 40, cat="user_annotation"), launch(46, 3),
    x("Optimizer.step#AdamW.step", 88, 10, cat="user_annotation"), launch(89, 4),
    kernel("gemm", 5, 20, 1), kernel("gemm", 25, 5, 2), kernel("flash_fwd", 50, 30, 3), kernel("adam", 90, 5, 4),
    x("train_batch", 150, 20, cat="user_annotation"),
    x("micro_batch0", 151, 10, cat="user_annotation"), launch(152, 5), kernel("gemm", 153, 10, 5),
]


def test_trace_summary_splits_a_step_into_gpu_work_and_what_the_gpu_waited_for():
    s = trace_summary.summarize(TRACE)
    first, second = s["steps"]
    assert (first["wall_ms"], first["micro_batches"], first["micro_ms"]) == (100, 2, [40, 40])
    assert first["gpu_busy_ms"] == 60 and first["gpu_micro_ms"] == [25, 30]  # adam's 5 ms belong to no micro-batch
    assert (second["gpu_busy_ms"], second["gpu_micro_ms"]) == (10, [10])
    assert s["between_steps_ms"] == [50]
    assert s["gpu_idle_ms"] == 40 + 10  # 5 + 20 + 10 + 5 in step one, 3 + 7 in step two
    # the 20 ms gap (30 → 50 ms) sits under micro_batch0's .item() and then micro_batch1's start
    assert s["largest_gaps"][0] == {"ms": 20, "cpu": "train_batch > micro_batch0 | aten::_local_scalar_dense"}
    assert s["top_kernels_ms"]["gemm (x3)"] == 35
    assert s["host_syncs"]["aten::_local_scalar_dense"] == {"count": 1, "ms": 10}
    text = trace_summary.render(s)
    assert "GPU idle inside the steps: 50.0 ms" in text and "between steps (data loading, logging): [50.0]" in text


@pytest.mark.slow
def test_profiled_bench_run_on_cpu_writes_the_breakdown(tmp_path, gsm8k_dir):
    """The real thing, tiny and on CPU: verl traces two steps after the timed ones; the summary is in the results."""
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.sft_throughput", "--device", "cpu", "--shape", "tiny",
                           "--steps", "2", "--warmup", "1", "--profile", "--workdir", str(tmp_path),
                           "--gsm8k", str(gsm8k_dir / "train.jsonl"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["status"] == "ok" and r["measured_steps"] == 2 and len(r["step_s"]) == 2 and len(r["losses"]) == 3
    p = r["profile"]
    assert len(p["steps"]) == 2 and all(s["micro_batches"] >= 1 for s in p["steps"]) and len(p["between_steps_ms"]) == 1
    assert p["gpu"] is False and p["top_cpu_self_ms"]
    assert "[bench] profile of" in proc.stdout


def test_shipped_variant_takes_config_yamls_kernels_and_untied_shapes_have_a_head_of_their_own(tmp_path):
    """--shipped is what `./train.sh` gives a user (auto kernels, batch 64); -untied shapes build lm_head apart."""
    import importlib.util

    from bench import workload

    shipped, _, v = launched(["--shipped", "--shape", "0.5b-untied", "--liger", "--attn", "sdpa"], tmp_path)
    assert v.name == "0.5b-untied shipped defaults ckpt"
    # auto on CUDA without flash-attn: ladder_varlen, and ladder's fused loss where triton imports
    assert shipped.model.override_config.attn_implementation == "ladder_varlen"
    assert shipped.model.use_fused_kernels is bool(importlib.util.find_spec("triton"))
    assert shipped.data.train_batch_size == 64
    chosen, _, _ = launched(["--liger", "--attn", "sdpa"], tmp_path)
    assert chosen.model.override_config.attn_implementation == "sdpa" and chosen.model.use_liger is True
    workload.random_model("tiny-untied", tmp_path / "m", "cpu")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert workload.SHAPES["0.5b-untied"] == dict(workload.SHAPES["0.5b"], tie_word_embeddings=False)
