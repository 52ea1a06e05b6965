"""GSM8K grader: one `extract_answer` for gold answers and model completions alike.

Strict answer: of the markers below, the one that occurs *last* in the text wins:
  - `#### N`                 the number after the last `####` (GSM8K's own format)
  - `<answer> N </answer>`   inside the last `<answer>`; the closing tag may be missing, since a
                             stop string (`</answer>`) removes it from vLLM output
  - `\\boxed{N}`              inside the last `\\boxed{}`
Lenient answer: the last number anywhere in the completion.
Numbers compare by value after removing `$`, `%`, thousands commas, spaces, markdown emphasis and
a trailing period: `72.00`, `72.`, `$72`, `1,000` and `**72**` all match 72 and 1000. A fraction
`a/b` compares by value (`3/4` == `0.75`). The whole completion is read, not only its tail.

>>> compute_score("gsm8k", "48 + 24 = 72\\n#### 72", "72")["score"]
1.0
>>> compute_score("gsm8k", "<think>...</think> <answer>$1,000.00", "1000")["acc"]
1.0
>>> r = compute_score("gsm8k", "so the answer is 72", "72"); (r["acc"], r["lenient_acc"], r["format_ok"])
(0.0, 1.0, 0.0)
"""
from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")
HASHES = re.compile(r"####")
ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _first_number(text: str) -> str | None:
    match = NUMBER.search(_clean(text))
    return match.group(0) if match else None


def _clean(text: str) -> str:
    """Drop what decorates a number: $, %, emphasis, and commas/spaces inside digit groups."""
    text = re.sub(r"[$%*_`]|\\\$|\\%|\\!|\\,", "", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return re.sub(r"(?<=\d) (?=\d{3}\b)", "", text)


def _braced(text: str, start: int) -> str:
    """Content of the brace group opening at text[start-1] == '{' (unclosed: to the end)."""
    depth, i = 1, start
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
        i += 1
    return text[start:]


def _marked(text: str) -> tuple[int, str | None]:
    """(position, number) of the strict answer: the last marker in the text that holds a number."""
    found: list[tuple[int, str | None]] = []
    hashes = list(HASHES.finditer(text))
    if hashes:
        tail = text[hashes[-1].end():]
        found.append((hashes[-1].start(), _first_number(tail.split("\n\n")[0] or tail)))
    opens = list(ANSWER_OPEN.finditer(text))
    if opens:
        body = re.split(r"</answer>", text[opens[-1].end():], maxsplit=1, flags=re.IGNORECASE)[0]
        found.append((opens[-1].start(), _first_number(body)))
    boxes = list(BOXED.finditer(text))
    if boxes:
        found.append((boxes[-1].start(), _first_number(_braced(text, boxes[-1].end()))))
    found = [f for f in found if f[1] is not None]
    return max(found) if found else (-1, None)


def extract_answer(text: str) -> str | None:
    """The strict answer as written (e.g. '1000' from '#### 1,000'), or None.

    >>> extract_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\\n#### 72")
    '72'
    >>> extract_answer("<answer> 7 </answer> then #### 9")
    '9'
    >>> extract_answer("no marker 12") is None
    True
    """
    if not isinstance(text, str):
        return None
    number = _marked(text)[1]
    return None if number is None else number.replace(",", "").rstrip(".")


def extract_lenient(text: str) -> str | None:
    """The last number anywhere in the text."""
    if not isinstance(text, str):
        return None
    numbers = NUMBER.findall(_clean(re.sub(r"<<[^>]*>>", "", text)))
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def to_number(text: str | None) -> Fraction | None:
    """Exact value of '72', '72.00', '-3.5', '3/4'; None when it is not a number."""
    if text is None:
        return None
    text = _clean(str(text)).strip().rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return Fraction(num.replace(",", "")) / Fraction(den.replace(",", ""))
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _gold(ground_truth: str) -> Fraction | None:
    """Gold is either a bare number ('1,000') or a whole GSM8K answer ending in '#### N'."""
    value = to_number(ground_truth)
    return value if value is not None else to_number(extract_answer(ground_truth))


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """verl's reward signature; score 1.0 for a strict-correct answer, else 0.0."""
    text = solution_str if isinstance(solution_str, str) else ""
    gold = _gold(str(ground_truth))
    pred = extract_answer(text)
    lenient = extract_lenient(text)
    acc = gold is not None and pred is not None and to_number(pred) == gold
    lenient_acc = acc or (gold is not None and lenient is not None and to_number(lenient) == gold)
    # floats, not bools: verl averages every key of this dict into its metrics
    return {"score": float(acc), "acc": float(acc), "lenient_acc": float(lenient_acc),
            "format_ok": float(pred is not None), "pred": pred}
