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
SMALL_FAIR = ["quantizer.epochs=1", "quantizer.progress=false", "prior.n_probe=8", "prior.progress=false",
              "data.n_samples=8"]
RTN = ["experiment=none", "method=rtn"]  # a bare RTN run: the quickest full pipeline


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
    """The default job is experiment=fair_calib: FP, RTN and FAIR-Calib at W4A4 in one run."""
    proc = run_cli([f"model.path={model_dir}", "hydra.run.dir=run", *SMALL_BENCH, *SMALL_FAIR], tmp_path,
                   tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "ok"
    assert set(results["metrics"]) == {"FP", "RTN W4A4", "FAIR-Calib W4A4"}
    assert results["run"]["method_name"] == "fair_calib" and results["run"]["experiment"] == "fair_calib"
    assert results["choices"]["method"] == "fair_calib" and results["config"]["prior"]["n_probe"] == 8
    for column in results["metrics"].values():
        assert set(column) == {"tinyreason_addition", "tinyreason_word_problems", "tinyreason_compare"}
        assert all(0.0 <= v <= 1.0 for task in column.values() for k, v in task.items() if k != "answer_ll")
    assert "quant/avg" in results["summary"] and "fp/avg" in results["summary"]
    # per-document scores of every column: their means are the metrics; the summary carries their CIs
    assert set(results["scores"]) == set(results["metrics"]) and results["run"]["threads"] == 1
    for label, column in results["scores"].items():
        for task, by_key in column.items():
            assert set(by_key) == {results["headline"][task], "answer_ll"}
            for key, docs in by_key.items():
                assert sum(docs) / len(docs) == pytest.approx(results["metrics"][label][task][key])
    s = results["summary"]
    for prefix in ("fp", "quant"):
        add = f"{prefix}/tinyreason_addition/exact_match"
        assert s[f"{add}_ci_low"] <= s[add] <= s[f"{add}_ci_high"]
        assert s[f"{prefix}/avg_ci_low"] <= s[f"{prefix}/avg"] <= s[f"{prefix}/avg_ci_high"]
    assert (run / "config.yaml").is_file() and (run / "table.md").read_text().startswith("| task")
    assert "| average" in proc.stdout
    assert list((run / "wandb").glob("offline-run-*")), "the W&B run should be written offline in the run folder"
    assert (run / "samples" / "fp.json").is_file()
    for name in ("scalars.json", "per_step.csv", "flip_rate.png", "prob_mse.png", "lag_histogram.png"):
        assert (run / "diagnostics" / name).is_file(), name
    assert 0.0 <= results["summary"]["diag/flip_rate"] <= 1.0
    # the prior with this run's final per-position weights (mean 1 over the window)
    header, *rows = (run / "prior" / "prior.csv").read_text().splitlines()
    assert header.split(",")[-1] == "weight" and len(rows) == 32
    assert sum(float(r.split(",")[-1]) for r in rows) / len(rows) == pytest.approx(1.0, abs=1e-5)
    assert (run / "prior" / "prior.png").stat().st_size > 1000


def test_fp_evaluation_is_cached_across_runs(model_dir, tmp_path):
    args = [f"model.path={model_dir}", "logger=none", *RTN, *SMALL_BENCH]
    first = run_cli([*args, "hydra.run.dir=a"], tmp_path, tmp_path / "cache")
    second = run_cli([*args, "hydra.run.dir=b", "quantizer.w_bits=8", "quantizer.a_bits=8"], tmp_path,
                     tmp_path / "cache")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "evaluation cache hit (fp)" in second.stderr + second.stdout
    a = json.loads((tmp_path / "a" / "results.json").read_text())["metrics"]["FP"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["metrics"]["FP"]
    assert a == b


def test_calibration_seeds_share_the_evaluation_draws(model_dir, tmp_path):
    """`seed` is the calibration seed only: at a fixed `eval_seed` a calibration-free method gives the same
    weights and the same Monte Carlo draws for every seed, so seed 1 reuses seed 0's FP and RTN evaluation
    and its folder holds the same scores and samples; another eval_seed is a new evaluation."""
    args = [f"model.path={model_dir}", "logger=none", *RTN, *SMALL_BENCH, "diagnostics.enabled=false"]
    runs = {name: run_cli([*args, f"hydra.run.dir={name}", *extra], tmp_path, tmp_path / "cache")
            for name, extra in [("s0", ["seed=0"]), ("s1", ["seed=1"]), ("e1", ["seed=0", "eval_seed=1"])]}
    assert all(p.returncode == 0 for p in runs.values()), runs["e1"].stderr[-2000:]
    out = runs["s1"].stderr + runs["s1"].stdout
    assert "evaluation cache hit (fp)" in out and "evaluation cache hit (rtn)" in out
    e1 = runs["e1"].stderr + runs["e1"].stdout
    assert "evaluation cache hit" not in e1
    s0, s1, other = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("s0", "s1", "e1"))
    assert s0["run"]["seed"] == 0 and s1["run"]["seed"] == 1 and other["run"]["eval_seed"] == 1
    assert s0["metrics"] == s1["metrics"] and s0["scores"] == s1["scores"]
    for tag in ("fp", "rtn"):
        assert (tmp_path / "s0" / "samples" / f"{tag}.json").read_bytes() == \
            (tmp_path / "s1" / "samples" / f"{tag}.json").read_bytes()
    # the MC masks of answer_ll follow eval_seed: another seed gives other (finite) log-likelihoods
    ll = lambda r: [v for t, m in r["metrics"]["RTN W4A4"].items() for k, v in m.items() if k == "answer_ll"]  # noqa: E731
    assert ll(other) != ll(s0)


def test_eval_seed_must_be_a_non_negative_int(model_dir, tmp_path):
    proc = run_cli([f"model.path={model_dir}", "logger=none", *RTN, "eval_seed=-1"], tmp_path, tmp_path / "cache")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "eval_seed=-1" in lines[0] and "Traceback" not in proc.stderr


def test_multirun_runs_each_job_resumes_and_records_failures(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    args = ["-m", "logger=none", *RTN, "hydra.sweep.dir=sweep", *SMALL_BENCH]
    proc = run_cli([*args, f"model.path={model_dir},{broken}", "quantizer.w_bits=4,8"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]  # a failed job does not stop the sweep
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json")}
    assert len(results) == 4
    ok = [r for r in results.values() if r["status"] == "ok"]
    assert sorted(r["run"]["bits"] for r in ok) == ["W4A4", "W8A4"]
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    assert sorted(name[:2] for name in failed) == ["2_", "3_"]  # jobs 2 and 3 read the broken folder
    assert "Traceback" in (tmp_path / "sweep" / failed[0] / "error.txt").read_text()
    assert proc.stderr.count("error: job") == 2

    # rerun: the finished jobs are skipped (same config hash), the failed ones are retried
    again = run_cli([*args, f"model.path={model_dir}", "quantizer.w_bits=4,8"], tmp_path, tmp_path / "cache")
    assert again.returncode == 0 and again.stdout.count("skipped:") == 2, again.stdout[-2000:]
    forced = run_cli([*args, f"model.path={model_dir}", "quantizer.w_bits=4", "force=true"], tmp_path,
                     tmp_path / "cache")
    assert forced.returncode == 0 and "skipped:" not in forced.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantizer.name=nosuch", "unknown quantizer 'nosuch'; valid quantizer names: "),
        ("quantizer.w_bits=1", "bit width 1 is out of range"),
        ("model.path=/nonexistent/folder", "model folder /nonexistent/folder does not exist"),
        ("decoding.block_length=5", "block_length 5 does not divide"),
        ("quantizer=gptq", "quantizer=gptq conflicts with method=fair_calib (which uses quantizer=flatquant)"),
        ("seed=-1", "seed=-1: the seed must be a non-negative integer"),
        ("seed=abc", "seed='abc': the seed must be a non-negative integer"),
        ("baselines=[nosuch]", "baselines: no quantizer config 'nosuch'; valid: "),
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


def test_seed_sweep_gives_one_folder_per_seed_and_the_report_groups_them(model_dir, tmp_path):
    args = ["-m", "experiment=paper_main_seeds", "model=tiny_llada", f"model.path={model_dir}", "method=fp",
            "logger=none", "hydra.sweep.dir=sweep", *SMALL_BENCH]
    proc = run_cli(args, tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = sorted((tmp_path / "sweep").glob("*/*/results.json"))
    assert [p.parent.name.split("~")[0] for p in found] == ["fp-s0", "fp-s1", "fp-s2"]
    assert [json.loads(p.read_text())["run"]["seed"] for p in found] == [0, 1, 2]
    env = {**os.environ, "WANDB_MODE": "offline"}
    rep = subprocess.run([sys.executable, "-m", "fair_calib.report", "sweep", "--out", "rep"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-2000:]
    row = next(line for line in rep.stdout.splitlines() if line.startswith("| FP "))
    assert row.split("|")[-2].strip() == "3"  # n = 3 seeds in one row
    assert "±" in row and "[" in row  # mean ± sd over seeds [bootstrap CI]
    # a reference that is not in the sweep is one line and exit 2
    bad = subprocess.run([sys.executable, "-m", "fair_calib.report", "sweep", "--out", "rep2", "--reference",
                          "*=FlatQuant"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "reference 'FlatQuant'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "rep2" / "report.md").exists()


def test_seeds_zero_is_one_line(tmp_path):
    proc = run_cli(["-m", "experiment=paper_main", "seeds=0", "logger=none", "hydra.sweep.dir=sweep"], tmp_path,
                   tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "seeds=0" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_cold_and_warm_caches_give_identical_results(model_dir, tmp_path):
    """A small FAIR-Calib run twice on one cache: the second hits the prior, FP/RTN evaluation and teacher
    trajectory caches, and must write the same metrics, per-document scores and calibration errors."""
    args = [f"model.path={model_dir}", "logger=none", *SMALL_BENCH, *SMALL_FAIR]
    cold = run_cli([*args, "hydra.run.dir=cold"], tmp_path, tmp_path / "cache")
    warm = run_cli([*args, "hydra.run.dir=warm"], tmp_path, tmp_path / "cache")
    assert cold.returncode == 0 and warm.returncode == 0, warm.stderr[-2000:]
    out = warm.stderr + warm.stdout
    assert "evaluation cache hit (fp)" in out and "prior cache hit" in out
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cold", "warm"))
    assert a["metrics"] == b["metrics"] and a["scores"] == b["scores"]
    untimed = lambda d: {k: v for k, v in d.items() if not k.endswith("time_s")}  # noqa: E731
    assert [untimed(x) for x in a["calibration"]["blocks"]] == [untimed(x) for x in b["calibration"]["blocks"]]
    volatile = {"diag/teacher_cache_hit"}
    assert untimed({k: v for k, v in a["summary"].items() if k not in volatile}) == \
        untimed({k: v for k, v in b["summary"].items() if k not in volatile})
    assert b["summary"]["diag/teacher_cache_hit"] == 1.0


def test_uniform_weighting_ignores_the_prior_fair_calib_uniform_is_flatquant(model_dir, tmp_path):
    """weighting=uniform under method=fair_calib runs the Stage I probe but must calibrate exactly as
    method=flatquant (the probe draws from its own generator): the report's ablation uses the FlatQuant
    runs as its uniform row on this ground."""
    args = [f"model.path={model_dir}", "logger=none", "experiment=none", "baselines=[]", "compare_fp=false",
            "diagnostics.enabled=false", *SMALL_BENCH, *SMALL_FAIR]
    no_prior = [a for a in args if not a.startswith("prior.")]  # method=flatquant has prior=none
    flat = run_cli([*no_prior, "method=flatquant", "hydra.run.dir=flat"], tmp_path, tmp_path / "cache")
    uni = run_cli([*args, "method=fair_calib", "weighting=uniform", "hydra.run.dir=uni"], tmp_path, tmp_path / "cache")
    assert flat.returncode == 0 and uni.returncode == 0, uni.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("flat", "uni"))
    assert "prior_s" in b["timings"] and "prior_s" not in a["timings"]  # the probe ran in the uniform run only
    scores = lambda d: {k.split(" ")[-1]: v for k, v in d["scores"].items()}  # noqa: E731 - labels differ
    assert scores(a) == scores(b) and list(a["metrics"].values()) == list(b["metrics"].values())
    untimed = lambda d: {k: v for k, v in d.items() if not k.endswith("time_s")}  # noqa: E731
    assert [untimed(x) for x in a["calibration"]["blocks"]] == [untimed(x) for x in b["calibration"]["blocks"]]


def test_sigterm_stops_a_sweep_and_marks_the_interrupted_job(model_dir, tmp_path):
    """Hydra's job runner catches a job's exceptions and goes on; an interrupt must end the whole sweep."""
    import signal
    import time

    env = {**os.environ, "FAIR_CALIB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["-m", "logger=none", *RTN, "hydra.sweep.dir=sweep", f"model.path={model_dir}", "quantizer.w_bits=4,5,6,8",
            "benchmark.n={addition:200,word_problems:100,compare:200}", "benchmark.mc_num=2",
            "benchmark.show_progress=false", "diagnostics.enabled=false", "threads=1"]
    proc = subprocess.Popen([sys.executable, "-m", "fair_calib", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "sweep").glob("0_*/config.yaml")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted by SIGTERM"
    found = (tmp_path / "sweep").glob("*/results.json")
    status = {p.parent.name[0]: json.loads(p.read_text())["status"] for p in found}
    assert list(status.values()).count("interrupted") == 1 and len(status) < 4  # the later jobs never started
    stopped = next(k for k, v in status.items() if v == "interrupted")
    assert not [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0] > stopped]
