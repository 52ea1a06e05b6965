"""outputs/<run>/report.md, assembled from sections that stages write, plus their plots.

A stage calls `add_section(run_dir, key, title, markdown, figures)`; the section is kept as its own
file, `outputs/<run>/report/<order>-<key>.md`, and report.md is rebuilt from all of them, so a rerun
replaces its section instead of appending a copy. Order: the stage table's (stages/registry.py: sft, eval,
ei, grpo, then the rest), or pass `order=`; keys such as `ei-round-2` sort after `ei`'s own. Figures live under
`outputs/<run>/report/figures/` and are embedded by relative path, so the folder can be moved whole.

    from stages import report
    figs = report.plot_vs_step(rows, {"accuracy": "strict accuracy"}, run / "report" / "figures", "grpo")
    report.add_section(run, "grpo", "GRPO", report.table(["step", "accuracy"], [[1, 0.3]]), figs)

`python -m stages.report outputs/<run>` rebuilds report.md from the section files.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from stages import registry

SECTION = re.compile(r"^(\d{3})-(.+)\.md$")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats to 4 decimals."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(metrics: dict, definitions: dict[str, str]) -> str:
    """One row per defined metric: name, value, what it means."""
    return table(["metric", "value", "definition"],
                 [[name, metrics.get(name, "n/a"), text] for name, text in definitions.items()])


def console(metrics: dict, keys: list[str], title: str) -> str:
    """A one-screen box of `keys` for the terminal."""
    rows = [f"{k:<18}{metrics.get(k)!s:>10}" if not isinstance(metrics.get(k), float) else f"{k:<18}{metrics[k]:>10.4f}"
            for k in keys]
    return "\n".join(["-" * 28, title, "-" * 28, *rows, "-" * 28])


def plot_vs_step(rows: list[dict], series: dict[str, str], folder: Path, prefix: str) -> list[Path]:
    """One PNG per metric key, value against `step` (headless, Agg); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["step"])
    paths = []
    for key, label in series.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], marker="o")
        ax.set(xlabel="step", ylabel=label, title=f"{prefix}: {label}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{prefix}_{key}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def add_section(run_dir: Path, key: str, title: str, markdown: str, figures=(), order: int | None = None) -> Path:
    """Write (or replace) the section `key` and rebuild report.md; returns report.md's path."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise ValueError(f"report section key {key!r}: use letters, digits, '-', '_' or '.'")
    run_dir = Path(run_dir)
    folder = run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"*-{key}.md"):
        if SECTION.match(old.name) and SECTION.match(old.name).group(2) == key:
            old.unlink()
    if order is None:
        order = registry.report_order(key)
    embeds = "".join(f"\n![{Path(f).stem}]({Path(os.path.relpath(Path(f).resolve(), run_dir.resolve())).as_posix()})\n"
                     for f in figures)
    (folder / f"{order:03d}-{key}.md").write_text(f"## {title}\n\n{markdown.strip()}\n{embeds}")
    return rebuild(run_dir)


def _position(path: Path) -> tuple:
    """(order, key) with digit runs compared as numbers: ei-round-2 before ei-round-10."""
    order, key = SECTION.match(path.name).groups()
    return int(order), [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key) if t]


def rebuild(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    parts = sorted((p for p in (run_dir / "report").glob("*.md") if SECTION.match(p.name)), key=_position)
    text = f"# {run_dir.name}\n\n" + "\n".join(p.read_text().rstrip() + "\n" for p in parts)
    path = run_dir / "report.md"
    path.write_text(text)
    return path


if __name__ == "__main__":
    print(rebuild(Path(sys.argv[1])))
