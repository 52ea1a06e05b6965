"""`./train.sh --stage sweep`: train and evaluate once per data size and/or learning rate, one table.

    ./train.sh --stage sweep --train_size 128,256,512,1024,full
    ./train.sh --stage sweep --lr 5e-6,1e-5,2e-5 --train_size 512

`--train_size` and `--lr` take comma lists here (config.yaml's `sweep.train_sizes` / `sweep.lrs`).
Each point is a full SFT run plus a greedy eval in `outputs/<run>/sweep/<tag>/{data,sft,eval}`;
a finished point (its eval/metrics.json exists) is not run again, so a killed sweep resumes.
Results: `outputs/<run>/sweep/results.md` + `results.csv` and `sweep.png` (accuracy against size,
one line per learning rate), plus a section in the run's report.md.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from stages import chain
from stages.config import stage_dir

COLUMNS = ["train_size", "epochs", "lr", "accuracy", "lenient_accuracy", "format_accuracy",
           "trunc_rate", "avg_gen_len"]


def points(train_sizes, lrs, cfg) -> list[tuple]:
    """(train_size or None for all, lr) for every pair of the comma lists (default: data.train_size, sft.lr)."""
    sizes = [s.strip() for s in str(train_sizes or cfg.data.train_size or "full").split(",")]
    rates = [r.strip() for r in str(lrs or cfg.sft.lr).split(",")]
    return [(None if s in ("full", "None", "null") else int(s), float(r)) for s in sizes for r in rates]


def run(cfg) -> int:
    root = stage_dir(cfg, "sweep")
    rows = []
    for size, lr in points(cfg.sweep.train_sizes, cfg.sweep.lrs, cfg):
        tag = f"size-{size or 'full'}_lr-{lr:g}"
        point = copy.deepcopy(cfg)
        point.run.output_dir, point.run.name = str(root), tag
        point.data.train_size, point.sft.lr = size, lr
        metrics_file = stage_dir(point, "eval") / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
        else:
            print(f"[sweep] {tag}: SFT then eval")
            metrics = chain.train_then_evaluate(point)
            if isinstance(metrics, int):
                return metrics
        rows.append({"train_size": size or "full", "epochs": point.sft.epochs, "lr": lr,
                     **{k: metrics.get(k) for k in COLUMNS[3:]}})
    write_results(root, rows)
    return 0


def write_results(root: Path, rows: list[dict]) -> None:
    import pandas as pd

    table = pd.DataFrame(rows, columns=COLUMNS)
    table.to_csv(root / "results.csv", index=False)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    md = "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
                   + ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows])
    (root / "results.md").write_text(md + "\n")
    print(md)
    figure = plot(table, root / "sweep.png")
    try:
        from stages.report import add_section

        add_section(root.parent, "sweep", "Data / learning-rate sweep", md, [figure])
    except ImportError:
        pass


def plot(table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for lr, group in table.groupby("lr"):
        x = [str(s) for s in group["train_size"]]
        ax.plot(x, group["accuracy"], marker="o", label=f"lr {lr:g}")
    ax.set_xlabel("training examples")
    ax.set_ylabel("strict accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

