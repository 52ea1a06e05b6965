"""Ladder's graders against independent references: verl's own GSM8K scorer
(verl/utils/reward_score/gsm8k.py, strict method) and math-verify reading whole MATH completions.

Every hand-labelled case of tests/test_rewards.py is scored by both. Where they differ by design, the
tables below say so (case, ladder's verdict, the reference's verdict, why); any other disagreement fails,
and so does a listed difference that stops differing. The real reference solutions are where the
graders must agree: right against their own gold, wrong against another.
"""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from rewards import compute_score
from tests.test_rewards import G, GSM8K_CASES, M, MATH_CASES, math500

# ---- GSM8K: verl's strict scorer reads `#### ` + [-0-9.,]+ in the last 300 characters, commas dropped, and
# compares that string with the gold string
MARKERS = "verl reads only `#### N`; ladder also reads <answer> and \\boxed (the templates ask for them)"
NO_SPACE = "verl's pattern needs one space after ####"
VALUE = "verl compares strings (72.00 != 72, 3/4 != 0.75); ladder compares exact values"
DECORATED = "verl's number must follow `#### ` at once; ladder first drops $, %, **, `, {,}, group spaces"
PROSE = "verl needs the number right after `#### `; ladder takes the first number after it"
GOLD = "verl takes gold as its data prep writes it (bare, no commas); ladder also reads 1,000 or a whole solution"
FIRST_DIGITS = "verl grades a number's first digits (issue 17); ladder reads the whole notation or no answer"
ZERO_DENOMINATOR = "verl reads the 5 of 5/0; ladder reads the fraction, which has no value"
TAIL = "verl reads only the last 300 characters, inside this 5,001-digit number"
GSM8K_DIFFERENCES = [  # (case, ladder's acc, verl's score, why)
    ("hashes-no-space", 1, 0, NO_SPACE),
    ("decimal-zeros", 1, 0, VALUE),
    ("trailing-period", 1, 0, VALUE + "; verl keeps the period: '72.'"),
    ("dollar-comma", 1, 0, DECORATED),
    ("gold-with-comma", 1, 0, GOLD),
    ("latex-thousands", 1, 0, MARKERS),
    ("space-thousands", 1, 0, DECORATED + "; verl reads 1"),
    ("bold", 1, 0, DECORATED),
    ("code-span", 1, 0, DECORATED),
    ("unicode-minus", 1, 0, DECORATED + " (U+2212 minus)"),
    ("decimal", 1, 0, VALUE),
    ("leading-dot", 1, 0, VALUE),
    ("fraction-by-value", 1, 0, VALUE + "; verl reads 3"),
    ("latex-fraction", 1, 0, MARKERS),
    ("zero-denominator", 0, 1, ZERO_DENOMINATOR),
    ("hashes-first-number", 1, 0, PROSE),
    ("answer-tag", 1, 0, MARKERS),
    ("answer-unclosed", 1, 0, MARKERS),
    ("answer-unclosed-money", 1, 0, MARKERS),
    ("answer-unclosed-runon", 1, 0, MARKERS),
    ("answer-runon", 1, 0, MARKERS),
    ("answer-sentence", 1, 0, MARKERS),
    ("answer-text-units", 1, 0, MARKERS),
    ("answer-case", 1, 0, MARKERS),
    ("answer-after-hashes", 1, 0, MARKERS + "; verl grades the #### before it"),
    ("boxed", 1, 0, MARKERS),
    ("boxed-dollar", 1, 0, MARKERS),
    ("boxed-text", 1, 0, MARKERS),
    ("boxed-unclosed", 1, 0, MARKERS),
    ("boxed-after-hashes", 1, 0, MARKERS + "; verl grades the #### before it"),
    ("gold-is-full-solution", 1, 0, GOLD),
    ("answer-last-tag-wins", 1, 0, MARKERS),
    ("boxed-last-box-wins", 1, 0, MARKERS),
    ("sign-then-space", 1, 0, "verl's sign must touch the digits; ladder reads a sign opening the answer"),
    ("sign-then-space-answer-tag", 1, 0, MARKERS),
    ("scientific", 1, 0, FIRST_DIGITS + " (1e3 = 1000)"),
    ("scientific-not-its-mantissa", 0, 1, FIRST_DIGITS),
    ("scientific-broken-exponent", 0, 1, FIRST_DIGITS),
    ("scientific-negative-exponent", 1, 0, FIRST_DIGITS),
    ("mixed-number", 1, 0, FIRST_DIGITS + " (3 1/2 = 7/2)"),
    ("mixed-not-its-whole", 0, 1, FIRST_DIGITS),
    ("mixed-negative", 1, 0, FIRST_DIGITS),
    ("mixed-latex", 1, 0, MARKERS),
    ("power-not-its-base", 0, 1, FIRST_DIGITS),
    ("power-python", 0, 1, FIRST_DIGITS),
    ("product-spaced-star", 0, 1, FIRST_DIGITS),
    ("product-times", 0, 1, FIRST_DIGITS),
    ("product-x", 0, 1, FIRST_DIGITS),
    ("dimensions", 0, 1, FIRST_DIGITS),
    ("expression", 0, 1, FIRST_DIGITS),
    ("range", 0, 1, FIRST_DIGITS),
    ("hex", 0, 1, FIRST_DIGITS),
    ("not-plain-then-other-marker", 1, 0, MARKERS + "; verl grades the 2 of 2^10"),
    ("huge-equal", 1, 0, TAIL),
    ("huge-fraction", 1, 0, TAIL),
    ("huge-decimal", 1, 0, TAIL),
]


