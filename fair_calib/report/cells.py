"""The statistics behind a table row: a method's per-document scores over its seeds, and what they give.

A `Row` holds, for one table row (a method, or an ablation setting, of one model), one `Seeded` entry
per task: the per-seed metric values and, when the runs recorded them, the per-document scores as a
seeds x documents matrix. From these `fair_calib.stats` computes each cell's mean and 95% bootstrap CI
(documents, and seeds when there are several), the average's, the paired difference against a
reference row on the same documents, and the minimum detectable difference (80% power) of that pair.

Two rows can be paired only when they scored the same documents of every task; when they did not
(different `benchmark.n`, a different benchmark) `Unpairable` says which task and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fair_calib import stats
from fair_calib.registry import ConfigError

N_RESAMPLES = 2000


class Unpairable(ConfigError):
    """Two rows of a table did not score the same documents, so they cannot be compared pairwise."""


@dataclass
class Seeded:
    """One task of one row: the metric of each seed, and its per-document scores (None if not recorded)."""

    values: dict[int, float] = field(default_factory=dict)  # seed -> task metric
    docs: dict[int, list[float]] = field(default_factory=dict)  # seed -> per-document scores

    def matrix(self) -> np.ndarray | None:
        """(n_seeds, n_docs) in seed order; None unless every seed has per-document scores of one length."""
        if not self.values or set(self.docs) != set(self.values):
            return None
        lengths = {len(v) for v in self.docs.values()}
        if len(lengths) != 1 or 0 in lengths:
            return None
        return np.asarray([self.docs[s] for s in sorted(self.docs)], dtype=np.float64)

    def mean(self) -> float:
        return float(np.mean([self.values[s] for s in sorted(self.values)]))


@dataclass(frozen=True)
class Cell:
    """A table cell: the mean, its CI (None without per-document scores), the sd over seeds and their number."""

    mean: float
    low: float | None = None
    high: float | None = None
    sd: float | None = None
    n_seeds: int = 1

    def scaled(self, k: float) -> Cell:
        f = lambda v: None if v is None else k * v  # noqa: E731
        return Cell(k * self.mean, f(self.low), f(self.high), f(self.sd), self.n_seeds)


@dataclass
class Row:
    label: str
    tasks: dict[str, Seeded] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted({s for t in self.tasks.values() for s in t.values})

    def cell(self, task: str) -> Cell | None:
        entry = self.tasks.get(task)
        if entry is None or not entry.values:
            return None
        x = entry.matrix()
        if x is None:
            values = [entry.values[s] for s in sorted(entry.values)]
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
            return Cell(entry.mean(), sd=sd, n_seeds=len(values))
        return _cell(stats.bootstrap_ci(x, n_resamples=N_RESAMPLES))

    def average(self, tasks: Sequence[str]) -> Cell | None:
        """The mean over `tasks` of the task means, with a CI when every task has per-document scores
        of the same seeds; None when a task is missing (a partial average is never shown)."""
        entries = [self.tasks.get(t) for t in tasks]
        if not tasks or any(e is None or not e.values for e in entries):
            return None
        seeds = {tuple(sorted(e.values)) for e in entries}
        mats = [e.matrix() for e in entries]
        if len(seeds) == 1 and all(m is not None for m in mats):
            return _cell(stats.bootstrap_ci_mean_of_means(mats, n_resamples=N_RESAMPLES))
        per_seed = [np.mean([e.values[s] for e in entries]) for s in sorted(seeds.pop())] if len(seeds) == 1 else []
        mean = float(np.mean([e.mean() for e in entries]))
        sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
        return Cell(mean, sd=sd, n_seeds=len(per_seed) or 1)

    def matrices(self, tasks: Sequence[str]) -> list[np.ndarray] | None:
        mats = [self.tasks[t].matrix() if t in self.tasks else None for t in tasks]
        return None if not tasks or any(m is None for m in mats) else mats  # type: ignore[return-value]


def _cell(est: stats.Estimate) -> Cell:
    return Cell(est.mean, est.ci_low, est.ci_high, est.sd_seeds, est.n_seeds)


@dataclass(frozen=True)
class Comparison:
    """row - reference on the average over tasks: the paired difference and the pair's MDD (80% power)."""

    reference: str
    diff: stats.Difference
    mdd: float | None


def compare(row: Row, ref: Row, tasks: Sequence[str]) -> Comparison | None:
    """Paired bootstrap of the task average of `row` against `ref`; None without per-document scores.

    Raises Unpairable when the two rows scored different documents of a task."""
    a, b = row.matrices(tasks), ref.matrices(tasks)
    if a is None or b is None:
        return None
    for task, x, y in zip(tasks, a, b, strict=True):
        if x.shape[1] != y.shape[1]:
            raise Unpairable(
                f"cannot pair {row.label!r} with {ref.label!r} on {task}: {x.shape[1]} vs {y.shape[1]} documents; "
                "report runs made with the same benchmark settings (benchmark.n) together, or pick another "
                "reference with --reference")
    diff = stats.paired_bootstrap_mean_of_means(a, b, n_resamples=N_RESAMPLES)
    per_doc = [x.mean(axis=0) - y.mean(axis=0) for x, y in zip(a, b, strict=True)]  # seed-averaged, per document
    mdd = stats.mdd_mean_of_means(per_doc) if all(d.size > 1 for d in per_doc) else None
    return Comparison(ref.label, diff, mdd)
