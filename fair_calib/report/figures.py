"""Figures of a sweep (PNG, matplotlib Agg): diagnostics per method, ablation bars, probe-budget curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fair_calib.report.cells import Cell
from fair_calib.report.collect import RunRecord
from fair_calib.report.tables import Table, models, number


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def diagnostics_figure(tables: Sequence[Table], path: Path) -> Path | None:
    """One row of panels per model: a bar per method for flip rate, post-commit mismatch and lag."""
    wanted = ("flip rate", "post-commit mismatch", "lag (steps)")
    tables = [t for t in tables if t.rows and any(w in t.header for w in wanted)]
    if not tables:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(tables), len(wanted), figsize=(4.2 * len(wanted), 3.0 * len(tables)), squeeze=False)
    for i, table in enumerate(tables):
        labels = [label for label, _ in table.rows]
        for j, name in enumerate(wanted):
            ax = axes[i][j]
            if name in table.header:
                k = table.header.index(name) - 1
                vals = [number(vals[k]) or 0.0 for _, vals in table.rows]
                ax.bar(range(len(labels)), vals, color="tab:blue")
                ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"{table.title.split(':')[0]}: {name}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_figure(tables: Sequence[Table], path: Path, ylabel: str = "average accuracy (%)") -> Path | None:
    """Average accuracy per ablation row, one panel per model."""
    tables = [t for t in tables if t.rows]
    if not tables:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(5.0 * len(tables), 3.4), squeeze=False)
    for ax, table in zip(axes[0], tables):
        labels = [label for label, _ in table.rows]
        cells = table.column("Avg")
        vals = [number(c) or 0.0 for c in cells]
        err = [[v - c.low if isinstance(c, Cell) and c.low is not None else 0.0 for v, c in zip(vals, cells)],
               [c.high - v if isinstance(c, Cell) and c.high is not None else 0.0 for v, c in zip(vals, cells)]]
        ax.bar(range(len(labels)), vals, color="tab:orange", yerr=err, capsize=3, ecolor="0.3")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
        if vals:
            lo, hi = min(v - e for v, e in zip(vals, err[0])), max(v + e for v, e in zip(vals, err[1]))
            ax.set_ylim(max(0.0, lo - 2 * (hi - lo + 1)), hi + (hi - lo + 1))
        ax.set_ylabel(ylabel)
        ax.set_title(table.title.split(":")[0], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_budget_figure(records: Sequence[RunRecord], path: Path) -> Path | None:
    """quant/avg against n_probe (log2 axis), one line per model."""
    pts = [r for r in records if r.ok and r.n_probe is not None and "quant/avg" in r.summary]
    if len({r.n_probe for r in pts}) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for model in models(pts):
        xy = sorted({r.n_probe: 100 * r.summary["quant/avg"] for r in pts if r.model == model}.items())
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n_probe (teacher rollouts)")
    ax.set_ylabel("average accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
