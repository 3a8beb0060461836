"""Per-document scores: the numbers behind a task's mean, read from the benchmark's per-sample records.

A benchmark keeps one record per (document, filter) of each task in `last_samples` (lm-eval's logged
samples, made compact). `doc_scores` turns the records of one task into the per-document values of one
metric key as the benchmark reports it (`exact_match`, or `exact_match,flexible-extract` for a filter),
ordered by (subtask, doc_id): the order is the same in every run of the same benchmark config, which
is what pairs two methods document by document (`fair_calib.stats.paired_bootstrap`). The mean of the
list is the task's metric (a group such as MMLU concatenates its subtasks, so the mean is lm-eval's
size-weighted average).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_FILTER = "none"


def split_key(key: str) -> tuple[str, str]:
    """'exact_match,flexible-extract' -> ('exact_match', 'flexible-extract'); 'acc' -> ('acc', 'none')."""
    metric, _, filt = key.partition(",")
    return metric, filt or DEFAULT_FILTER


def doc_scores(records: Sequence[Mapping[str, Any]], key: str) -> list[float] | None:
    """Per-document values of metric `key` in a stable document order; None when a record lacks the metric
    (the task does not compute it, or the records predate it)."""
    metric, filt = split_key(key)
    chosen = [r for r in records if str(r.get("filter", DEFAULT_FILTER)) == filt]
    if not chosen or any(not isinstance(r.get(metric), int | float) for r in chosen):
        return None
    chosen = sorted(chosen, key=lambda r: (str(r.get("task", "")), int(r["doc_id"])))
    return [float(r[metric]) for r in chosen]


def task_scores(samples: Mapping[str, Sequence[Mapping[str, Any]]],
                keys: Mapping[str, Iterable[str]]) -> dict[str, dict[str, list[float]]]:
    """{task: {metric key: per-document scores}} for the given metric keys of each task (those present)."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, wanted in keys.items():
        for key in wanted:
            values = doc_scores(samples.get(task) or [], key)
            if values is not None:
                out.setdefault(task, {})[key] = values
    return out
