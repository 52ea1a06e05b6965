"""bench/sft_throughput.py: every variant flag composes into a verl command that fits verl's schema."""
import sys
from pathlib import Path

from stages import sft
from stages.common import REPO, load_config
from tests.test_sft import verl_schema_compose

sys.path.insert(0, str(REPO / "bench"))
import sft_throughput as bench  # noqa: E402


def test_every_variant_flag_reaches_verl(tmp_path):
    flags = ["--fused_adam", "--no_reshard", "--workers", "3", "--liger", "--fused_ce", "triton", "--max_tokens",
             "8192", "--lora", "8", "--batch_size", "32", "--unpacked", "--compile", "--no_grad_ckpt"]
    variant = bench.variant_parser().parse_args(flags)
    variant.name = bench.label(variant)
    cfg = load_config("sft", bench.verl_overrides(variant, Path("/m"), Path("/d.parquet"), tmp_path, "cuda"))
    keys = sft.verl_overrides(cfg, tmp_path, "/d.parquet", None)
    c = verl_schema_compose(keys)
    assert c.optim.override_optimizer_config.fused is True and c.engine.reshard_after_forward is False
    assert (c.data.num_workers, c.data.max_token_len_per_gpu, c.data.train_batch_size) == (3, 8192, 32)
    assert (c.model.use_liger, c.model.use_fused_kernels, c.model.fused_kernel_options.impl_backend) == (True, True, "triton")
    assert (c.model.lora_rank, c.model.use_remove_padding, c.engine.use_torch_compile) == (8, False, True)
    assert c.model.enable_gradient_checkpointing is False
    assert c.model.override_config.attn_implementation == "ladder_varlen" and c.model.external_lib == "stages.attention"
