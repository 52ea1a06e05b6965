"""The control of the weight-sync proof: a rollout that stops receiving the actor's weights.

Loaded into verl's workers with `grpo.plugins=[bench.stale_rollout]` (LoRA runs: `--use_lora`). The rollout
takes the weight updates of the first global step it sees (for LoRA with vLLM: the base weights and the
initial, all-zero adapter) and drops every later one, so it samples from the initial policy while the actor
trains (the hf rollout keeps its weights while asleep: full fine-tuning works there too). verl's `training/rollout_probs_diff_*` (the rollout's log-probs against the actor's on the same
tokens) then grows with the actor's drift; with the sync on it stays at the bf16-vs-fp32 floor. vLLM's sleep
discards full weights, so there a dropped full update would leave none: only LoRA updates are dropped.

Never for training: it exists to show that the sync is what keeps the two together (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import importlib.util
import logging

log = logging.getLogger(__name__)


def stale(update_weights, keeps_weights_asleep: bool):
    """Wrap an async `update_weights(self, weights, ..., global_steps=None, **kw)`: pass through the calls of
    the first global step seen, drop the later ones (their weights are never read). keeps_weights_asleep=False
    (vLLM): only LoRA updates may be dropped, the base weights stay across sleep; a full update is refused."""
    if getattr(update_weights, "_ladder_stale", False):
        return update_weights

    @functools.wraps(update_weights)
    async def wrapper(self, weights, *args, global_steps=None, **kwargs):
        first = self.__dict__.setdefault("_ladder_first_sync_step", global_steps)
        if global_steps == first:
            return await update_weights(self, weights, *args, global_steps=global_steps, **kwargs)
        if not keeps_weights_asleep and kwargs.get("peft_config") is None:
            raise RuntimeError("bench.stale_rollout: vLLM's sleep discards full weights, so this update cannot be "
                               "dropped; the control needs LoRA (--use_lora, its base weights stay)")
        log.warning("bench.stale_rollout: the weight update of step %s dropped", global_steps)
        return None

    wrapper._ladder_stale = True
    return wrapper


def _patch() -> list[str]:
    patched = []
    if importlib.util.find_spec("vllm") is not None:
        from verl.workers.rollout.vllm_rollout import vllm_rollout

        vllm_rollout.ServerAdapter.update_weights = stale(vllm_rollout.ServerAdapter.update_weights, False)
        patched.append("vllm")
    from plugins import hf_rollout

    hf_rollout.HFServerAdapter.update_weights = stale(hf_rollout.HFServerAdapter.update_weights, True)
    patched.append("hf")
    return patched


PATCHED = _patch()
