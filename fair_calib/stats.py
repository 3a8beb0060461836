"""Uncertainty of the numbers in a table (DESIGN.md section 9): bootstrap CIs, paired differences, power.

Scores are per-document values on the same documents: a 1-D array (n_docs) for one run, or a 2-D
array (n_seeds, n_docs) whose rows are calibration seeds of one method. A cell's CI is a percentile
bootstrap over documents, and over seeds too when there are several (seed rows and document columns
are resampled independently, each with replacement). A difference between two methods is paired:
both are resampled at the same document indices, while their seed rows are resampled independently
(the calibration seeds of two methods are independent runs).

Resamples are drawn as index matrices and reduced with numpy's (pairwise) mean, so a seeded call is
reproducible bit-for-bit; 2000 resamples of 3 seeds x 500 documents take about 0.1 s on one loaded core
(experiments/perf/bootstrap_speed.py prints the figures), so a whole report costs seconds, not evaluation minutes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # gathered values held at once (32 MiB of float64)


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap CI; sd_seeds is the sd of the per-seed means (None for one seed)."""

    mean: float
    ci_low: float
    ci_high: float
    sd_seeds: float | None
    n_docs: int
    n_seeds: int


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) on the same documents, its paired-bootstrap CI and two-sided p-value."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n_docs: int
    significant: bool  # the CI excludes 0


