"""`grpo.overlong: filter`: truncated responses add no gradient (DAPO's overlong filtering; TRL's
`mask_truncated_completions`). verl 0.9.1's actor has no key for it.

Loaded by name in every Ray process (`VERL_USE_EXTERNAL_MODULES`, only when the key asks for it: importing it turns
the filter on). It wraps the legacy trainer's `RayPPOTrainer._update_actor`, which runs in verl's TaskRunner:
the actor update sees a `response_mask` whose rows for truncated samples are all zero. verl's actor multiplies
every loss term (policy gradient, KL, entropy) by that mask, and counts tokens and responses for its
normalisation from it, so such a sample adds nothing. Everything before the update sees the full batch: the
truncated samples' rewards count in their group's mean and std (their own advantage is then unused), and the
step's metrics describe every sample. Which samples were cut comes from the batch's `truncated` column, put
there by plugins/grpo_variants.py's reward manager (the one place that decides it: `is_truncated`).

Why at the update and not earlier (an agent loop that zeroes the mask at rollout): verl's rollout-correction
metrics, computed before the advantages, raise on a step whose every response mask is empty.

A PPO mini-batch of truncated responses only makes no update: with `loss_agg_mode` token-mean (grpo.loss=dapo)
its loss is 0/0 and verl skips the step (it prints `grad_norm is not finite`); the sequence-mean modes (grpo,
dr_grpo) give a zero loss and a zero gradient.
"""
from __future__ import annotations

import functools

import torch
from verl.trainer.ppo.ray_trainer import RayPPOTrainer


def masking_truncated(update):
    """`update` (RayPPOTrainer._update_actor) run on the batch with truncated samples' response_mask rows zeroed;
    the batch's own mask is put back after."""

    @functools.wraps(update)
    def _update_actor(self, batch):
        if "truncated" not in batch.non_tensor_batch:
            raise RuntimeError("grpo.overlong=filter: the batch has no `truncated` column, which plugins.grpo_variants' "
                               "reward manager adds (reward.reward_manager.* must stay as stages/grpo.py sets them)")
        full = batch.batch["response_mask"]
        cut = torch.as_tensor(batch.non_tensor_batch["truncated"].astype(bool), device=full.device)
        batch.batch["response_mask"] = full * (~cut).to(full.dtype).unsqueeze(-1)
        try:
            return update(self, batch)
        finally:
            batch.batch["response_mask"] = full

    _update_actor.ladder_masks_truncated = True
    return _update_actor


if not getattr(RayPPOTrainer._update_actor, "ladder_masks_truncated", False):  # once, however often imported
    RayPPOTrainer._update_actor = masking_truncated(RayPPOTrainer._update_actor)
