"""What ladder's GRPO keys need from verl 0.9.1 that it does not ship: a token count for the reward function.

`TokenCountRewardManager` (every GRPO run, stages/grpo.py: `reward.reward_manager.source=importlib`,
`reward.reward_manager.module.path=pkg://plugins.grpo_variants`, `reward.reward_manager.name=TokenCountRewardManager`)
is verl's `naive` reward manager, but the reward function's `extra_info` also holds `response_length`, the
response's token count as verl's attention mask counts it (EOS included), which rewards.combined_score's length
term (DAPO's soft overlong punishment, `grpo.overlong: penalty`) needs and verl 0.9.1's managers do not pass. The
count and `truncated` (1.0 when the response was cut at max_response_length, `is_truncated`) are returned beside
the grader's keys, so verl puts them in the batch (plugins/overlong_filter.py reads `truncated`) and in its
rollout dumps (stages/grpo_report.py: response length of correct vs incorrect answers, the share cut).
Why not verl's own `dapo` manager for the penalty: it adds its penalty after the reward function, under keys of
its own (`overlong_reward`) with a factor of its own; here the length term is one of rewards.terms' weighted
terms, computed and logged like the others, and one code path serves every run.
"""
from __future__ import annotations

import functools

import numpy as np
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager


@functools.lru_cache(maxsize=8)
def _generation_eos(model_path: str) -> tuple[int, ...]:
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS is all there is
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,) if eos is not None else ()


def stop_ids(tokenizer, model_path: str) -> frozenset[int]:
    """The tokens a rollout stops at: the tokenizer's EOS and generation_config.json's eos_token_id(s), as vLLM
    and plugins/hf_rollout.py stop."""
    ids = set(_generation_eos(str(model_path)))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def is_truncated(response_ids, max_response_length: int, stops) -> bool:
    """True when generation was cut at the length limit: all `max_response_length` tokens used and the last one is
    not a stop token (a response that ends with EOS exactly at the limit finished).

    >>> is_truncated([5, 6, 7], 3, {2}), is_truncated([5, 6, 2], 3, {2}), is_truncated([5, 6], 3, {2})
    (True, False, False)
    """
    ids = list(response_ids)
    return len(ids) >= max_response_length and int(ids[-1]) not in stops


class TokenCountRewardManager(NaiveRewardManager):
    """verl's naive reward manager, with `response_length` in the reward function's extra_info (module docstring)."""

    async def run_single(self, data):
        last = data[-1:]  # as the naive manager: a multi-sequence sample is scored on its last sequence
        width = last.batch["responses"].shape[-1]  # verl pads responses to max_response_length
        n = int(last.batch["attention_mask"][0, -width:].sum())
        ids = last.batch["responses"][0, :n].tolist()
        stops = stop_ids(self.tokenizer, self.config.actor_rollout_ref.model.path)
        info = last.non_tensor_batch.get("extra_info")
        info = dict(info[0]) if info is not None and isinstance(info[0], dict) else {}
        # a dict of this sample's own: the samples of a group share one extra_info object
        last.non_tensor_batch["extra_info"] = np.array([{**info, "response_length": n}], dtype=object)
        result = await super().run_single(last)
        result["reward_extra_info"].update(response_length=float(n),
                                           truncated=float(is_truncated(ids, width, stops)))
        return result
