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

Where it runs: as lm_head's own forward. verl's torch-backend model forward
(verl/models/transformers/dense_common.py) reads `self.lm_head.weight` outside lm_head's forward. With
an untied head, FSDP2 wraps lm_head as its own unit (verl/utils/fsdp_utils.py
`_select_fsdp2_wrap_targets`), so there the weight is still a sharded DTensor (issue 14). This module
replaces that forward too (for the dense text models: Qwen2, Llama, Mistral, Qwen3; not verl's VL ones)
with one that calls `self.lm_head(...)` with the chunked computation standing in for nn.Linear's
forward, so whatever wraps lm_head does its job: FSDP2's forward hooks all-gather the weight and, in
backward, reduce-scatter its gradient. Under FSDP1 verl's wrap policy (decoder layers; with LoRA, the
trainable leaves) leaves lm_head, tied or not, in the root unit, whose forward has already gathered it:
the call runs no hooks and the gradient reaches the root's flat parameter; a wrap_policy.min_num_params
that makes lm_head a unit of its own is handled by calling its FSDP1 wrapper. A head it does not
understand (LoRA or modules_to_save on lm_head, a bias, a quantised Linear) gets verl's unfused
computation instead, full logits through the head, after a one-line warning. Each process prints one
line the first time either path runs (`[fused_ce] rank R: ladder's fused loss ran …` / `… falls back …`),
so a run's log says which loss it trained with.

