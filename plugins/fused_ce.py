"""`fused_ce: ladder`: token log-probs through the LM head in chunks, cuBLAS matmuls + two small kernels.

    ./train.sh model.fused_ce=ladder           # verl's use_fused_kernels, torch backend, this module

verl's fused loss (`model.use_fused_kernels`) never materialises the (tokens × 152k) logits. Its
triton backend recomputes them inside triton matmuls that ran at 140–250 TFLOP/s on an H200, a
fifth of an SFT step (docs/benchmarks.md, 2026-12-01 profile); its torch backend spends about ten
fp32 passes over every 512-token chunk of logits. This module replaces the torch backend's
autograd function (verl.utils.experimental.torch_functional.FusedLinearForPPOFunction, loaded
into every rank through verl's `model.external_lib`) with one that, per chunk of CHUNK tokens:
  - forward: logits = h @ Wᵀ in bf16 (cuBLAS), then one pass over them for the log-sum-exp, the
    target's logit and the entropy (online softmax); saves only those per-token numbers;
  - backward: the logits again (cuBLAS), one pass turning them in place into dlogits =
    g·(onehot − p) − g_H·p·(log p + H), then dh = dlogits @ W and dW += dlogitsᵀ @ h (cuBLAS; dW
    summed over chunks in fp32).
On CUDA the two passes are triton kernels; elsewhere (CPU tests) the same math in fp32 torch.
Same signature and outputs as verl's: (log_probs fp32, entropy) for (hidden, weight, labels,
temperature, chunk_size); verl's chunk_size is ignored for CHUNK.
"""
from __future__ import annotations

import os

import torch

CHUNK = 4096  # tokens per chunk: 4096 × 152k bf16 logits = 1.2 GB live at a time

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None


# ---- the two passes over a chunk's logits: torch (reference, any device) and triton (CUDA)
def _row_stats_torch(logits, targets, inv_t: float):
    x = logits.float() * inv_t
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse[:, None])
    entropy = lse - (p * x).sum(-1)
    return lse, x.gather(1, targets[:, None]).squeeze(1), entropy


def _grad_logits_torch(logits, targets, lse, entropy, g, g_ent, inv_t: float):
    """dL/dlogits for L = Σ g·log p(target) + Σ g_ent·H, written over `logits` (in place)."""
    x = logits.float() * inv_t
    p = torch.exp(x - lse[:, None])
    d = -p * g[:, None]
    if g_ent is not None:
        d -= g_ent[:, None] * p * (x - lse[:, None] + entropy[:, None])
    d.scatter_add_(1, targets[:, None], g[:, None])
    logits.copy_(d * inv_t)
    return logits


if triton is not None:
    @triton.jit
    def _row_stats_kernel(logits, targets, lse_out, target_out, ent_out, V: tl.constexpr, stride, inv_t,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane online softmax, merged at the end
        s = tl.zeros([BLOCK], tl.float32)
        t = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, x)
            scale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
            s = s * scale + e
            t = t * scale + e * tl.where(x == float("-inf"), 0.0, x)
            m = m_new
        m_all = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
        s_all = tl.sum(s * w, 0)
        lse = m_all + tl.log(s_all)
        tl.store(lse_out + row, lse)
        tl.store(ent_out + row, lse - tl.sum(t * w, 0) / s_all)
        target = tl.load(targets + row)
        tl.store(target_out + row, tl.load(base + target).to(tl.float32) * inv_t)

    @triton.jit
    def _grad_logits_kernel(logits, targets, lse_in, ent_in, g_in, g_ent_in, V: tl.constexpr, stride, inv_t,
                            HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        lse = tl.load(lse_in + row)
        g = tl.load(g_in + row)
        target = tl.load(targets + row)
        if HAS_ENT:
            g_ent = tl.load(g_ent_in + row)
            ent = tl.load(ent_in + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32) * inv_t
            p = tl.exp(x - lse)
            d = tl.where(cols == target, g, 0.0) - g * p
            if HAS_ENT:
                d -= g_ent * p * (x - lse + ent)
            tl.store(base + cols, (d * inv_t).to(logits.dtype.element_ty), mask=inside)


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # tests: triton's CPU interpreter runs the kernels


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRET)


def row_stats(logits, targets, inv_t: float):
    """(log-sum-exp, target logit, entropy) per row of a chunk's logits, fp32, after ×inv_t."""
    if not _use_triton(logits):
        return _row_stats_torch(logits, targets, inv_t)
    rows, vocab = logits.shape
    out = [torch.empty(rows, device=logits.device, dtype=torch.float32) for _ in range(3)]
    _row_stats_kernel[(rows,)](logits, targets, out[0], out[1], out[2], vocab, logits.stride(0), inv_t,
                               BLOCK=1024)
    return tuple(out)


def grad_logits(logits, targets, lse, entropy, g, g_ent, inv_t: float):
    if not _use_triton(logits):
        return _grad_logits_torch(logits, targets, lse, entropy, g, g_ent, inv_t)
    rows, vocab = logits.shape
    _grad_logits_kernel[(rows,)](logits, targets, lse, entropy, g.float().contiguous(),
                                 g_ent.float().contiguous() if g_ent is not None else g, vocab,
                                 logits.stride(0), inv_t, HAS_ENT=g_ent is not None, BLOCK=1024)
    return logits


# ---- the autograd function verl's torch backend calls
class LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature: float = 1.0, chunk_size: int = 512):
        shape = labels.shape
        h = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).to(torch.int64)
        w = weight.to(h.dtype)
        inv_t = 1.0 / float(temperature)
        stats = [torch.empty(len(y), device=h.device, dtype=torch.float32) for _ in range(3)]
        for s in range(0, len(y), CHUNK):
            logits = h[s:s + CHUNK] @ w.t()
            for out, part in zip(stats, row_stats(logits, y[s:s + CHUNK], inv_t)):
                out[s:s + CHUNK] = part
        lse, target_logit, entropy = stats
        ctx.save_for_backward(hidden, weight, y, lse, entropy)
        ctx.inv_t = inv_t
        ctx.set_materialize_grads(False)
        return (target_logit - lse).reshape(shape), entropy.to(hidden.dtype).reshape(shape)

    @staticmethod
    def backward(ctx, d_logp, d_ent):
        hidden, weight, y, lse, entropy = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.shape[-1])
        w = weight.to(h.dtype)
        g = d_logp.reshape(-1).float() if d_logp is not None else torch.zeros_like(lse)
        g_ent = d_ent.reshape(-1).float() if d_ent is not None else None
        dh = torch.empty_like(h) if hidden.requires_grad else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if weight.requires_grad else None
        for s in range(0, len(y), CHUNK):
            e = min(s + CHUNK, len(y))
            d = grad_logits(h[s:e] @ w.t(), y[s:e], lse[s:e], entropy[s:e], g[s:e],
                            g_ent[s:e] if g_ent is not None else None, ctx.inv_t)
            if dh is not None:
                dh[s:e] = d @ w
            if dw is not None:
                dw += (d.t() @ h[s:e]).float()
        return (dh.reshape(hidden.shape) if dh is not None else None,
                dw.to(weight.dtype) if dw is not None else None, None, None, None)


def install() -> None:
    """Make verl's torch backend (model.fused_kernel_options.impl_backend=torch) use LinearLogProbs."""
    from verl.utils.experimental import torch_functional

    torch_functional.FusedLinearForPPOFunction = LinearLogProbs


install()
