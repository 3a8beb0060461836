"""PNG plots of the diagnostics (matplotlib's Agg canvas, no global pyplot state, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_step_curves(rows: list[dict[str, float]], columns: dict[str, str], path: Path, title: str, ylabel: str,
                     log_y: bool = False) -> Path:
    """One line per `columns` key (column -> legend label) against `step`; NaN steps are gaps."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for col, label in columns.items():
        steps = [r["step"] for r in rows if col in r]
        vals = [r[col] for r in rows if col in r]
        ax.plot(steps, vals, marker=".", label=label)
    positive = [r[c] for r in rows for c in columns if c in r and isinstance(r[c], float) and r[c] > 0]
    if log_y and positive:
        ax.set_yscale("log")
    ax.set_xlabel("decoding step t")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lag_histograms(rows: list[dict[str, float]], names: dict[str, str], path: Path) -> Path:
    """Side-by-side bars of the share of positions at each stabilization lag, one bar group per lag value."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    lags = [r["lag"] for r in rows]
    for j, (name, label) in enumerate(names.items()):
        shares = [0.0 if math.isnan(r[f"share_{name}"]) else r[f"share_{name}"] for r in rows]
        ax.bar([v - 0.4 + width * (j + 0.5) for v in lags], shares, width=width, label=label)
    ax.axvline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("stabilization lag (steps; > 0 = top-1 still changing after commit)")
    ax.set_ylabel("share of committed positions")
    ax.set_title("Stabilization lag")
    ax.legend()
    return _save(fig, path)
