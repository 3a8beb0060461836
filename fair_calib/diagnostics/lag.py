"""Stabilization lag (DESIGN section 6): how long after its commit a position's top-1 settles.

For a position committed at step c with final token y, let s* be the first step from which the top-1
equals y at every later step of the rollout (s* = T when the last step still disagrees). Then
lag = s* - c. Lag <= 0 means the prediction had already settled when the position was committed;
lag > 0 means the model kept changing its mind after committing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from fair_calib.decoding.trace import CommitTrace


def stabilization_lag(top1: Tensor, tokens: Tensor, commit_step: Tensor) -> Tensor:
    """(T, B, G) top-1 per step, (B, G) final tokens, (B, G) commit steps (-1 = never) -> (N,) committed lags.

    s* = T - (number of trailing steps whose top-1 equals y); lag = s* - c.
    """
    num_steps = top1.shape[0]
    agree = (top1 == tokens[None]).long()
    trailing = agree.flip(0).cumprod(0).sum(0)
    stable_from = num_steps - trailing
    committed = commit_step >= 0
    return (stable_from - commit_step)[committed]


def trace_lags(trace: CommitTrace) -> Tensor:
    """Lags of every committed position of a rollout trace."""
    return stabilization_lag(trace.stacked("top1"), trace.tokens, trace.commit_step())


def lag_summary(lags: Tensor) -> dict[str, float]:
    """mean, P90 (linear interpolation), share with lag > 0, and the number of positions."""
    if lags.numel() == 0:
        return {"mean": math.nan, "p90": math.nan, "share_positive": math.nan, "n": 0}
    x = lags.double().numpy()
    return {"mean": float(x.mean()), "p90": float(np.percentile(x, 90)), "share_positive": float((x > 0).mean()),
            "n": int(x.size)}


def lag_histogram(lags: dict[str, Tensor]) -> list[dict[str, float]]:
    """One row per integer lag value: `count_<name>` and `share_<name>` for each named lag set (e.g. fp, q)."""
    nonempty = [v for v in lags.values() if v.numel()]
    if not nonempty:
        return []
    lo = int(min(int(v.min()) for v in nonempty))
    hi = int(max(int(v.max()) for v in nonempty))
    rows = []
    for value in range(lo, hi + 1):
        row: dict[str, float] = {"lag": value}
        for name, v in lags.items():
            count = int((v == value).sum())
            row[f"count_{name}"] = count
            row[f"share_{name}"] = count / v.numel() if v.numel() else math.nan
        rows.append(row)
    return rows


def concat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
