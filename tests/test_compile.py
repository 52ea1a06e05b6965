"""model.compile (stages/compile.py): compiled decoder layers train exactly as eager ones, inside verl too."""
import json

import pytest
import torch
from torch._dynamo.utils import counters

import plugins.attention as attention
import plugins.compile as compile_layers
from stages import launch, sft
from stages.config import load_config
from tests.test_attention import packed, samples
from tests.test_sft import composed, verl_schema_compose


def qwen2(attn: str, layers: int = 3):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn, use_cache=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def step(model, lengths):
    """One packed forward + backward (verl's row: position_ids restart per sample): logits and grads."""
    row, pos = packed(samples(lengths=lengths))
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=row, position_ids=pos).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def compiled(request):
    compile_layers.enable(request.param)
    counters.clear()
    yield request.param
    compile_layers.disable()
    torch._dynamo.reset()


@pytest.mark.slow  # torch.compile: 10-25 s a case on 2 cores
@pytest.mark.parametrize("compiled,ckpt", [("aot_eager", False), ("aot_eager", True), ("inductor", True)],
                         indirect=["compiled"])
def test_compiled_layers_match_eager_across_token_counts(compiled, ckpt):
    """ladder_varlen stays eager inside the compiled layer; three token counts reuse the graphs (dynamic)."""
    model = qwen2(attention.NAME)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batches = ([5, 9, 1, 3, 7], [4, 11, 6], [8, 2, 2, 13, 5, 1])
    compile_layers.disable()
    want = [step(model, b) for b in batches]
    compile_layers.enable(compiled)
    got, graphs = [], []
    for b in batches:
        got.append(step(model, b))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[0] == graphs[-1], f"recompiled for a new token count: {graphs}"
    assert compile_layers._eager_forward, "no decoder layer was compiled"
    for (w_logits, w_grads), (g_logits, g_grads) in zip(want, got):
        torch.testing.assert_close(g_logits, w_logits, atol=1e-5, rtol=1e-5)
        for name in w_grads:
            torch.testing.assert_close(g_grads[name], w_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow  # compiles a layer: ~10 s on 2 cores
def test_disable_restores_eager_layers():
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    eager = Qwen2DecoderLayer.forward
    compile_layers.enable("aot_eager")
    qwen2("sdpa", layers=1)(input_ids=torch.tensor([[1, 2, 3]]))
    assert Qwen2DecoderLayer.forward is not eager
    compile_layers.disable()
    torch._dynamo.reset()
    assert Qwen2DecoderLayer.forward is eager and GradientCheckpointingLayer.__call__ is compile_layers._eager_call


# ---- config → verl
@pytest.mark.parametrize("value,backend", [("true", "inductor"), ("aot_eager", "aot_eager"), ("false", "")])
def test_compile_key_reaches_every_rank(tmp_path, value, backend):
    cfg = load_config("sft", ["launch.device=cuda", "model.attn_implementation=ladder_varlen", "model.fused_ce=off",
                              f"model.compile={value}"])
    keys = sft.trainer_keys(cfg, tmp_path, "/d.parquet", None)
    libs = verl_schema_compose(keys).model.external_lib
    assert list(libs) == ["plugins.attention", "plugins.compile"] if backend else libs == "plugins.attention"
    assert launch.environment(cfg, tmp_path).get("LADDER_COMPILE", "") == backend


def test_compile_switch_and_unknown_backend():
    assert any(k.endswith("external_lib=plugins.compile")
               for k in composed(["--compile", "--attn", "sdpa", "model.fused_ce=off"]))
    with pytest.raises(SystemExit, match="model.compile=cudagraphs"):
        launch.kernels(load_config("sft", ["model.compile=cudagraphs"]))


# ---- verl's trainer on CPU, eager and compiled, same rows: the same losses
@pytest.mark.slow
def test_sft_stage_trains_the_same_with_compiled_layers(tied_sft):
    """Both with verl's torch loss (model.fused_ce=torch, beside the decoder layers that compile): the eager run is
    the one tests/test_fused_ce.py compares ladder's fused loss against."""
    eager = tied_sft("model.fused_ce=torch")
    compiled = tied_sft("model.fused_ce=torch", "model.compile=inductor", "model.gradient_checkpointing=true")
    # once per rank, from inside verl's trainer (verl's own output goes to the stage's log)
    assert "Qwen2DecoderLayer.forward: torch.compile backend=inductor" in compiled["verl_log"]
    assert "torch.compile backend" not in eager["verl_log"]
    assert json.loads((compiled["folder"] / "manifest.json").read_text())["status"] == "done"
    assert len(eager["loss"]) == 2, eager
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=2e-3)
