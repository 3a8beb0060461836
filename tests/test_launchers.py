"""Cluster and search launchers: submitit (local executor, same code path as SLURM) and the Optuna sweeper."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny
from hydra import compose, initialize_config_dir
from test_cli import RTN, SMALL_BENCH, SMALL_FAIR, run_cli

from fair_calib import CONF_DIR
from fair_calib.models.loading import save_dllm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-test"
    save_dllm(make_tiny("llada"), path)
    return path


def test_slurm_config_is_a_submitit_launcher_users_can_edit():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min, launcher.mem_gb) == ("gpu", 1, 240, 64)


def test_submitit_local_runs_every_job(model_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_cli(["-m", "hydra/launcher=local", f"model.path={model_dir}", "logger=none", *RTN,
                    "hydra.sweep.dir=sweep", "quantizer.w_bits=4,8", *SMALL_BENCH], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")]
    assert sorted(r["run"]["bits"] for r in results) == ["W4A4", "W8A4"]
    assert all(r["status"] == "ok" for r in results)
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl")), "jobs went through submitit"


def test_optuna_sweeper_searches_the_fair_knobs(model_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli(["-m", "hydra/sweeper=fair_optuna", "hydra.sweeper.n_trials=2", f"model.path={model_dir}",
                    "logger=none", "hydra.sweep.dir=sweep", "diagnostics.enabled=false", "baselines=[]",
                    *SMALL_BENCH, *SMALL_FAIR], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_value" in best and "weighting.floor" in best
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")]
    assert len(runs) == 2 and len({r["config"]["weighting"]["floor"] for r in runs}) == 2


def test_long_override_lists_get_short_unique_folder_names():
    from fair_calib import short_dirname

    assert short_dirname("method=rtn,model=tiny_dream") == "method=rtn,model=tiny_dream"
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(short_dirname(a)) == 120 and short_dirname(a) != short_dirname(b)
    assert short_dirname(a) == short_dirname(a) and short_dirname(a).startswith("x" * 103 + "~")
    assert short_dirname("model.path=/a/b") == "model.path=_a_b"
