"""The one grader: verl's custom reward and ladder's evaluator are this same function.

`compute_score(data_source, solution_str, ground_truth, extra_info=None)` dispatches on
`data_source` (anything naming gsm8k → rewards.gsm8k; naming math → rewards.math) and returns
  score        float in [0, 1]: 1.0 for a strict-correct answer, else 0.0 (what RL trains on)
  acc          strict correctness (1.0/0.0)
  lenient_acc  the last number in the completion is right, whatever the format
  format_ok    the template's answer marker held an answer
  pred         the extracted answer, or None
An unknown data_source is a configuration error and raises; a completion never does.

>>> compute_score(data_source="openai/gsm8k", solution_str="#### 72", ground_truth="72")["score"]
1.0
"""
from __future__ import annotations

from rewards import gsm8k, math

KEYS = ("score", "acc", "lenient_acc", "format_ok", "pred")


def grader(data_source: str):
    name = str(data_source).lower()
    if "gsm8k" in name:
        return gsm8k
    if "math" in name:
        return math
    raise ValueError(f"rewards: no grader for data_source {data_source!r} (known: names containing "
                     "'gsm8k' or 'math')")


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    module = grader(data_source)
    try:
        return module.compute_score(data_source, solution_str, ground_truth, extra_info)
    except Exception:  # a grader bug must not kill a training run: score it wrong, keep the keys
        return {"score": 0.0, "acc": 0.0, "lenient_acc": 0.0, "format_ok": 0.0, "pred": None}


def extract_answer(text: str, data_source: str) -> str | None:
    return grader(data_source).extract_answer(text)
