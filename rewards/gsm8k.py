"""GSM8K grader: one `extract_answer` for gold answers and model completions alike.

Strict answer. Three markers are read, each at its *last* occurrence in the text:
  - `#### N`                 the first number after the last `####`, within its paragraph
                             (GSM8K's own format)
  - `<answer> N </answer>`   the first number inside the last `<answer>`; the closing tag may be
                             missing, since a stop string (`</answer>`) removes it from vLLM output
  - `\\boxed{N}`, `\\fbox{N}`  the first number inside the last box (nested braces; unclosed: to the end)
Of these, the ones holding a number compete and the one whose marker starts *last* wins: a model
that runs on past its answer (`#### 72\\n\\nUser: next question ... #### 13`) is graded on 13.
`format_ok` is 1.0 when a marker held a number.
Lenient answer: the last number anywhere in the completion (calculator notes `<<48/2=24>>` included).

A number is `-?digits[.digits][/digits]`, read after removing `$`, `%`, markdown emphasis
(`*`, `_`, backticks), LaTeX `\\$ \\% \\! \\,`, and `,`, `{,}` or spaces between thousands groups;
`\\frac{3}{4}` reads as `3/4`, a Unicode minus as `-`, and `-` is a sign only where it does not
follow a digit, letter or bracket (`5-3` is 5 and 3). Numbers compare by exact value: `72.00`,
`72.`, `$72`, `**72**` equal 72; `1,000` equals 1000; a fraction compares by value (`3/4` == 0.75).
The whole completion is read, not only its tail.

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

NUMBER = re.compile(r"(?:(?<![0-9A-Za-z.)\]}])-)?(?<![\d.])(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?")
FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*([\d.]+)\s*\}")
DECORATION = re.compile(r"\\[$%!,]|[$%*_`]")
GROUP_SEPARATOR = re.compile(r"(?<=\d)(?:,|\{,\}| )(?=\d{3}(?!\d))")
HASHES = re.compile(r"####")
ANSWER_OPEN, ANSWER_CLOSE = re.compile(r"<answer>", re.I), re.compile(r"</answer>", re.I)
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def clean(text: str) -> str:
    """The text with what decorates a number removed (see the module docstring).

    >>> clean("**$1,000**, \\\\frac{3}{4} and 12%")
    '1000, 3/4 and 12'
    """
    text = FRAC.sub(r"\1/\2", text.replace("\u2212", "-"))
    return GROUP_SEPARATOR.sub("", DECORATION.sub("", text))


def numbers(text: str) -> list[str]:
    """Every number in `text`, in order, as written once cleaned.

    >>> numbers("48/2 = <<48/2=24>>24 clips; 5-3 = 2, total -7.5")
    ['48/2', '48/2', '24', '24', '5', '3', '2', '-7.5']
    """
    return NUMBER.findall(clean(text))


def _first_number(text: str) -> str | None:
    match = NUMBER.search(clean(text))
    return match.group(0) if match else None


def _brace_body(text: str, start: int) -> str:
    """Content of the brace group whose '{' ends just before text[start]; unclosed: to the end."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    match = None
    for match in pattern.finditer(text):
        pass
    return match


def extract_answer(text: str) -> str | None:
    """The strict answer, cleaned (e.g. '1000' from '#### $1,000'), or None without a marked number.

    >>> extract_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\\n#### 72")
    '72'
    >>> extract_answer("<answer> 7 </answer>\\n\\nUser: and now? #### 9")
    '9'
    >>> extract_answer("#### 72\\n\\nUser: what about 13?") is None, extract_answer("no marker 12") is None
    (False, True)
    """
    if not isinstance(text, str):
        return None
    candidates = []  # (marker position, number)
    if hashes := _last(HASHES, text):
        candidates.append((hashes.start(), _first_number(text[hashes.end():].lstrip().split("\n\n")[0])))
    if opening := _last(ANSWER_OPEN, text):
        closing = ANSWER_CLOSE.search(text, opening.end())
        candidates.append((opening.start(), _first_number(text[opening.end():closing.start() if closing else None])))
    if box := _last(BOXED, text):
        candidates.append((box.start(), _first_number(_brace_body(text, box.end()))))
    held = [c for c in candidates if c[1] is not None]
    return max(held)[1] if held else None


def extract_lenient(text: str) -> str | None:
    """The last number anywhere in the text, or None."""
    found = numbers(text) if isinstance(text, str) else []
    return found[-1] if found else None


def to_number(text: str | None) -> Fraction | None:
    """Exact value of '72', '72.00', '-3.5', '3/4', '$1,000'; None when it is not one number.

    >>> to_number("$1,000.50"), to_number("3/4"), to_number("72 apples")
    (Fraction(2001, 2), Fraction(3, 4), None)
    """
    match = NUMBER.fullmatch(clean(str(text)).strip().rstrip(".")) if text is not None else None
    if match is None:
        return None
    num, _, den = match.group(0).partition("/")
    try:
        return Fraction(num) / Fraction(den or 1)
    except (ValueError, ZeroDivisionError):  # a zero denominator, or digits beyond int()'s limit
        return None


def gold_value(ground_truth) -> Fraction | None:
    """Gold is a bare number ('1,000') or a whole GSM8K answer ending in '#### 1,000'."""
    text = str(ground_truth)
    value = to_number(text)
    return value if value is not None else to_number(extract_answer(text))


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """verl's reward signature; score 1.0 for a strict-correct answer, else 0.0."""
    gold = gold_value(ground_truth)
    pred, last = extract_answer(solution_str), extract_lenient(solution_str)
    acc = gold is not None and to_number(pred) == gold
    lenient = acc or (gold is not None and to_number(last) == gold)
    # floats, not bools: verl averages every numeric key of this dict into its metrics
    return {"score": float(acc), "acc": float(acc), "lenient_acc": float(lenient),
            "format_ok": float(pred is not None), "pred": pred}
