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
(`*` but a product's, `_`, backticks), LaTeX `\\$ \\% \\! \\,`, and `,`, `{,}` or spaces between thousands
groups; `\\frac{3}{4}` reads as `3/4`, a Unicode minus as `-`, and `-` is a sign only where it does not
follow a digit, letter or bracket (`5-3` is 5 and 3). Numbers compare by exact value: `72.00`,
`72.`, `$72`, `**72**` equal 72; `1,000` equals 1000; a fraction compares by value (`3/4` == 0.75);
numbers past `int()`'s 4,300 digits compare too, up to MAX_DIGITS (20,000) digits, beyond which they
have no value.
The whole completion is read, not only its tail.

The marked number must stand alone. A `-` opening the marked answer is its sign (`#### - 3` is -3).
Two notations are read as their value: a mixed number (`3 1/2`, `3\\frac{1}{2}`: 7/2; an improper one
such as `3 5/2` has no value) and scientific notation (`1e3`: 1000). A number that something else
continues is no answer from that marker (it holds no number, as if empty): an exponent or a product
(`2^10`, `2**10`, `3 * 4`, `3×4`, `2\\times 10`, `3 x 4`), an operation on another number (`48 + 24 = 72`,
`5 - 3`, `1/2/3`), hex or dimensions (`0x10`, `3x4`), a thousands group or decimal that does not parse
(`12,34`, `1,0000`, `1.2.3`), a broken exponent (`1e3.5`). Reading those as their first digits would
score `#### 2^10` correct against 2. A list is not a continuation: `#### 2, 3 and 4` is 2. The lenient
answer reads plain numbers only (in `1e3` it sees 1 and 3).

>>> compute_score("gsm8k", "48 + 24 = 72\\n#### 72", "72")["score"]
1.0
>>> compute_score("gsm8k", "<think>...</think> <answer>$1,000.00", "1000")["acc"]
1.0
>>> r = compute_score("gsm8k", "so the answer is 72", "72"); (r["acc"], r["lenient_acc"], r["format_ok"])
(0.0, 1.0, 0.0)
>>> [extract_answer(f"#### {a}") for a in ("- 3", "3 1/2", "3\\\\frac{1}{2}", "1e3", "2^10", "12,34", "0x10")]
['-3', '3 1/2', '3 1/2', '1e3', None, None, None]
>>> [to_number(a) for a in ("3 1/2", "1e3", "3 5/2")]
[Fraction(7, 2), Fraction(1000, 1), None]
"""
from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"(?:(?<![0-9A-Za-z.)\]}])-)?(?<![\d.])(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?")
# a marked answer: NUMBER, or a mixed number, or scientific notation (the names feed to_number)
ANSWER = re.compile(r"(?P<sign>-)?(?:(?P<whole>\d+) +(?P<num>\d+)/(?P<den>\d+)(?![\d.])"
                    r"|(?P<dec>\d+(?:\.\d+)?|\.\d+)(?:[eE](?P<exp>[+-]?\d+)(?![\d.])|/(?P<over>\d+(?:\.\d+)?))?)")
# what, right after a marked answer, makes it part of something larger (see the module docstring)
CONTINUED = re.compile(r"[ \t]*(?:[\^*×·÷]|\\times|\\cdot|\\div)|[ \t]*[-+=/][ \t]*[\d.(]|[ \t]+[xX][ \t]+[\d.(]"
                       r"|[xX][\dA-Fa-f]|[.,]\d|[eE][+-]?\d")
LEADING_SIGN = re.compile(r"^\s*-[ \t]+(?=\.?\d)")
FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*([\d.]+)\s*\}")
DECORATION = re.compile(r"\\[$%!,]|[$%_`]")
STARS = re.compile(r"(?<=\d)([ \t]*\*+[ \t]*)(?=\d)|\*+")  # group 1: a product's star, which stays
GROUP_SEPARATOR = re.compile(r"(?<=\d)(?:,|\{,\}| )(?=\d{3}(?!\d))")
HASHES = re.compile(r"####")
ANSWER_OPEN, ANSWER_CLOSE = re.compile(r"<answer>", re.I), re.compile(r"</answer>", re.I)
BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
MAX_DIGITS = 20_000  # longer numbers (exponent included) have no value: no answer is that long


def clean(text: str) -> str:
    """The text with what decorates a number removed (see the module docstring).

    >>> clean("**$1,000**, \\\\frac{3}{4}, 2\\\\frac{1}{2} and 12% of 3*4")
    '1000, 3/4, 2 1/2 and 12 of 3*4'
    """
    text = FRAC.sub(lambda m: (" " if m.string[m.start() - 1:m.start()].isdigit() else "") + f"{m[1]}/{m[2]}",
                    text.replace("\u2212", "-"))
    text = STARS.sub(lambda m: m[1] or "", DECORATION.sub("", text))
    return GROUP_SEPARATOR.sub("", text)


def numbers(text: str) -> list[str]:
    """Every number in `text`, in order, as written once cleaned.

    >>> numbers("48/2 = <<48/2=24>>24 clips; 5-3 = 2, total -7.5")
    ['48/2', '48/2', '24', '24', '5', '3', '2', '-7.5']
    """
    return NUMBER.findall(clean(text))


def _marked_number(text: str) -> str | None:
    """The first number in a marker's text, if it stands alone (see the module docstring)."""
    text = LEADING_SIGN.sub("-", clean(text), count=1)
    first = NUMBER.search(text)
    if first is None:
        return None
    answer = ANSWER.match(text, first.start())
    return None if CONTINUED.match(text, answer.end()) else answer.group(0)


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
        candidates.append((hashes.start(), _marked_number(text[hashes.end():].lstrip().split("\n\n")[0])))
    if opening := _last(ANSWER_OPEN, text):
        closing = ANSWER_CLOSE.search(text, opening.end())
        candidates.append((opening.start(), _marked_number(text[opening.end():closing.start() if closing else None])))
    if box := _last(BOXED, text):
        candidates.append((box.start(), _marked_number(_brace_body(text, box.end()))))
    held = [c for c in candidates if c[1] is not None]
    return max(held)[1] if held else None


def extract_lenient(text: str) -> str | None:
    """The last number anywhere in the text, or None."""
    found = numbers(text) if isinstance(text, str) else []
    return found[-1] if found else None


def _int(digits: str) -> int | None:
    """int(digits) past int()'s own limit on digits (sys.get_int_max_str_digits), up to MAX_DIGITS."""
    if len(digits) > MAX_DIGITS:
        return None
    value = 0
    for i in range(0, len(digits), 600):  # 640 is the least limit Python lets anyone set
        value = value * 10 ** len(digits[i:i + 600]) + int(digits[i:i + 600])
    return value


def _decimal(text: str) -> Fraction | None:
    whole, _, decimals = text.partition(".")
    value = _int(whole + decimals)
    return None if value is None else Fraction(value, 10 ** len(decimals))


def to_number(text: str | None) -> Fraction | None:
    """Exact value of '72', '72.00', '-3.5', '3/4', '$1,000', '3 1/2', '1e3'; None when it is not one number.

    >>> to_number("$1,000.50"), to_number("3/4"), to_number("72 apples"), to_number("5/0")
    (Fraction(2001, 2), Fraction(3, 4), None, None)
    """
    match = ANSWER.fullmatch(clean(str(text)).strip().rstrip(".")) if text is not None else None
    if match is None:
        return None
    if match["whole"]:
        whole, num, den = _int(match["whole"]), _int(match["num"]), _int(match["den"])
        if None in (whole, num, den) or num >= den:  # `3 5/2` is no mixed number; this also rules out /0
            return None
        value = whole + Fraction(num, den)
    else:
        value = _decimal(match["dec"])
        if value is not None and match["exp"]:
            exp = int(match["exp"]) if len(match["exp"]) < 7 else MAX_DIGITS + 1
            value = value * Fraction(10) ** exp if abs(exp) + len(match["dec"]) <= MAX_DIGITS else None
        if value is not None and match["over"]:
            over = _decimal(match["over"])
            value = value / over if over else None
    return -value if value is not None and match["sign"] else value


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
