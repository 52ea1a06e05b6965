"""`ladder_varlen` (stages/attention.py): packed rows give what each sample gives on its own under SDPA."""
import pytest
import torch
import torch.nn.functional as F

import plugins.attention as attention

LENGTHS = [5, 9, 1, 3, 7]  # a one-token sample included: its own causal window is itself only


def qwen2(kv_heads: int, attn: str, seed: int = 0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      attn_implementation=attn, use_cache=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(dtype)


def pair(kv_heads: int):
    """The same random weights under ladder_varlen and under sdpa."""
    varlen, sdpa = qwen2(kv_heads, attention.NAME), qwen2(kv_heads, "sdpa", seed=1)
    sdpa.load_state_dict(varlen.state_dict())
    return varlen, sdpa


def samples(seed: int = 0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g) for n in lengths]


def packed(ids):
    """verl's packed row: (1, total) ids, position_ids restarting at 0 per sample, no attention mask."""
    return torch.cat(ids)[None], torch.cat([torch.arange(len(i)) for i in ids])[None]


def token_losses(logits, ids):
    """Next-token cross-entropy inside one sample (the last token has no target)."""
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


def test_segments_from_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    keep, cu, max_len = attention.segments(pos, None, 1, 10, pos.device, {})
    assert keep is None and cu.tolist() == [0, 3, 5, 6, 10] and max_len == 4 and cu.dtype == torch.int32


def test_segments_drop_padding_and_restart_after_a_pad():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    pos = torch.tensor([[0, 1, 2, 1], [1, 1, 0, 1]])  # left padding as `generate` numbers it
    keep, cu, max_len = attention.segments(pos, mask, 2, 4, pos.device, {})
    assert keep.tolist() == [0, 1, 2, 6, 7] and cu.tolist() == [0, 3, 5] and max_len == 3


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_packed_logits_match_each_sample_alone(kv_heads):
    varlen, sdpa = pair(kv_heads)
    ids = samples()
    row, pos = packed(ids)
    with torch.no_grad():
        got = varlen(input_ids=row, position_ids=pos).logits[0]
        want = torch.cat([sdpa(input_ids=i[None]).logits[0] for i in ids])
        # the dense path transformers builds for sdpa agrees too (it is the slow reference)
        dense = sdpa(input_ids=row, position_ids=pos).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, want, atol=1e-5, rtol=1e-5)


def test_packed_gradients_and_loss_match_per_sample():
    varlen, sdpa = pair(kv_heads=2)
    ids = samples(seed=3)
    row, pos = packed(ids)
    bounds = torch.tensor([0, *LENGTHS]).cumsum(0).tolist()

    logits = varlen(input_ids=row, position_ids=pos).logits[0]
    packed_losses = torch.cat([token_losses(logits[s:e], row[0, s:e]) for s, e in zip(bounds[:-1], bounds[1:])])
    packed_loss = packed_losses.mean()  # verl's SFT loss: mean over all loss tokens of the batch
    packed_loss.backward()

    per_sample = [token_losses(sdpa(input_ids=i[None]).logits[0], i) for i in ids]
    total = sum(len(t) for t in per_sample)
    loss = sum(t.sum() for t in per_sample) / total
    loss.backward()

    torch.testing.assert_close(packed_loss, loss, atol=1e-6, rtol=1e-6)
    # the packed loss is the token-weighted mean of the samples' own mean losses
    weighted = sum(t.mean() * len(t) for t in per_sample if len(t)) / total
    torch.testing.assert_close(packed_loss, weighted, atol=1e-6, rtol=1e-6)
    grads = dict(sdpa.named_parameters())
    for name, p in varlen.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batch_matches_each_sample_alone():
    """Without packing (a 2-D padding mask, right or left padded) pads are dropped, not attended to."""
    varlen, sdpa = pair(kv_heads=2)
    ids = samples(seed=5, lengths=[6, 3])
    width = 8
    rows, masks = [], []
    for i, left in zip(ids, (False, True)):
        pad = torch.zeros(width - len(i), dtype=torch.long)
        rows.append(torch.cat([pad, i]) if left else torch.cat([i, pad]))
        real = torch.ones(len(i), dtype=torch.long)
        masks.append(torch.cat([pad, real]) if left else torch.cat([real, pad]))
    rows, masks = torch.stack(rows), torch.stack(masks)
    pos = (masks.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = varlen(input_ids=rows, attention_mask=masks, position_ids=pos).logits
        want = [sdpa(input_ids=i[None]).logits[0] for i in ids]
    torch.testing.assert_close(got[0, :6], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, -3:], want[1], atol=1e-5, rtol=1e-5)


def test_boundaries_found_once_per_step_with_gradient_checkpointing(monkeypatch):
    """Every layer, and every recompute in the backward, reuses one segments() result."""
    calls = []
    monkeypatch.setattr(attention, "segments", lambda *a: calls.append(1) or SEGMENTS(*a))
    varlen, _ = pair(kv_heads=2)
    varlen.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    varlen.train()
    row, pos = packed(samples())
    varlen(input_ids=row, position_ids=pos).logits.sum().backward()
    assert all(p.grad is not None for p in varlen.parameters())
    assert len(calls) == 1


SEGMENTS = attention.segments


def test_kv_cache_is_refused():
    varlen, _ = pair(kv_heads=2)
    ids = samples()[0][None]
    with pytest.raises(NotImplementedError, match="training"):
        varlen.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True)


@pytest.mark.parametrize("params", [{"enable_gqa", "window_size", "scale"}, {"window_size", "scale"}, {"is_causal"}],
                         ids=["torch2.12+", "torch2.10-2.11", "torch2.9"])
def test_kernel_call_fits_each_torch_release(monkeypatch, params):
    """varlen_attn spelt causality and GQA differently across releases: each gets keywords it knows."""
    seen = {}

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert set(kw) <= params and cu_q is cu_k and max_q == max_k == 4
        assert kw.get("enable_gqa") or k.shape[1] == q.shape[1]  # no GQA keyword: kv heads repeated
        seen.update(kw)
        return attention._per_sample(q, k, v, cu_q, 8 ** -0.5)  # repeated kv heads must give GQA's result

    monkeypatch.setattr(attention, "_varlen_attn", fake_varlen)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", params)
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    got = attention._kernel(q, k, v, cu, 4, 8 ** -0.5)
    torch.testing.assert_close(got, attention._per_sample(q, k, v, cu, 8 ** -0.5))
    assert seen.get("window_size") == (-1, 0) or seen.get("is_causal") is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_per_sample_sdpa_bf16():
    """torch's varlen flash kernel against SDPA per sample, GQA 12/2 heads of Qwen2.5-1.5B, bf16."""
    assert attention._varlen_attn is not None, "this torch has no torch.nn.attention.varlen"
    torch.manual_seed(0)
    lengths = [200, 57, 311, 1, 128]
    total, dev = sum(lengths), "cuda"
    q = torch.randn(total, 12, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, *lengths], device=dev).cumsum(0).to(torch.int32)
    got = attention._kernel(q, k, v, cu, max(lengths), 128 ** -0.5)
    grads_got = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    want = attention._per_sample(q, k, v, cu, 128 ** -0.5)
    grads_want = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