GRPO: verl 0.9.1's actor (engine_workers.ActorRolloutRefWorker on the same FSDP engine as SFT) goes
through the same forward for its update and its old and reference log-probs, with
actor_rollout_ref.model.use_fused_kernels=true, actor_rollout_ref.model.fused_kernel_options.impl_backend=torch
and this module in actor_rollout_ref.model.external_lib (the reference worker copies the actor's model config).
"""
from __future__ import annotations

import functools
import os
import sys

import torch
from torch import nn

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


# ---- where it runs: inside lm_head's forward, so that FSDP gathers the weight and reduces its gradient
_SAID: set[str] = set()


def _say_once(key: str, line: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        print(f"[fused_ce] rank {os.environ.get('RANK', '0')}: {line}", file=sys.stderr, flush=True)


def unsupported(head) -> str:
    """Why `head` (a model's lm_head) cannot run LinearLogProbs as its forward; "" when it can.

    It can when it computes logits = hidden @ weightᵀ with nn.Linear's own forward and no bias, bare or
    inside an FSDP1 wrapper (FSDP2 keeps the module and only changes its class).
    >>> unsupported(nn.Linear(4, 10, bias=False))
    ''
    >>> unsupported(nn.Linear(4, 10))
    'lm_head has a bias'
    >>> unsupported(nn.Embedding(10, 4))
    'lm_head is torch.nn.modules.sparse.Embedding, not a torch.nn.Linear (LoRA or modules_to_save on lm_head?)'
    """
    linear = getattr(head, "_fsdp_wrapped_module", head)
    kind = f"{type(linear).__module__}.{type(linear).__qualname__}"  # peft's LoRA layer is also named Linear
    if not isinstance(linear, nn.Linear):
        return f"lm_head is {kind}, not a torch.nn.Linear (LoRA or modules_to_save on lm_head?)"
    if type(linear).forward is not nn.Linear.forward:
        return f"lm_head is {kind}, a Linear with a forward of its own (quantised?)"
    if linear.bias is not None:
        return "lm_head has a bias"
    return ""


def _as_head_forward(linear: nn.Linear, hidden, labels, temperature):
    from torch.distributed.tensor import DTensor

    if isinstance(linear.weight, DTensor):  # still sharded inside its own forward: nothing gathered it
        raise RuntimeError("[fused_ce] lm_head.weight is a DTensor inside lm_head's forward (no FSDP unit "
                           "gathered it): run with model.fused_ce=off")
    return LinearLogProbs.apply(hidden, linear.weight, labels, temperature)


def head_log_probs(model: nn.Module, hidden, labels, temperature: float = 1.0):
    """(log-probs of `labels`, entropy) per token under `model`'s LM head, without the full logits.

    Runs LinearLogProbs as lm_head's forward: calling the module (not reading lm_head.weight beside it)
    lets FSDP2's forward hooks, or an FSDP1 wrapper, all-gather the weight and, in backward,
    reduce-scatter its gradient across ranks. Reading the weight directly and gathering it by hand
    (DTensor.full_tensor()) would run on one rank's tokens and hand back, as the gradient of its
    shard, only that rank's slice of that rank's own gradient: no sum over ranks, so on several ranks
    lm_head would train on the wrong gradient while one rank looks fine.
    """
    head = model.lm_head  # what verl's forward reads
    why = unsupported(head)
    if why:
        _say_once("fallback", f"{why}: ladder's fused loss falls back to verl's unfused one (full logits)")
        return _full_logits(head, hidden, labels, temperature)
    linear = getattr(head, "_fsdp_wrapped_module", head)
    # an instance attribute wins over the class's forward for this one call; the hooks stay the module's
    linear.forward = functools.partial(_as_head_forward, linear)
    try:
        log_probs, entropy = head(hidden, labels, temperature)
    finally:
        del linear.forward
    _say_once("ran", f"ladder's fused loss ran as lm_head's forward (lm_head={type(head).__name__}, "
                     f"kernels={'triton' if _use_triton(hidden) else 'torch'})")
    return log_probs, entropy


def _full_logits(head, hidden, labels, temperature: float):
    """verl's unfused log-probs and entropy (its engine's logits path), from the head's full logits."""
    from torch.utils.checkpoint import checkpoint
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    logits = head(hidden)
    logits = logits if temperature == 1.0 else logits / temperature
    flat = logits.reshape(-1, logits.shape[-1])
    entropy = checkpoint(entropy_from_logits, flat, use_reentrant=False)  # keeps no softmax for backward
    log_probs = logprobs_from_logits(flat, labels.reshape(-1), inplace_backward=False)
    return log_probs.reshape(labels.shape), entropy.reshape(labels.shape)


def forward_with_torch_backend(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                               inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                               output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                               temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """verl 0.9.1's dense_common.forward_with_torch_backend, with the LM head step in head_log_probs."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    if getattr(self, "_verl_fused_kernels_backend", "torch") != "torch":  # liger goes through here too
        return _VERL_FORWARD(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                             use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=return_dict,
                             cache_position=cache_position, logits_to_keep=logits_to_keep, temperature=temperature,
                             shift_labels=shift_labels, **loss_kwargs)
    if not return_dict:
        raise NotImplementedError("forward_with_torch_backend has to return_dict")
    outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 cache_position=cache_position)
    # verl's label rule: the engine's globally rolled labels first (its issue 6068), else roll here
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("To use forward_with_torch_backend, either labels or input_ids must be provided.")
    log_probs, entropy = head_log_probs(self, outputs[0], rolled, temperature)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


_VERL_FORWARD = None  # verl's own forward_with_torch_backend, for the liger backend


def install() -> None:
    """Make verl's torch backend (model.fused_kernel_options.impl_backend=torch) use LinearLogProbs, run as
    lm_head's forward: verl's monkey_patch imports dense_common.forward_with_torch_backend when it builds the
    model, after verl has imported this module (model.external_lib)."""
    global _VERL_FORWARD
    from verl.models.transformers import dense_common
    from verl.utils.experimental import torch_functional

    torch_functional.FusedLinearForPPOFunction = LinearLogProbs
    if dense_common.forward_with_torch_backend is not forward_with_torch_backend:  # installing twice keeps verl's
        _VERL_FORWARD = dense_common.forward_with_torch_backend
    dense_common.forward_with_torch_backend = forward_with_torch_backend


install()
