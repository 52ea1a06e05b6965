"""The grader: labelled completions (one behaviour each), a fuzz that it never raises, GSM8K references."""
import doctest
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards
from rewards import compute_score, gsm8k
from rewards import math as math_grader

G = "openai/gsm8k"
# (id, completion, gold, acc, lenient_acc, format_ok, pred); lenient_acc is strict OR last number right
GSM8K_CASES = [
    ("hashes", "48/2 = 24\n48+24 = 72\n#### 72", "72", 1, 1, 1, "72"),
    ("hashes-no-space", "####72", "72", 1, 1, 1, "72"),
    ("decimal-zeros", "#### 72.00", "72", 1, 1, 1, "72.00"),
    ("trailing-period", "The total is\n#### 72.", "72", 1, 1, 1, "72"),
    ("dollar-comma", "#### $1,000", "1000", 1, 1, 1, "1000"),
    ("gold-with-comma", "#### 1000", "1,000", 1, 1, 1, "1000"),
    ("percent", "#### 25%", "25", 1, 1, 1, "25"),
    ("bold", "#### **72**", "72", 1, 1, 1, "72"),
    ("negative", "#### -5", "-5", 1, 1, 1, "-5"),
    ("decimal", "#### 3.50", "3.5", 1, 1, 1, "3.50"),
    ("fraction-by-value", "#### 3/4", "0.75", 1, 1, 1, "3/4"),
    ("wrong-good-format", "#### 71", "72", 0, 0, 1, "71"),
    ("last-hashes-wins", "#### 72\n\nUser: next question?\n#### 13", "72", 0, 0, 1, "13"),
    ("hashes-then-prose", "#### 72\nI hope this helps! There were 3 steps.", "72", 1, 1, 1, "72"),
    ("answer-tag", "<think>48+24=72</think> <answer>72</answer>", "72", 1, 1, 1, "72"),
    ("answer-unclosed", "<think>48+24=72</think> <answer> 72", "72", 1, 1, 1, "72"),
    ("answer-unclosed-money", "<think>..</think> <answer>$1,000.00", "1000", 1, 1, 1, "1000.00"),
    ("answer-runon", "<answer>72</answer> Now another: 5+5=10", "72", 1, 1, 1, "72"),
    ("answer-empty", "<answer></answer> it is 72", "72", 0, 1, 0, None),
    ("answer-text-units", "<answer>72 clips</answer>", "72", 1, 1, 1, "72"),
    ("answer-case", "<ANSWER>72</ANSWER>", "72", 1, 1, 1, "72"),
    ("boxed", "So the answer is $\\boxed{72}$.", "72", 1, 1, 1, "72"),
    ("boxed-dollar", "\\boxed{\\$18}", "18", 1, 1, 1, "18"),
    ("boxed-unclosed", "\\boxed{72", "72", 1, 1, 1, "72"),
    ("boxed-after-hashes", "#### 10\nWait, recheck: \\boxed{12}", "12", 1, 1, 1, "12"),
    ("hashes-after-answer", "<answer>9</answer>\n#### 12", "12", 1, 1, 1, "12"),
    ("truncated", "Natalia sold 48/2 = 24 clips in May. Then 48 + 24 = 72", "72", 0, 1, 0, None),
    ("truncated-mid-number", "First, 48 + 2", "72", 0, 0, 0, None),
    ("calculator-notes", "48/2 = <<48/2=24>>24\n#### 24", "24", 1, 1, 1, "24"),
    ("calculator-lenient", "so 48+24=<<48+24=72>>", "72", 0, 0, 0, None),
    ("empty", "", "72", 0, 0, 0, None),
    ("no-number-after-hashes", "#### seventy-two", "72", 0, 0, 0, None),
    ("gold-is-full-solution", "#### 72", "48+24=<<48+24=72>>72\n#### 72", 1, 1, 1, "72"),
    ("space-thousands", "#### 1 000", "1000", 1, 1, 1, "1000"),
    ("leading-dot", "#### .5", "0.5", 1, 1, 1, ".5"),
    ("big", "#### 123,456,789", "123456789", 1, 1, 1, "123456789"),
    ("unicode", "答案 #### 72 ✓", "72", 1, 1, 1, "72"),
]


