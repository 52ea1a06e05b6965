"""The sweep's grid and its table/plot/report (the SFT and eval it calls are tested on their own)."""
from omegaconf import OmegaConf

from stages.sweep import points, write_results


def test_points_grid():
    cfg = OmegaConf.create({"data": {"train_size": None}, "sft": {"lr": 1e-5}})
    assert points("128,256,full", None, cfg) == [(128, 1e-5), (256, 1e-5), (None, 1e-5)]
    assert points(None, "5e-6,2e-5", cfg) == [(None, 5e-6), (None, 2e-5)]


def test_results_table_plot_and_report(tmp_path):
    root = tmp_path / "run" / "sweep"
    root.mkdir(parents=True)
    rows = [{"train_size": s, "epochs": 3, "lr": lr, "accuracy": a, "lenient_accuracy": a, "format_accuracy": 0.9,
             "trunc_rate": 0.01, "avg_gen_len": 120.0} for s, lr, a in [(128, 1e-5, 0.2), (256, 1e-5, 0.25), (128, 2e-5, 0.22)]]
    write_results(root, rows)
    md = (root / "results.md").read_text()
    assert md.count("\n") == 5 and "| 256 | 3 | 1e-05 | 0.25 |" in md
    assert (root / "sweep.png").stat().st_size > 1000
    assert "Data / learning-rate sweep" in (tmp_path / "run" / "report.md").read_text()
