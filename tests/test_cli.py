"""The `fair-calib` entry point end to end: a run's files, multirun, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny

from fair_calib.models.loading import save_dllm

SMALL_BENCH = ["benchmark.n={addition:6,word_problems:4,compare:6}", "benchmark.mc_num=2",
               "benchmark.show_progress=false", "diagnostics.n_prompts=4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-test"
    save_dllm(make_tiny("llada"), path)
    return path


def run_cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAIR_CALIB_CACHE": str(cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fair_calib", *args, "threads=1"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_default_job_writes_results_table_and_wandb(model_dir, tmp_path):
    proc = run_cli([f"model.path={model_dir}", "hydra.run.dir=run", *SMALL_BENCH], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "ok"
    assert set(results["metrics"]) == {"FP", "rtn W4A4"}
    for column in results["metrics"].values():
        assert set(column) == {"tinyreason_addition", "tinyreason_word_problems", "tinyreason_compare"}
        assert all(0.0 <= v <= 1.0 for task in column.values() for v in task.values())
    assert "quant/avg" in results["summary"] and "fp/avg" in results["summary"]
    assert (run / "config.yaml").is_file() and (run / "table.md").read_text().startswith("| task")
    assert "| average" in proc.stdout
    assert list((run / "wandb").glob("offline-run-*")), "the W&B run should be written offline in the run folder"
    assert (run / "samples" / "fp.json").is_file()
    for name in ("scalars.json", "per_step.csv", "flip_rate.png", "prob_mse.png", "lag_histogram.png"):
        assert (run / "diagnostics" / name).is_file(), name
    assert 0.0 <= results["summary"]["diag/flip_rate"] <= 1.0


def test_fp_evaluation_is_cached_across_runs(model_dir, tmp_path):
    args = [f"model.path={model_dir}", "logger=none", *SMALL_BENCH]
    first = run_cli([*args, "hydra.run.dir=a"], tmp_path, tmp_path / "cache")
    second = run_cli([*args, "hydra.run.dir=b", "quantizer.w_bits=8", "quantizer.a_bits=8"], tmp_path,
                     tmp_path / "cache")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "evaluation cache hit (fp)" in second.stderr + second.stdout
    a = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]["FP"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]["FP"]
    assert a == b


def test_multirun_runs_each_job(model_dir, tmp_path):
    proc = run_cli(["-m", f"model.path={model_dir}", "logger=none", "quantizer.w_bits=4,8",
                    "hydra.sweep.dir=sweep", *SMALL_BENCH], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    bits = sorted(json.loads(p.read_text())["run"]["bits"] for p in results)
    assert bits == ["W4A4", "W8A4"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantizer.name=nosuch", "unknown quantizer 'nosuch'; valid quantizer names: "),
        ("quantizer.w_bits=1", "bit width 1 is out of range"),
        ("model.path=/nonexistent/folder", "model folder /nonexistent/folder does not exist"),
        ("decoding.block_length=5", "block_length 5 does not divide"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(override, message, tmp_path):
    proc = run_cli([override, "logger=none", "hydra.run.dir=run"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "results.json").exists()
    if "nosuch" in override:
        assert "rtn" in lines[0] and "gptq" in lines[0]
