"""threads=null: the cores this process may use, split between the jobs of a joblib sweep (issue 16)."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from fair_calib import cli


@pytest.mark.parametrize(("n_jobs", "multirun", "cores", "expected"),
                         [(None, False, 8, 8), (2, True, 8, 4), (3, True, 8, 2), (16, True, 8, 1), (-1, True, 8, 1),
                          (-3, True, 8, 1), (-5, True, 8, 2), (2, False, 8, 8), (2, True, 1, 1)])
def test_default_threads_split_the_cores(monkeypatch: pytest.MonkeyPatch, n_jobs: int | None, multirun: bool,
                                         cores: int, expected: int) -> None:
    monkeypatch.setattr(cli, "available_cores", lambda: cores)
    hc = OmegaConf.create({"launcher": {} if n_jobs is None else {"n_jobs": n_jobs}})
    assert cli.default_threads(hc, multirun) == expected


def test_available_cores_is_the_affinity() -> None:
    if hasattr(os, "sched_getaffinity"):
        assert cli.available_cores() == len(os.sched_getaffinity(0))
    assert cli.available_cores() >= 1
