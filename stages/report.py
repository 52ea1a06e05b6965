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
    """One PNG per metric key, value against `step` (headless, Agg), axes per `step_axes`; returns the files
    written (`<prefix>_<key>.png`, any character outside [A-Za-z0-9_.-] of the key as `_`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r["step"])
    paths = []
    for key, label in series.items():
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o")
        ax.set(xlabel="step", ylabel=label, title=f"{prefix}: {label}")
        step_axes(ax, [y for _, y in points])
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def step_axes(ax, values: list[float]) -> None:
    """Steps are whole numbers: integer ticks only. A flat curve at v gets the y-range 0..2v (0..1 for v = 0),
    not matplotlib's v-0.05..v+0.05 (an all-zero accuracy drawn around -0.04..0.04); a curve never below 0 is
    not drawn with a negative axis.

    >>> import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    >>> ax = plt.subplots()[1]; _ = ax.plot([1, 2, 3], [0, 0, 0]); step_axes(ax, [0, 0, 0])
    >>> tuple(map(float, ax.get_ylim()))
    (0.0, 1.0)
    """
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not values:
        return
    low, high = min(values), max(values)
    if low == high:
        ax.set_ylim(*sorted((0.0, 2.0 * low)) if low else (0.0, 1.0))
    elif low >= 0 and ax.get_ylim()[0] < 0:
        ax.set_ylim(bottom=0.0)


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
