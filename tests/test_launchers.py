"""Cluster and search launchers: submitit (local executor, same code path as SLURM) and the Optuna sweeper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    # a long override list keeps whole `key=value` items (leaf keys), never a value cut in half
    long = ",".join(["benchmark.n={addition:6,word_problems:4,compare:6}", "data.n_samples=8",
                     "diagnostics.n_prompts=4", "experiment=none", "method=rtn",
                     "model.path=/tmp/some/long/folder/name", "prior.n_probe=8", "quantizer.w_bits=4"])
    short = short_dirname(long)
    head, digest = short.split("~")
    assert len(short) <= 120 and len(digest) == 16 and "method=rtn" in head and "w_bits" not in head
    assert head == "n={addition:6,word_problems:4,compare:6},n_samples=8,n_prompts=4,experiment=none,method=rtn"
    assert short_dirname(long.replace("method=rtn", "method=gptq")) != short


def test_a_busy_job_folder_is_left_alone(tmp_path):
    """Two launchers on one folder: the second does not run the job nor write into the folder."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".fair_calib.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        env = {**os.environ, "FAIR_CALIB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
        env.pop("HYDRA_FULL_ERROR", None)
        proc = subprocess.run([sys.executable, "-m", "fair_calib", "experiment=none", "method=fp", "logger=none",
                               f"hydra.run.dir={run}"], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "is in use by another fair-calib process (pid 4242)" in lines[0]
    assert not (run / "results.json").exists() and not (run / "samples").exists()


WORKER = """
import multiprocessing, os, sys, time
from pathlib import Path
from fair_calib.cli import _die_with_launcher
from fair_calib.errors import Interrupted, signals_raise

def job(out):
    try:
        with signals_raise():
            _die_with_launcher()
            Path(out).with_suffix(".started").write_text(str(os.getpid()))
            time.sleep(120)
    except Interrupted:
        Path(out).write_text("interrupted")

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=job, args=(sys.argv[1],), name="LokyProcess-9")
    p.start()
    while not Path(sys.argv[1]).with_suffix(".started").exists():
        time.sleep(0.1)
    os._exit(0)  # the launcher dies without reaping its worker
"""


def test_a_worker_ends_its_job_when_the_launcher_dies(tmp_path):
    """A joblib worker whose launcher was killed is re-parented; it must end its job as an interrupt."""
    import time

    script = tmp_path / "launcher.py"
    script.write_text(WORKER)
    out = tmp_path / "worker.txt"
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=120)
    for _ in range(600):  # wait (not a timing assertion): the watchdog polls once a second
        if out.exists():
            break
        time.sleep(0.1)
    assert out.read_text() == "interrupted"