@pytest.mark.parametrize("case", GSM8K_CASES, ids=[c[0] for c in GSM8K_CASES])
def test_gsm8k_cases(case):
    _, text, gold, acc, lenient, fmt, pred = case
    out = compute_score(data_source=G, solution_str=text, ground_truth=gold, extra_info={"split": "test"})
    assert (out["acc"], out["lenient_acc"], out["format_ok"], out["pred"]) == (acc, lenient, fmt, pred)
    assert out["score"] == float(acc)


M = "HuggingFaceH4/MATH-500"
MATH_CASES = [
    ("boxed-int", "Thus \\boxed{2}.", "2", 1, 1),
    ("nested-frac", "$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", 1, 1),
    ("dfrac", "\\boxed{\\dfrac{1}{2}}", "\\frac12", 1, 1),
    ("decimal-vs-frac", "\\boxed{0.5}", "\\frac{1}{2}", 1, 1),
    ("tuple", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1, 1),
    ("interval", "\\boxed{[1,3)}", "[1,3)", 1, 1),
    ("wrong", "\\boxed{3}", "2", 0, 1),
    ("no-box", "the answer is 2", "2", 0, 0),
    ("last-box-wins", "\\boxed{1} no wait \\boxed{2}", "2", 1, 1),
    ("gold-is-solution", "\\boxed{5}", "So we get $\\boxed{5}$.", 1, 1),
    ("fbox", "\\fbox{7}", "7", 1, 1),
    ("degrees", "\\boxed{30^\\circ}", "30", 1, 1),
    ("text-unit", "\\boxed{10\\text{ cm}}", "10", 1, 1),
    ("unclosed-box", "\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0, 0),
]


@pytest.mark.parametrize("case", MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_math_cases(case):
    _, text, gold, acc, fmt = case
    out = compute_score(M, text, gold)
    assert (out["acc"], out["format_ok"]) == (acc, fmt)
    assert out["score"] == float(acc)


def test_math_string_fallback_without_math_verify(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import now fails
    assert compute_score("math", "\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")["acc"] == 1.0
    assert compute_score("math", "\\boxed{3}", "2")["acc"] == 0.0


def test_dispatch_and_keys():
    for source in ("openai/gsm8k", "gsm8k", "math", "DigitalLearningGmbH/MATH-lighteval", "math500"):
        assert tuple(compute_score(source, "x", "1")) == rewards.KEYS
    with pytest.raises(ValueError, match="no grader"):
        compute_score("squad", "x", "1")
    assert rewards.extract_answer("#### 1,234", "gsm8k") == "1234"
    assert rewards.extract_answer("\\boxed{x^2}", "math") == "x^2"


def test_docstring_examples():
    for module in (rewards, gsm8k, math_grader):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


MARKERS = st.sampled_from(["####", "<answer>", "</answer>", "\\boxed{", "\\fbox{", "{", "}", "$", ",",
                           "<<", ">>", "**", "-", ".", "/", "/0", "\n\n", " ", "1,000", "72", "0"])


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.lists(st.one_of(MARKERS, st.text(max_size=5))).map("".join)),
       gold=st.one_of(st.sampled_from(["72", "1,000", "-3.5", "\\frac{1}{2}", "", "#### 7"]), st.text(max_size=8)),
       source=st.sampled_from(["openai/gsm8k", "math"]))
def test_never_raises(text, gold, source):
    # the graders themselves, not the catch-all in rewards.compute_score
    out = rewards.grader(source).compute_score(source, text, gold)
    assert tuple(out) == rewards.KEYS
    assert 0.0 <= out["score"] <= 1.0
    assert out["pred"] is None or isinstance(out["pred"], str)


@pytest.mark.parametrize("bad", [None, 12, b"#### 3"])
def test_non_string_completion(bad):
    assert compute_score(G, bad, "3")["score"] == 0.0


@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_gsm8k_references_all_strict_correct(gsm8k_dir, split, count):
    n = right = 0
    with open(gsm8k_dir / f"{split}.jsonl") as f:
        for line in f:
            row = json.loads(line)
            gold = gsm8k.extract_answer(row["answer"])
            out = compute_score(G, re.sub(r"<<[^>]*>>", "", row["answer"]), gold)
            n, right = n + 1, right + out["acc"]
    assert (n, right) == (count, count)
