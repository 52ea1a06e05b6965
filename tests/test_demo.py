"""The README's first command (`make demo` → `./train.sh --stage demo`) end to end on CPU."""
import json

import pytest

from stages.__main__ import main


@pytest.mark.slow
def test_demo_pipeline(tmp_path, gsm8k_dir):
    assert main(["--stage", "demo", f"run.output_dir={tmp_path}", "run.name=demo", "eval.limit=8"]) == 0
    summary = json.loads((tmp_path / "demo" / "demo" / "summary.json").read_text())
    assert summary["references"] == 7473 + 1319 and summary["strict_accuracy"] == 1.0
    assert summary["eval"]["n"] == 8
    manifest = json.loads((tmp_path / "demo" / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["global_step"] == 4
    assert (tmp_path / "demo" / "report.md").exists()
