"""Reward terms for GRPO and `combined_score`, their weighted sum, with verl's reward signature.

Strict correctness stays what `rewards.compute_score` returns (`score` = `acc`, what eval reports);
GRPO may instead train on
    score = weights["correct"] * correct + weights["format"] * format + weights["length"] * length
  correct  1.0 for a strict-correct answer, else 0.0 (compute_score's `acc`)
  format   1.0 when the answer marker held an answer, else 0.0 (compute_score's `format_ok`)
  length   DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) on the response's token count n, as
           generated (EOS included, as verl's attention mask counts it), with L = max_response_length
           and B = overlong_buffer (0 < B <= L):
               0                  n <= L - B
               (L - B - n) / B    L - B < n <= L     (linear, from 0 down to -1 at n = L)
               -1                 n > L
The weights default to {correct: 1.0, format: 0.0, length: 0.0}, where score is compute_score's; the
terms a caller leaves out keep their defaults. The token count is the `response_length` argument, else
`extra_info["response_length"]`; a non-zero length weight without a count, L or B is an error (verl
0.9.1's reward managers put no token count in extra_info: the GRPO stage must add one).

The result holds compute_score's keys unchanged (acc, lenient_acc, format_ok, pred: eval's numbers),
`score` = the weighted sum, and each term under its own key, unweighted, so verl logs them apart:
`reward_correct`, `reward_format`, `reward_length` (0.0 when no count or L, B were given, which only a
zero length weight allows).

From verl's config (its loader merges reward.custom_reward_function.reward_kwargs into every call):
    reward.custom_reward_function.path=<repo>/rewards/__init__.py
    reward.custom_reward_function.name=combined_score
    +reward.custom_reward_function.reward_kwargs.weights.format=0.1         (`+`: the key is new to verl)
    +reward.custom_reward_function.reward_kwargs.max_response_length=1024
    +reward.custom_reward_function.reward_kwargs.overlong_buffer=256

>>> r = combined_score("gsm8k", "#### 71", "72", weights={"correct": 1.0, "format": 0.1})
>>> r["score"], r["acc"], r["reward_correct"], r["reward_format"], r["reward_length"]
(0.1, 0.0, 0.0, 1.0, 0.0)
>>> combined_score("gsm8k", "#### 72", "72", {"response_length": 896}, weights={"length": 1.0},
...                max_response_length=1024, overlong_buffer=256)["score"]
0.5
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Real

import rewards

WEIGHTS = {"correct": 1.0, "format": 0.0, "length": 0.0}
TERM_KEYS = ("reward_correct", "reward_format", "reward_length")


def format_reward(data_source, solution_str) -> float:
    """1.0 when the data source's answer marker held an answer (compute_score's `format_ok`), else 0.0.

    >>> format_reward("gsm8k", "#### 71"), format_reward("gsm8k", "it is 72"), format_reward("math", "\\\\boxed{}")
    (1.0, 0.0, 0.0)
    """
    return float(bool(rewards.extract_answer(solution_str, data_source)))  # '' is MATH's empty box: no answer


def length_reward(n_tokens: int, max_response_length: int, overlong_buffer: int) -> float:
    """DAPO's soft overlong punishment (module docstring): 0, then linearly down to -1 over the last
    `overlong_buffer` tokens before `max_response_length`, -1 beyond it.

    >>> [length_reward(n, 1024, 256) for n in (0, 768, 832, 896, 1024, 1025)]
    [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    """
    if not 0 < overlong_buffer <= max_response_length:
        raise ValueError(f"rewards: overlong_buffer must be in (0, max_response_length], got {overlong_buffer} "
                         f"with max_response_length {max_response_length}")
    if n_tokens <= max_response_length - overlong_buffer:
        return 0.0
    if n_tokens <= max_response_length:
        return (max_response_length - overlong_buffer - n_tokens) / overlong_buffer
    return -1.0


def check_weights(weights=None, max_response_length=None, overlong_buffer=None) -> dict[str, float]:
    """The full weights (defaults filled in); raises ValueError, naming the key, on a bad setting.
    The GRPO stage can call this with the reward_kwargs it will hand verl, before verl starts.

    >>> check_weights({"format": 0.1})
    {'correct': 1.0, 'format': 0.1, 'length': 0.0}
    """
    where = "reward.custom_reward_function.reward_kwargs (ladder's config: grpo.rewards)"
    given = dict(weights or {})
    if unknown := sorted(set(map(str, given)) - set(WEIGHTS)):
        raise ValueError(f"rewards: unknown reward term(s) {unknown} in weights, from {where}; "
                         f"the terms are {list(WEIGHTS)}")
    for term, value in given.items():
        if isinstance(value, bool) or not isinstance(value, Real) or value != value:
            raise ValueError(f"rewards: weights.{term} must be a number, got {value!r}, from {where}")
    full = {term: float(given.get(term, default)) for term, default in WEIGHTS.items()}
    if full["length"] and (max_response_length is None or overlong_buffer is None):
        raise ValueError(f"rewards: weights.length is {full['length']} but max_response_length="
                         f"{max_response_length}, overlong_buffer={overlong_buffer}: set both in {where}")
    if max_response_length is not None and overlong_buffer is not None:
        length_reward(0, max_response_length, overlong_buffer)  # checks their range
    return full


def combined_score(data_source, solution_str, ground_truth, extra_info=None, weights=None,
                   max_response_length=None, overlong_buffer=None, response_length=None) -> dict:
    """verl's reward signature plus its reward_kwargs: the weighted sum of the terms (module docstring)."""
    full = check_weights(weights, max_response_length, overlong_buffer)
    if response_length is None and isinstance(extra_info, Mapping):
        response_length = extra_info.get("response_length")
    if full["length"] and response_length is None:
        raise ValueError("rewards: weights.length is non-zero but no token count came with the completion: "
                         "pass response_length=, or put it in extra_info['response_length'] (verl 0.9.1's reward "
                         "managers do not; the GRPO stage must)")
    result = rewards.compute_score(data_source, solution_str, ground_truth, extra_info)
    known = None not in (response_length, max_response_length, overlong_buffer)
    terms = {"correct": result["acc"], "format": format_reward(data_source, solution_str),
             "length": length_reward(int(response_length), max_response_length, overlong_buffer) if known else 0.0}
    score = sum(full[term] * value for term, value in terms.items())
    return {**result, "score": float(score), **{f"reward_{term}": value for term, value in terms.items()}}
