"""The control of the weight-sync proof: a rollout that stops receiving the actor's weights.

Loaded into verl's workers with `grpo.plugins=[bench.stale_rollout]` (LoRA runs: `--use_lora`). The rollout
takes the weight updates of the first global step it sees (for LoRA with vLLM: the base weights and the
initial, all-zero adapter) and drops every later one, so it samples from the initial policy while the actor
trains (the hf rollout keeps its weights while asleep: full fine-tuning works there too). verl's
`training/rollout_probs_diff_*` (the rollout's log-probs against the actor's on the same tokens) then grows with the actor's drift; with the sync on it stays at the bf16-vs-fp32 floor. vLLM's sleep
discards full weights, so there a dropped full update would leave none: only LoRA updates are dropped.

Never for training: it exists to show that the sync is what keeps the two together (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import importlib


_FIRST: dict[str, object] = {}  # the first global step each adapter class saw in this process


def stale(update_weights, keeps_weights_asleep: bool):
    """Wrap an async `update_weights(self, weights, ..., global_steps=None, **kw)`: pass through the calls of
    the first global step seen, drop the later ones (their weights are never read). keeps_weights_asleep=False
    (vLLM): only LoRA updates may be dropped, the base weights stay across sleep; a full update is refused."""
    if getattr(update_weights, "_ladder_stale", False):
        return update_weights

    @functools.wraps(update_weights)
    async def wrapper(self, weights, *args, global_steps=None, **kwargs):
        first = _FIRST.setdefault(type(self).__name__, global_steps)  # per process: verl may rebuild the adapter
        if global_steps == first:
            return await update_weights(self, weights, *args, global_steps=global_steps, **kwargs)
        if not keeps_weights_asleep and kwargs.get("peft_config") is None:
            raise RuntimeError("bench.stale_rollout: vLLM's sleep discards full weights, so this update cannot be "
                               "dropped; the control needs LoRA (--use_lora, its base weights stay)")
        print(f"[stale_rollout] the weight update of step {global_steps} dropped", flush=True)
        return None

    wrapper._ladder_stale = True
    return wrapper


# verl builds the rollout's worker-side class by name when its workers start (get_rollout_class reads
# _ROLLOUT_REGISTRY then). This module swaps the registry for one that answers a wrapped subclass of whatever is
# registered at that moment: `import verl` loads this module from inside itself, when plugins.hf_rollout may be
# half-imported and register "hf" only after this module has run.
KEEPS_WEIGHTS_ASLEEP = {"vllm": False, "hf": True}


class _Registry(dict):
    def __getitem__(self, key):
        if key[0] in KEEPS_WEIGHTS_ASLEEP and key[1] == "async" and dict.__contains__(self, key):
            return f"{__name__}.Stale_{key[0]}"
        return dict.__getitem__(self, key)


def __getattr__(name: str):
    if not name.startswith("Stale_") or name[6:] not in KEEPS_WEIGHTS_ASLEEP:
        raise AttributeError(name)
    from verl.workers.rollout import base as rollout_base

    path = dict.__getitem__(rollout_base._ROLLOUT_REGISTRY, (name[6:], "async"))
    module, cls = path.rsplit(".", 1)
    original = getattr(importlib.import_module(module), cls)
    sub = type(name, (original,), {"update_weights": stale(original.update_weights, KEEPS_WEIGHTS_ASLEEP[name[6:]])})
    globals()[name] = sub
    return sub


def _install() -> None:
    from verl.workers.rollout import base as rollout_base

    if not isinstance(rollout_base._ROLLOUT_REGISTRY, _Registry):
        rollout_base._ROLLOUT_REGISTRY = _Registry(rollout_base._ROLLOUT_REGISTRY)


_install()