@pytest.fixture(scope="module")
def verl_gsm8k():
    """verl's scorer file, loaded alone: it imports only `re`, and importing the verl package takes seconds."""
    spec = importlib.util.find_spec("verl")
    if spec is None:
        pytest.skip("verl is not installed")
    path = Path(spec.origin).parent / "utils" / "reward_score" / "gsm8k.py"
    module_spec = importlib.util.spec_from_file_location("verl_reward_score_gsm8k", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_gsm8k_tables_name_real_cases():
    ids = {c[0] for c in GSM8K_CASES}
    listed = [d[0] for d in GSM8K_DIFFERENCES]
    assert len(set(listed)) == len(listed) and set(listed) <= ids
    assert all(d[1] != d[2] for d in GSM8K_DIFFERENCES)


@pytest.mark.parametrize("case", GSM8K_CASES, ids=[c[0] for c in GSM8K_CASES])
def test_gsm8k_cases_against_verl(case, verl_gsm8k):
    name, text, gold = case[:3]
    ladder = compute_score(G, text, gold)["acc"]
    reference = float(verl_gsm8k.compute_score(text, gold))
    expected = {d[0]: (d[1], d[2]) for d in GSM8K_DIFFERENCES}.get(name, (ladder, ladder))
    assert (ladder, reference) == expected, f"{name}: ladder {ladder}, verl {reference}"


def test_gsm8k_references_agree_with_verl(gsm8k_dir, verl_gsm8k):
    """Every test-split reference: both graders right against its gold and wrong against another number."""
    disagree = []
    for line in open(gsm8k_dir / "test.jsonl"):
        solution = re.sub(r"<<[^>]*>>", "", json.loads(line)["answer"])
        gold = solution.split("####")[-1].strip().replace(",", "")  # verl's own data prep keeps this string
        for candidate, right in ((gold, 1.0), (gold + "1", 0.0)):
            verdicts = (compute_score(G, solution, candidate)["acc"],
                        float(verl_gsm8k.compute_score(solution, candidate)))
            if verdicts != (right, right):
                disagree.append((gold, candidate, verdicts))
    assert disagree == []


# ---- MATH: math-verify's parse (its own extraction from the whole completion) + verify
BOX_NEEDED = "ladder's strict answer is a box (what the prompt asks for); math-verify falls back to the last number"
CUT_OFF = "ladder skips a box cut off by the length limit; math-verify reads it to the end of the text"
MATH_DIFFERENCES = [  # (case, ladder's acc, math-verify's verdict, why)
    ("percent", 1, 0, "ladder drops \\% as it drops units; math-verify gets no value from 10\\%"),
    ("no-box", 0, 1, BOX_NEEDED),
    ("no-box-frac-gold", 0, 1, BOX_NEEDED),
    ("last-box-wins", 1, 0, "math-verify reads two boxes as the set {1, 2}; ladder grades the last box"),
    ("fbox", 1, 0, "math-verify does not read \\fbox"),
    ("unclosed-box", 0, 1, CUT_OFF),
    ("cut-off-box-skipped", 1, 0, CUT_OFF),
]


@pytest.fixture(scope="module")
def math_verify():
    """Called in pytest's main thread, where math-verify's signal-based timeout works."""
    module = pytest.importorskip("math_verify")

    def verdict(text: str, gold: str) -> float:
        gold_parsed = module.parse(gold if "\\boxed" in gold or "$" in gold else f"${gold}$")
        pred = module.parse(text)
        return float(bool(gold_parsed and pred and module.verify(gold_parsed, pred)))

    return verdict


def test_math_tables_name_real_cases():
    listed = [d[0] for d in MATH_DIFFERENCES]
    assert len(set(listed)) == len(listed) and set(listed) <= {c[0] for c in MATH_CASES}
    assert all(d[1] != d[2] for d in MATH_DIFFERENCES)


@pytest.mark.parametrize("case", MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_math_cases_against_math_verify(case, math_verify):
    name, text, gold = case[:3]
    ladder, reference = compute_score(M, text, gold)["acc"], math_verify(text, gold)
    expected = {d[0]: (d[1], d[2]) for d in MATH_DIFFERENCES}.get(name, (ladder, ladder))
    assert (ladder, reference) == expected, f"{name}: ladder {ladder}, math-verify {reference}"


def test_math500_references_agree_with_math_verify(math_verify):
    """Every 10th MATH-500 reference solution (the whole set takes math-verify ~10 s): right against its own
    answer, wrong against the next problem's, by both graders."""
    rows = [json.loads(line) for line in math500().read_text().splitlines()]
    disagree = []
    for i in range(0, len(rows), 10):
        solution, other = rows[i]["solution"], rows[(i + 1) % len(rows)]["answer"]
        for gold, right in ((rows[i]["answer"], 1.0), (other, 0.0)):
            verdicts = (compute_score(M, solution, gold)["acc"], math_verify(solution, gold))
            if verdicts != (right, right):
                disagree.append((i, gold, verdicts))
    assert disagree == []
