"""The one grader: verl's custom reward and ladder's evaluator are this same function.

`compute_score(data_source, solution_str, ground_truth, extra_info=None)` dispatches on
`data_source` (anything naming gsm8k → rewards.gsm8k; naming math → rewards.math) and returns
  score        1.0 for a strict-correct answer, else 0.0: no format bonus (what RL trains on)
  acc          strict correctness, 1.0/0.0
  lenient_acc  1.0 when strict-correct or the last number in the completion is right, whatever the format
  format_ok    1.0 when the answer marker held an answer (GSM8K: `####`, `<answer>`, `\\boxed`; MATH: `\\boxed`)
  pred         the extracted answer (a string), or None
The same five keys every call, floats but for `pred`, so verl can average and log them all. Gold may be a
bare answer or a whole reference solution. An unknown data_source is a configuration error and raises; a
completion never does (a grader bug is logged and scored 0 here; the tests call the graders unguarded).

GRPO may train on `combined_score` instead (rewards/terms.py): the same keys, `score` a weighted sum of
correctness, format and length terms, each also logged under its own key.

>>> compute_score(data_source="openai/gsm8k", solution_str="#### 72", ground_truth="72")["score"]
1.0
"""
from __future__ import annotations

import logging

from rewards import gsm8k, math

log = logging.getLogger(__name__)
KEYS = ("score", "acc", "lenient_acc", "format_ok", "pred")


def grader(data_source: str):
    name = str(data_source).lower()
    if "gsm8k" in name:
        return gsm8k
    if "math" in name:
        return math
    raise ValueError(f"rewards: no grader for data_source {data_source!r}. It comes from the data_source column "
                     "of the RL parquet (data_prep writes it) and must name 'gsm8k' (e.g. 'openai/gsm8k') or "
                     "'math' (e.g. 'HuggingFaceH4/MATH-500').")


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    module = grader(data_source)
    try:
        return module.compute_score(data_source, solution_str, ground_truth, extra_info)
    except Exception:  # a grader bug must not kill a training run: log it, score it wrong, keep the keys
        log.exception("rewards: the %s grader raised (a bug: the tests call graders unguarded); "
                      "scored 0. ground_truth=%r", module.__name__, str(ground_truth)[:200])
        return {"score": 0.0, "acc": 0.0, "lenient_acc": 0.0, "format_ok": 0.0, "pred": None}


def extract_answer(text: str, data_source: str) -> str | None:
    r"""The dataset's answer in `text`: gold answers at data-prep time, predictions when grading.

    >>> extract_answer("48+24 = 72\n#### 1,072", "openai/gsm8k"), extract_answer("so \\boxed{x^2}.", "math")
    ('1072', 'x^2')
    """
    return grader(data_source).extract_answer(text)


# last: rewards.terms reads compute_score and extract_answer from this package; here for verl's loader,
# which takes a file and a name (reward.custom_reward_function.path / .name)
from rewards.terms import combined_score  # noqa: E402