# ---------------------------------------------------------------------------------------- checks
def _as_runs(scores: object, name: str) -> np.ndarray:
    """scores as a float64 (n_seeds, n_docs) array, or a ValueError saying what is wrong."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must be 1-D (documents) or 2-D (seeds x documents), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: need at least one seed and one document, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf: every document needs a finite score")
    return x


def _check_options(n_resamples: int, confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, e.g. 2000; got {n_resamples}")


def _as_tasks(tasks: Sequence[object], name: str) -> list[np.ndarray]:
    if len(tasks) == 0:
        raise ValueError(f"{name} has no tasks: need at least one")
    runs = [_as_runs(t, f"{name}[{i}]") for i, t in enumerate(tasks)]
    seeds = {r.shape[0] for r in runs}
    if len(seeds) != 1:
        raise ValueError(f"{name}: every task needs the same seeds (rows), got {sorted(seeds)} rows")
    return runs


def _check_paired(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    if len(a) != len(b):
        raise ValueError(f"a and b must cover the same tasks: a has {len(a)}, b has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape[1] != y.shape[1]:
            where = f"task {i}: " if len(a) > 1 else ""
            raise ValueError(f"a and b must score the same documents: {where}a has {x.shape[1]}, b has {y.shape[1]}")


# ------------------------------------------------------------------------------------ resampling
def _draw_docs(rng: np.random.Generator, n_resamples: int, n_docs: int) -> np.ndarray:
    return rng.integers(0, n_docs, size=(n_resamples, n_docs))


def _draw_seeds(rng: np.random.Generator, n_resamples: int, n_seeds: int) -> np.ndarray:
    """(B, n_seeds) seed-row indices; a single seed is never resampled (and draws nothing)."""
    if n_seeds == 1:
        return np.zeros((n_resamples, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(n_resamples, n_seeds))


def _per_seed_means(x: np.ndarray, doc_idx: np.ndarray) -> np.ndarray:
    """(B, n_seeds): for every resample b and seed row s, the mean of x[s] at the documents doc_idx[b]."""
    n_seeds, n_docs = x.shape
    chunk = max(1, _CHUNK_ELEMENTS // (n_seeds * n_docs))
    parts = [x[:, doc_idx[i : i + chunk]].mean(axis=2).T for i in range(0, doc_idx.shape[0], chunk)]
    return np.concatenate(parts, axis=0)


def _resampled_means(tasks: list[np.ndarray], doc_idx: list[np.ndarray], seed_idx: np.ndarray) -> np.ndarray:
    """(B,): per resample, the mean over tasks of (mean over resampled seeds of the resampled doc mean)."""
    total = np.zeros(seed_idx.shape[0])
    for x, idx in zip(tasks, doc_idx, strict=True):
        total += np.take_along_axis(_per_seed_means(x, idx), seed_idx, axis=1).mean(axis=1)
    return total / len(tasks)


def _point(tasks: list[np.ndarray]) -> np.ndarray:
    """(n_seeds,): per seed, the mean over tasks of the document mean."""
    return np.mean([x.mean(axis=1) for x in tasks], axis=0)


def _interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


def _estimate(tasks: list[np.ndarray], n_resamples: int, confidence: float, seed: int) -> Estimate:
    rng = np.random.default_rng(seed)
    doc_idx = [_draw_docs(rng, n_resamples, x.shape[1]) for x in tasks]
    n_seeds = tasks[0].shape[0]
    boot = _resampled_means(tasks, doc_idx, _draw_seeds(rng, n_resamples, n_seeds))
    per_seed = _point(tasks)
    low, high = _interval(boot, confidence)
    return Estimate(
        mean=float(per_seed.mean()),
        ci_low=low,
        ci_high=high,
        sd_seeds=float(per_seed.std(ddof=1)) if n_seeds > 1 else None,
        n_docs=sum(x.shape[1] for x in tasks),
        n_seeds=n_seeds,
    )


def _difference(a: list[np.ndarray], b: list[np.ndarray], n_resamples: int, confidence: float, seed: int) -> Difference:
    rng = np.random.default_rng(seed)
    doc_idx = [_draw_docs(rng, n_resamples, x.shape[1]) for x in a]  # shared: the pairing
    seeds_a = _draw_seeds(rng, n_resamples, a[0].shape[0])
    seeds_b = _draw_seeds(rng, n_resamples, b[0].shape[0])
    boot = _resampled_means(a, doc_idx, seeds_a) - _resampled_means(b, doc_idx, seeds_b)
    low, high = _interval(boot, confidence)
    return Difference(
        mean=float(_point(a).mean() - _point(b).mean()),
        ci_low=low,
        ci_high=high,
        p_value=bootstrap_p_value(boot),
        n_docs=sum(x.shape[1] for x in a),
        significant=bool(low > 0.0 or high < 0.0),
    )


def bootstrap_p_value(boot: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from a bootstrap distribution of the difference.

    p = 2 * min(P(d <= 0), P(d >= 0)), the fractions taken over the B resamples, clipped to
    [1/(B+1), 1]: 1 when the resamples straddle 0 evenly (or are all exactly 0), 1/(B+1) when none
    reaches 0. It is the smallest alpha at which the two-sided percentile CI excludes 0.
    """
    boot = np.asarray(boot, dtype=np.float64)
    n = boot.size
    p = 2.0 * min(np.count_nonzero(boot <= 0.0), np.count_nonzero(boot >= 0.0)) / n
    return float(min(1.0, max(1.0 / (n + 1), p)))


