"""MATH / MATH-500 grader: the answer is the content of the last complete `\\boxed{}` (or `\\fbox{}`).

Extraction: the box that opens last among those whose braces close (nested braces counted); a box
cut off by the length limit is skipped; an empty box is no answer (pred None). Gold may be a bare answer
(MATH-500's `answer`) or a full solution holding `\\boxed{}` (MATH's `solution`): the same rule reads
both, and text without a box is taken whole.
Strict: the normalized strings are equal (spaces, `\\left`/`\\right`, `\\! \\, \\; \\:`, `$`, `%`, a
trailing period, `\\text{…}` units after a value, `^\\circ`, `x =` dropped; `\\dfrac`/`\\tfrac` read as
`\\frac`), or math-verify's `parse` + `verify` says they are equal. math-verify times out through
`signal.alarm`, which only works in a main thread, and verl calls `compute_score` from a thread pool:
off the main thread it runs in helper subprocesses (up to min(4, CPUs), started on first need; each
question takes an idle one, so a trivial answer does not queue behind a slow one), a hung one killed and
restarted. When math-verify is missing, raises, or times out, the string comparison alone decides.
Lenient: strict, or the last number in the completion equals the gold answer as a number.
`format_ok`: a non-empty boxed answer exists.

>>> compute_score("math", "so $x = \\\\boxed{\\\\frac{1}{2}}$.", "\\\\frac12")["acc"]
1.0
>>> extract_answer("\\\\boxed{1} or rather \\\\boxed{\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)}")
'\\\\left( 3, \\\\frac{\\\\pi}{2} \\\\right)'
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

from rewards.gsm8k import extract_lenient, to_number

BOX_OR_BRACE = re.compile(r"\\(?:boxed|fbox)\s*\{|\{|\}")
UNIT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?\s*$")  # `10\text{ cm}^2`
TIMEOUT_S = 3  # math-verify's own limit per parse and per comparison (whole seconds: signal.alarm)
HARD_LIMIT_S = 30  # the helper subprocess is killed when a verdict takes longer than this
STARTUP_S = 60  # allowed on top for its first verdict: python, sympy and math-verify to import
MAX_CHARS = 1000  # longer "answers" are not MATH answers; sympy could spend minutes on them


def extract_answer(text: str) -> str | None:
    """Content of the last complete \\boxed{...}, stripped ('' for an empty box); None when no box closes.

    >>> extract_answer("\\\\boxed{2} wait: \\\\fbox{\\\\frac{1}{2}}"), extract_answer("\\\\boxed{3} then \\\\boxed{4")
    ('\\\\frac{1}{2}', '3')
    """
    if not isinstance(text, str):
        return None
    stack: list[int | None] = []  # per open brace: where its box's content starts (None: a plain brace)
    last: tuple[int, int] | None = None
    for match in BOX_OR_BRACE.finditer(text):
        if match.group() != "}":
            stack.append(match.end() if match.group() != "{" else None)
        elif stack and (start := stack.pop()) is not None and (last is None or start > last[0]):
            last = (start, match.start())
    return text[last[0]:last[1]].strip() if last else None


def normalize(answer: str) -> str:
    r"""The answer with notation that does not change its value removed.

    >>> normalize("x = \\left( \\dfrac{1}{2}, 30^\\circ \\right)."), normalize("10\\text{ cm}^2")
    ('(\\frac{1}{2},30)', '10')
    """
    s = re.sub(r"\\(?:left|right|[!,;:])|\\?[$%]|°|\^\s*\{?\\circ\}?", "", answer.strip())
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if (unit := UNIT.search(s)) and s[:unit.start()].strip():
        s = s[:unit.start()]
    s = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"^[A-Za-z]\s*=(?!=)", "", s.strip())
    return re.sub(r"\s+", "", s).rstrip(".")


def math_verify_here(gold: str, pred: str) -> bool | None:
    """math-verify's verdict in this thread (which must be a main thread), or None when it has none."""
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        return None
    try:
        gold_p, pred_p = parse(f"${gold}$", parsing_timeout=TIMEOUT_S), parse(f"${pred}$", parsing_timeout=TIMEOUT_S)
        return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=TIMEOUT_S))
    except (Exception, TimeoutException):
        return None


def serve() -> None:
    """The helper subprocess: one JSON [gold, pred] per input line, one verdict per output line."""
    out, sys.stdout = sys.stdout, sys.stderr  # nothing math-verify prints can be taken for a verdict
    for line in sys.stdin:
        print(json.dumps(math_verify_here(*json.loads(line))), file=out, flush=True)


class Helper:
    """math-verify in a subprocess, for callers off the main thread; one question at a time."""

    def __init__(self):
        self.lock, self.proc = threading.Lock(), None

    def ask(self, gold: str, pred: str) -> bool | None:
        with self.lock:
            try:
                limit = HARD_LIMIT_S
                if self.proc is None or self.proc.poll() is not None:
                    self.start()
                    limit += STARTUP_S
                self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
                self.proc.stdin.flush()
                if not select.select([self.proc.stdout], [], [], limit)[0]:
                    raise TimeoutError(f"math-verify gave no verdict in {limit} s")
                return json.loads(self.proc.stdout.readline())
            except Exception:  # hung, died or never started: the next question gets a fresh one
                self.close()
                return None

    def start(self) -> None:
        root = str(Path(__file__).resolve().parents[1])  # the child imports this very file
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-c", "import rewards.math as m; m.serve()"],
                                     env={**os.environ, "PYTHONPATH": path}, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Pool:
    """Up to `size` helpers, made on first need; each question takes an idle one, so a quick comparison
    never waits behind a slow one while fewer than `size` are busy (then it waits for the first freed)."""

    def __init__(self, size: int, make=Helper):
        self.size, self.make = size, make
        self.idle: list = []
        self.made: list = []
        self.freed = threading.Condition()

    def ask(self, gold: str, pred: str) -> bool | None:
        with self.freed:
            while not self.idle and len(self.made) >= self.size:
                self.freed.wait()
            if self.idle:
                helper = self.idle.pop()
            else:
                helper = self.make()
                self.made.append(helper)
        try:
            return helper.ask(gold, pred)
        finally:
            with self.freed:
                self.idle.append(helper)
                self.freed.notify()

    def close(self) -> None:
        with self.freed:
            for helper in self.made:
                helper.close()


HELPERS = Pool(min(4, os.cpu_count() or 1))
atexit.register(HELPERS.close)


@lru_cache(maxsize=65536)  # GRPO grades many identical answers to one problem
def math_verify_equal(gold: str, pred: str) -> bool | None:
    if len(gold) > MAX_CHARS or len(pred) > MAX_CHARS:
        return None
    if threading.current_thread() is threading.main_thread():
        return math_verify_here(gold, pred)
    return HELPERS.ask(gold, pred)


def is_equal(pred: str, gold: str) -> bool:
    if not normalize(gold):
        return False
    return normalize(pred) == normalize(gold) or math_verify_equal(gold, pred) is True


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """verl's reward signature; score 1.0 for a strict-correct answer, else 0.0."""
    gold = extract_answer(str(ground_truth)) or str(ground_truth).strip()
    pred = extract_answer(solution_str) or None  # an empty box is no answer
    acc = pred is not None and is_equal(pred, gold)
    gold_value = to_number(gold)
    lenient = acc or (gold_value is not None and to_number(extract_lenient(solution_str)) == gold_value)
    return {"score": float(acc), "acc": float(acc), "lenient_acc": float(lenient),
            "format_ok": float(pred is not None), "pred": pred}
