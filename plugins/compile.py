"""torch.compile of every decoder layer inside verl's trainer (config.yaml `model.compile`).

    ./train.sh model.compile=true                    # inductor; or model.compile=aot_eager (a check, no codegen)

Measured on an H200 (docs/benchmarks.md, 2026-12-01): 1.5B full SFT 34.1k tokens/s against 37.3k with
liger's kernels instead, so config.yaml leaves it off.

verl 0.9.1's FSDP engine never compiles the model (its `engine.use_torch_compile` compiles only the
entropy helper, which SFT does not call), so ladder loads this module into every rank through verl's
`model.external_lib`, with the backend in LADDER_COMPILE (stages/launch.py sets both).

What it compiles: the `forward` of each decoder-layer class (transformers' GradientCheckpointingLayer
subclasses: Qwen2DecoderLayer, LlamaDecoderLayer, ...), once per class, the first time a layer runs,
with dynamic shapes (dynamic batching packs a different token count into every micro-batch).
  - The layer's `__call__` stays eager: FSDP2's hooks and transformers' gradient checkpointing wrap
    the compiled forward as they wrap the eager one; the recompute replays the compiled graph.
  - Dynamo inlines the layer's own modules, so the 28 layers of a 1.5B model share one compiled graph
    per shape family rather than hitting the recompile limit.
  - ladder_varlen's attention is kept out of the graph (plugins/attention.py marks it with
    torch.compiler.disable: it reads sample boundaries back to the host); the norms, rotary embedding,
    projections and MLP around it are what inductor fuses.
"""
from __future__ import annotations

import os
import sys

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

BACKENDS = ("inductor", "aot_eager", "eager")
_eager_call = GradientCheckpointingLayer.__call__
_eager_forward: dict[type, object] = {}  # class -> its forward before compile, while enabled
_backend = ""


def _owner(cls: type) -> type:
    """The class in cls's MRO that defines `forward` (FSDP2 wraps a layer in a generated subclass)."""
    return next(c for c in cls.__mro__ if "forward" in vars(c))


def _call(self, *args, **kwargs):
    owner = _owner(type(self))
    if owner not in _eager_forward:
        _eager_forward[owner] = owner.forward
        owner.forward = torch.compile(owner.forward, backend=_backend, dynamic=True)
        print(f"[ladder.compile] {owner.__module__}.{owner.__qualname__}.forward: torch.compile "
              f"backend={_backend}, dynamic shapes", file=sys.stderr, flush=True)
    return _eager_call(self, *args, **kwargs)


def enable(backend: str) -> None:
    """Compile decoder layers with `backend` from their next call on."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"LADDER_COMPILE={backend}: use one of {', '.join(BACKENDS)} (config.yaml model.compile)")
    _backend = backend
    GradientCheckpointingLayer.__call__ = _call


def disable() -> None:
    """Eager again: the original forwards and __call__ back (tests)."""
    for owner, forward in _eager_forward.items():
        owner.forward = forward
    _eager_forward.clear()
    GradientCheckpointingLayer.__call__ = _eager_call


if os.environ.get("LADDER_COMPILE"):
    enable(os.environ["LADDER_COMPILE"])
