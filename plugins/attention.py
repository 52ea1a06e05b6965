"""`ladder_varlen`: causal attention over packed rows, each sample attending only to itself.

    sft.verl.model.external_lib=plugins.attention                        # verl imports this module
    model.attn_implementation=ladder_varlen                             # config.yaml (ladder's key)

Why: with `use_remove_padding` verl packs a micro-batch into one row (`input_ids` of shape
(1, total_tokens), `attention_mask=None`, `position_ids` restarting at 0 for every sample) and relies
on flash-attn's variable-length kernel to keep samples apart. Without the flash-attn package the
`sdpa` path gets a dense (total × total) block-causal mask from transformers instead, so attention
costs the square of the packed row (16k tokens) rather than of each ~200-token sample, and SDPA
cannot use its flash kernel with a mask.

What: on import this registers an attention function and a mask function under `ladder_varlen` with
transformers. The mask function returns None, or the 2-D padding mask when there is padding: never a
dense mask. The attention function finds where each sample starts (a `position_ids` step other
than +1, or transformers' `cu_seq_lens_q` when given; a padding mask drops pad tokens) and runs
  - on CUDA in bf16/fp16: PyTorch's own flash kernel through `torch.nn.attention.varlen.varlen_attn`
    (torch >= 2.9; the keyword for causality and GQA changed between releases: both are handled);
  - otherwise (CPU, fp32, an older torch, or a kernel error): SDPA once per sample, which is exact but
    slow; the CPU tests use it, and a GPU falls back to it with one warning.
The boundaries are computed once per forward and reused by every layer (and by the recompute of
gradient checkpointing), so a step pays one host sync for them, not one per layer.
Training and single-pass scoring only: a KV cache (query shorter than keys) is refused.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "ladder_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # torch < 2.9
    _varlen_attn, _VARLEN_PARAMS = None, set()
# LADDER_VARLEN=loop forces the per-sample SDPA path (a reference when checking the kernel on a GPU)
_use_kernel = _varlen_attn is not None and os.environ.get("LADDER_VARLEN", "") != "loop"
_cache: tuple = (None, None, None)  # (position_ids, attention_mask, segments) of the last forward


def padding_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """transformers' mask hook: the 2-D padding mask if any token is padding, else None."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.all():
            return None
    return attention_mask


def segments(position_ids, attention_mask, batch: int, length: int, device, kwargs) -> tuple:
    """(keep, cu_seqlens int32, max_len): kept token indices in the flattened (batch*length) row or None."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and attention_mask is None:  # transformers' own packed-sequence kwargs
        return None, cu.to(device=device, dtype=torch.int32), int(kwargs.get("max_length_q") or cu.diff().max())
    if position_ids is None:
        position_ids = torch.arange(length, device=device)
    pos = position_ids.reshape(-1, length).expand(batch, length).to(device)
    start = torch.ones(batch, length, dtype=torch.bool, device=device)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    keep = None
    if attention_mask is not None:  # 2-D padding mask: drop pads; a token after a pad starts a sample
        real = attention_mask.to(device=device, dtype=torch.bool)
        start[:, 1:] |= ~real[:, :-1]
        keep = real.flatten().nonzero().squeeze(1)
        start = start.flatten()[keep]
    begins = start.flatten().nonzero().squeeze(1)
    total = torch.tensor([start.numel()], device=device)
    cu = torch.cat([begins, total]).to(torch.int32)
    return keep, cu, int(cu.diff().max())


def _kernel(q, k, v, cu, max_len, scale):
    """PyTorch's flash varlen kernel, causal, whatever keywords this torch release spells."""
    extra = {}
    if "enable_gqa" in _VARLEN_PARAMS:
        extra["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # releases without enable_gqa: give it as many kv heads as q heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in _VARLEN_PARAMS:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in _VARLEN_PARAMS:
        extra["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen_attn has no `scale` argument and the model needs a custom one")
    return _varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


def _per_sample(q, k, v, cu, scale):
    """The same attention by SDPA, one sample at a time: exact everywhere, slow."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=True)[0].transpose(0, 1)
    return out


def ladder_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, **kwargs):
    """transformers' attention signature: query (B, Hq, T, D), key/value (B, Hkv, T, D) → (B, T, Hq, D)."""
    global _cache, _use_kernel
    batch, _, length, dim = query.shape
    if key.shape[2] != length:
        raise NotImplementedError(f"{NAME} is for training (query and keys of one length); generate with sdpa")
    if sliding_window is not None or dropout or kwargs.get("is_causal", True) is False:
        raise NotImplementedError(f"{NAME} supports causal attention without sliding window or dropout")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{NAME} takes a 2-D padding mask, got shape {tuple(attention_mask.shape)}: was the "
                         "mask built for another attention implementation?")
    scale = scaling if scaling is not None else dim ** -0.5
    position_ids = kwargs.get("position_ids")

    cached_pos, cached_mask, seg = _cache
    if seg is None or cached_pos is not position_ids or cached_mask is not attention_mask or position_ids is None:
        seg = segments(position_ids, attention_mask, batch, length, query.device, kwargs)
        _cache = (position_ids, attention_mask, seg)
    keep, cu, max_len = seg

    # (B, H, T, D) → (B*T, H, D), keeping only real tokens
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if keep is not None:
        q, k, v = q[keep], k[keep], v[keep]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

    out = None
    if _use_kernel and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        try:
            out = _kernel(q, k, v, cu, max_len, scale)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as err:  # e.g. a GPU or build without these flash kernels
            _use_kernel = False
            warnings.warn(f"{NAME}: torch's varlen_attn failed ({err}); using per-sample SDPA (slow)")
    if out is None:
        out = _per_sample(q, k, v, cu, scale)

    if keep is not None:
        full = out.new_zeros(batch * length, *out.shape[1:])
        full[keep] = out
        out = full
    return out.reshape(batch, length, *out.shape[1:]), None


# eager inside a compiled layer (plugins/compile.py): the boundaries are read back to the host
AttentionInterface.register(NAME, torch.compiler.disable(ladder_varlen_attention))
AttentionMaskInterface.register(NAME, padding_mask)
