"""fused_ce: ladder (stages/fused_ce.py): the chunked LM-head log-probs give what full logits give."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import plugins.fused_ce as fused_ce
from stages.config import REPO, load_config

T, H, V = 37, 16, 101


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, T, H, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=dtype) / 2).requires_grad_()
    y = torch.randint(0, V, (1, T), generator=g)
    a, b = torch.randn(1, T, generator=g), torch.randn(1, T, generator=g)  # upstream grads
    return h, w, y, a, b


def reference(h, w, y, temperature):
    """Full logits in float64: log p(label) and the entropy of every token."""
    logits = (h.double() @ w.double().t()) / temperature
    logp = F.log_softmax(logits, -1)
    return logp.gather(-1, y[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_chunked_log_probs_entropy_and_grads_match_full_logits(monkeypatch, temperature, with_entropy):
    monkeypatch.setattr(fused_ce, "CHUNK", 8)  # five chunks, the last one short
    h, w, y, a, b = inputs()
    logp, ent = fused_ce.LinearLogProbs.apply(h, w, y, temperature, 512)
    want_logp, want_ent = reference(h, w, y, temperature)
    assert logp.dtype == torch.float32 and logp.shape == y.shape
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-5, rtol=1e-5)
    loss = (logp * a).sum() + ((ent * b).sum() if with_entropy else 0)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = (want_logp * a).sum() + ((want_ent * b).sum() if with_entropy else 0)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh.double(), rh.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw.double(), rw.double(), atol=1e-5, rtol=1e-4)


def test_verls_torch_backend_calls_it():
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    h, w, y, a, _ = inputs(seed=1)
    logp, _ = FusedLinearForPPO(impl_backend="torch")(h, w, y)
    torch.testing.assert_close(logp.double(), reference(h, w, y, 1.0)[0], atol=1e-5, rtol=1e-5)
    from verl.utils.experimental import torch_functional

    assert torch_functional.FusedLinearForPPOFunction is fused_ce.LinearLogProbs


KERNELS = """
import torch, plugins.fused_ce as f
assert f._INTERPRET and f.triton is not None
g = torch.Generator().manual_seed(0)
logits = (torch.randn(6, 2500, generator=g) * 4).to(torch.bfloat16)  # three blocks of 1024, the last partial
y = torch.randint(0, 2500, (6,), generator=g)
for inv_t in (1.0, 1 / 0.7):
    ref = f._row_stats_torch(logits, y, inv_t)
    got = f.row_stats(logits, y, inv_t)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=2e-5)
    lse, _, ent = ref
    gr, ge = torch.randn(6, generator=g), torch.randn(6, generator=g)
    for g_ent in (None, ge):
        want = f._grad_logits_torch(logits.clone(), y, lse, ent, gr, g_ent, inv_t)
        have = f.grad_logits(logits.clone(), y, lse, ent, gr, g_ent, inv_t)
        torch.testing.assert_close(have.float(), want.float(), atol=1e-2, rtol=1e-2)  # both bf16 outputs
print("ok")
"""


def test_triton_kernels_match_the_torch_path_in_trotons_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", KERNELS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_full_logits_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1, 5000, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(30000, 256, device="cuda", generator=g) / 16).bfloat16().requires_grad_()
    y = torch.randint(0, 30000, (1, 5000), device="cuda", generator=g)
    logp, ent = fused_ce.LinearLogProbs.apply(h, w, y, 1.0, 512)
    want_logp, want_ent = reference(h, w, y, 1.0)
    torch.testing.assert_close(logp.double(), want_logp, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ent.double(), want_ent, atol=3e-2, rtol=3e-2)


# ---- through verl's trainer on CPU: the losses of verl's own torch backend (fp32 softmax over bf16 logits;
# the unfused path rounds its loss to bf16)
def test_sft_stage_trains_the_same_with_ladders_fused_loss(tiny_model, gsm8k_dir, tmp_path):
    import json

    from stages import launch, sft
    from tests.test_sft import TRAIN, sft_parquet, verl_schema_compose

    cfg = load_config("sft", ["launch.device=cuda", "model.attn_implementation=ladder_varlen", "model.fused_ce=ladder"])
    c = verl_schema_compose(sft.trainer_keys(cfg, tmp_path, "/d.parquet", None))
    assert (c.model.use_fused_kernels, c.model.fused_kernel_options.impl_backend) == (True, "torch")
    assert list(c.model.external_lib) == ["plugins.attention", "plugins.fused_ce"]

    data = sft_parquet(tiny_model, gsm8k_dir, tmp_path / "d.parquet", rows=16)
    losses = {}
    for name in ("torch", "ladder"):
        argv = [*TRAIN, f"model.fused_ce={name}", "--model", str(tiny_model), "--train_data", str(data), "--epochs",
                "1", "sft.warmup_ratio=0", "sft.verl.optim.lr_scheduler_type=constant", f"run.output_dir={tmp_path}",
                f"run.name={name}", "trainer.total_training_steps=2"]
        proc = subprocess.run([sys.executable, "-m", "stages", "--stage", "sft", *argv], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        losses[name] = [m["train/loss"] for _, m in sorted(launch.read_metrics(tmp_path / name / "sft").items())]
        assert json.loads((tmp_path / name / "sft" / "manifest.json").read_text())["status"] == "done"
    assert len(losses["torch"]) == 2, losses
    assert losses["ladder"] == pytest.approx(losses["torch"], abs=1e-3)
