"""MATH / MATH-500 grader: the answer is the content of the last `\\boxed{}` (or `\\fbox{}`).

Strict: the last boxed answer, nested braces included, equals the gold answer under math-verify
(`parse` + `verify`); without math-verify, or when it fails on an input, under a normalized string
comparison (spaces, `\\left`/`\\right`, `\\!`, `$`, `\\text{…}` units, `^\\circ`, a trailing period
dropped; `\\dfrac`/`\\tfrac` read as `\\frac`). Gold may be a bare answer (MATH-500's `answer`) or a
full solution holding `\\boxed{}` (MATH's `solution`). Lenient: strict, or the last number in the
completion equals the gold answer as a number. `format_ok`: a boxed answer exists.

>>> compute_score("math", "so $x = \\\\boxed{\\\\frac{1}{2}}$.", "\\\\frac12")["acc"]
1.0
>>> extract_answer("\\\\boxed{\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)}")
'\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)'
"""
from __future__ import annotations

import re

from rewards.gsm8k import extract_lenient, to_number

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} with nested braces; None when absent or unclosed."""
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def normalize(answer: str) -> str:
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|!|,|;|:)", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\%|%|\$", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s


def _equal(pred: str, gold: str) -> bool:
    try:
        from math_verify import parse, verify

        gold_p, pred_p = parse(f"${gold}$"), parse(f"${pred}$")
        if gold_p and pred_p and verify(gold_p, pred_p):
            return True
    except Exception:  # math-verify missing or failing on odd LaTeX: fall back to strings
        pass
    return normalize(pred) == normalize(gold)


def _gold(ground_truth: str) -> str:
    boxed = extract_answer(ground_truth)
    return boxed if boxed is not None else ground_truth.strip()


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    text = solution_str if isinstance(solution_str, str) else ""
    gold = _gold(str(ground_truth))
    pred = extract_answer(text)
    acc = pred is not None and _equal(pred, gold)
    gold_value, last = to_number(gold), extract_lenient(text)
    lenient = acc or (gold_value is not None and last is not None and to_number(last) == gold_value)
    return {"score": float(acc), "acc": float(acc), "lenient_acc": float(lenient),
            "format_ok": float(pred is not None), "pred": pred}