# ------------------------------------------------------------------------------------ public API
def bootstrap_ci(scores: object, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean and percentile-bootstrap CI of per-document scores (1-D docs, or 2-D seeds x docs)."""
    _check_options(n_resamples, confidence)
    return _estimate([_as_runs(scores, "scores")], n_resamples, confidence, seed)


def paired_bootstrap(
    a: object, b: object, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Difference:
    """mean(a) - mean(b) on the same documents (same column order) with its paired-bootstrap CI and p-value."""
    _check_options(n_resamples, confidence)
    xa, xb = [_as_runs(a, "a")], [_as_runs(b, "b")]
    _check_paired(xa, xb)
    return _difference(xa, xb, n_resamples, confidence, seed)


def bootstrap_ci_mean_of_means(
    tasks: Sequence[object], *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """CI of the average over tasks of the per-task means (each task its own documents).

    Documents are resampled within each task independently; seed rows (one per calibration run,
    spanning all tasks) are resampled jointly across tasks. n_docs is the total over tasks.
    """
    _check_options(n_resamples, confidence)
    return _estimate(_as_tasks(tasks, "tasks"), n_resamples, confidence, seed)


def paired_bootstrap_mean_of_means(
    a: Sequence[object], b: Sequence[object], *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Difference:
    """Paired difference of two task averages: the same document resample per task for a and b."""
    _check_options(n_resamples, confidence)
    xa, xb = _as_tasks(a, "a"), _as_tasks(b, "b")
    _check_paired(xa, xb)
    return _difference(xa, xb, n_resamples, confidence, seed)


def bootstrap_ratio_ci(num: object, den: object, *, n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of sum(num) / sum(den) over units (prompts) resampled with replacement.

    For pooled rates such as the flip rate (flips / frontier tokens): each prompt contributes its own numerator
    and denominator, so prompts with more frontier tokens weigh more, exactly as in the pooled value. Resamples
    whose denominator is 0 are dropped."""
    _check_options(n_resamples, confidence)
    n, d = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if n.ndim != 1 or n.shape != d.shape or n.size == 0:
        raise ValueError(f"num and den must be 1-D of the same non-zero length, got {n.shape} and {d.shape}")
    if not (np.isfinite(n).all() and np.isfinite(d).all()):
        raise ValueError("num and den must be finite")
    idx = _draw_docs(np.random.default_rng(seed), n_resamples, n.size)
    tot_n, tot_d = n[idx].sum(axis=1), d[idx].sum(axis=1)
    keep = tot_d != 0
    if not keep.any():
        raise ValueError("every resample has a zero denominator: the ratio is undefined")
    return _interval(tot_n[keep] / tot_d[keep], confidence)


# ----------------------------------------------------------------------------------------- power
def _z_sum(power: float, alpha: float) -> float:
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), e.g. 0.8; got {power}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {alpha}")
    normal = NormalDist()
    return normal.inv_cdf(1.0 - alpha / 2.0) + normal.inv_cdf(power)


def _diff_sd(diff_per_doc: object) -> tuple[float, int]:
    d = np.asarray(diff_per_doc, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"diff_per_doc must be 1-D (one difference per document), got shape {d.shape}")
    if d.size < 2:
        raise ValueError(f"diff_per_doc needs at least 2 documents to estimate a spread, got {d.size}")
    if not np.isfinite(d).all():
        raise ValueError("diff_per_doc contains NaN or inf: every document needs a finite difference")
    return float(d.std(ddof=1)), int(d.size)


def mdd(diff_per_doc: object, *, power: float = 0.8, alpha: float = 0.05) -> float:
    """Minimum detectable paired difference: (z_{1-alpha/2} + z_power) * sd(diff) / sqrt(n).

    At 80% power and alpha 0.05 the factor is 2.80. For 0/1 scores sd(diff) ~ sqrt(discordance).
    """
    z = _z_sum(power, alpha)
    sd, n = _diff_sd(diff_per_doc)
    return z * sd / math.sqrt(n)


def docs_needed(diff_per_doc: object, target: float, *, power: float = 0.8, alpha: float = 0.05) -> int:
    """Documents needed so that the MDD equals `target`, at the spread of the given per-document differences."""
    if not target > 0.0:
        raise ValueError(f"target difference must be > 0, got {target}")
    z = _z_sum(power, alpha)
    sd, _ = _diff_sd(diff_per_doc)
    return max(1, math.ceil((z * sd / target) ** 2))


def mdd_mean_of_means(diffs_per_task: Sequence[object], *, power: float = 0.8, alpha: float = 0.05) -> float:
    """MDD of the average over tasks of per-task paired differences (tasks independent, equally weighted):
    (z_{1-alpha/2} + z_power) * sqrt(sum_t sd_t^2 / n_t) / T."""
    if len(diffs_per_task) == 0:
        raise ValueError("diffs_per_task has no tasks: need at least one")
    z = _z_sum(power, alpha)
    var = 0.0
    for d in diffs_per_task:
        sd, n = _diff_sd(d)
        var += sd * sd / n
    return z * math.sqrt(var) / len(diffs_per_task)
