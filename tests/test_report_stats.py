"""Error bars in the report: per-document scores, seed rows, paired differences against a reference row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fair_calib import stats
from fair_calib.benchmark.scores import doc_scores, split_key, task_scores
from fair_calib.pipeline import interval_metrics
from fair_calib.registry import ConfigError
from fair_calib.report.__main__ import main as report_main
from fair_calib.report.build import build_report
from fair_calib.report.cells import Row, Seeded, Unpairable, compare
from fair_calib.report.collect import collect_runs
from fair_calib.report.tables import parse_references

TASKS = ("tinyreason_addition", "tinyreason_compare")
HEADLINE = {"tinyreason_addition": "exact_match", "tinyreason_compare": "acc"}


# ---- per-document scores from sample records -----------------------------------------------------
def test_doc_scores_follow_filter_and_document_order():
    records = [{"doc_id": 1, "filter": "strict", "exact_match": 0.0},
               {"doc_id": 0, "filter": "strict", "exact_match": 1},
               {"doc_id": 0, "filter": "flexible", "exact_match": 0.0},
               {"doc_id": 1, "filter": "flexible", "exact_match": 1.0}]
    assert split_key("exact_match,strict") == ("exact_match", "strict") and split_key("acc") == ("acc", "none")
    assert doc_scores(records, "exact_match,strict") == [1.0, 0.0]  # sorted by doc_id
    assert doc_scores(records, "exact_match,flexible") == [0.0, 1.0]
    assert doc_scores(records, "exact_match") is None  # no record has the filter "none"
    group = [{"task": "mmlu_b", "doc_id": 0, "acc": 1}, {"task": "mmlu_a", "doc_id": 1, "acc": 0},
             {"task": "mmlu_a", "doc_id": 0, "acc": 1}]
    assert doc_scores(group, "acc") == [1.0, 0.0, 1.0]  # subtask, then doc_id: a group's size-weighted mean
    assert doc_scores([{"doc_id": 0, "acc": 1}, {"doc_id": 1}], "acc") is None  # a record without the metric
    assert task_scores({"t": group, "u": []}, {"t": ["acc", "answer_ll"], "u": ["acc"]}) == {"t": {"acc": [1.0, 0.0,
                                                                                                           1.0]}}


def test_interval_metrics_match_the_bootstrap_and_cover_the_headline_average():
    scores = {"tinyreason_addition": {"exact_match": [1.0, 0.0, 1.0, 1.0], "answer_ll": [-1.0, -2.0, -0.5, -0.1]},
              "tinyreason_compare": {"acc": [1.0, 1.0, 0.0]}}
    out = interval_metrics("quant", scores, HEADLINE)
    est = stats.bootstrap_ci([-1.0, -2.0, -0.5, -0.1], n_resamples=2000)
    assert out["quant/tinyreason_addition/answer_ll_ci_low"] == est.ci_low
    assert out["quant/tinyreason_addition/answer_ll_ci_high"] == est.ci_high
    avg = stats.bootstrap_ci_mean_of_means([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], n_resamples=2000)
    assert (out["quant/avg_ci_low"], out["quant/avg_ci_high"]) == (avg.ci_low, avg.ci_high)
    assert "quant/avg_ci_low" not in interval_metrics("quant", {"tinyreason_addition": scores["tinyreason_addition"]},
                                                      HEADLINE)  # a task without scores: no average CI


# ---- rows, cells and comparisons ------------------------------------------------------------------
def _row(label: str, per_seed: dict[int, dict[str, list[float]]]) -> Row:
    row = Row(label)
    for seed, by_task in per_seed.items():
        for task, docs in by_task.items():
            entry = row.tasks.setdefault(task, Seeded())
            entry.values[seed], entry.docs[seed] = float(np.mean(docs)), docs
    return row


def test_cells_are_the_bootstrap_of_seeds_by_documents():
    rng = np.random.default_rng(0)
    docs = {s: (rng.random(50) < 0.7).astype(float).tolist() for s in range(3)}
    row = _row("FlatQuant W4A4", {s: {"t": docs[s]} for s in range(3)})
    cell = row.cell("t")
    est = stats.bootstrap_ci([docs[s] for s in range(3)], n_resamples=2000)
    assert (cell.mean, cell.low, cell.high, cell.sd, cell.n_seeds) == (est.mean, est.ci_low, est.ci_high,
                                                                       est.sd_seeds, 3)
    assert cell.sd == pytest.approx(np.std([np.mean(docs[s]) for s in range(3)], ddof=1))
    # without per-document scores: the mean and sd over seeds, no interval
    bare = Row("RTN", {"t": Seeded(values={0: 0.5, 1: 0.7})})
    c = bare.cell("t")
    assert c.mean == pytest.approx(0.6) and c.sd == pytest.approx(np.std([0.5, 0.7], ddof=1)) and c.low is None
    assert bare.average(["t", "missing"]) is None  # a partial average is never shown


def test_paired_comparison_on_a_constructed_case():
    """b is right on the same 80 of 100 documents as a, plus 10 more: the difference is exactly 10 points,
    every resample of documents sees b >= a, so the CI is above 0 and p is the smallest possible."""
    a = [1.0] * 80 + [0.0] * 20
    b = [1.0] * 90 + [0.0] * 10
    ref, row = _row("FlatQuant W4A4", {0: {"t": a}}), _row("FAIR-Calib W4A4", {0: {"t": b}})
    comp = compare(row, ref, ["t"])
    assert comp.reference == "FlatQuant W4A4"
    assert comp.diff.mean == pytest.approx(0.1) and comp.diff.ci_low > 0 and comp.diff.significant
    assert comp.diff.p_value == pytest.approx(1 / 2001)
    # per-document difference: ten 1s and ninety 0s -> sd = sqrt(0.1 * 0.9 * 100 / 99)
    assert comp.mdd == pytest.approx(2.8016 * np.sqrt(0.09 * 100 / 99) / 10, rel=1e-4)
    same = compare(ref, _row("x", {0: {"t": a}}), ["t"])
    assert same.diff.mean == 0 and same.diff.p_value == 1.0 and not same.diff.significant
    with pytest.raises(Unpairable, match="cannot pair 'FAIR-Calib W4A4' with 'x' on t: 100 vs 99 documents"):
        compare(row, _row("x", {0: {"t": a[:99]}}), ["t"])


def test_parse_references():
    assert parse_references(["FAIR-Calib=FlatQuant", " *=FP "]) == {"FAIR-Calib": "FlatQuant", "*": "FP"}
    with pytest.raises(ConfigError, match="write METHOD=REFERENCE"):
        parse_references(["FlatQuant"])


# ---- the report over runs with scores and seeds ----------------------------------------------------
def write(root: Path, name: str, method: str, method_name: str, seed: int, columns: dict[str, dict[str, list]],
          n_probe: int = 128) -> None:
    metrics = {c: {t: {HEADLINE[t]: float(np.mean(d))} for t, d in by_task.items()} for c, by_task in columns.items()}
    scores = {c: {t: {HEADLINE[t]: d} for t, d in by_task.items()} for c, by_task in columns.items()}
    data = {"status": "ok", "headline": HEADLINE,
            "run": {"model": "m", "method": method, "method_name": method_name, "bits": "W4A4", "seed": seed,
                    "weighting": "uniform", "prior": "none"},
            "config": {"seed": seed, "quantizer": {"name": method_name, "seed": seed}, "benchmark": {"n": 100},
                       "prior": {"name": "none", "n_probe": n_probe}},
            "metrics": metrics, "scores": scores, "summary": {}, "timings": {}}
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))


def _docs(n_right: int, n: int = 100) -> list[float]:
    return [1.0] * n_right + [0.0] * (n - n_right)


def test_report_groups_seeds_and_compares_against_the_reference_row(tmp_path):
    root = tmp_path / "sweep"
    fp = {t: _docs(95) for t in TASKS}
    for seed in range(3):
        write(root, f"flat-s{seed}", "FlatQuant W4A4", "flatquant", seed,
              {"FP": fp, "FlatQuant W4A4": {t: _docs(80 + seed) for t in TASKS}})
        write(root, f"fair-s{seed}", "FAIR-Calib W4A4", "fair_calib", seed,
              {"FP": fp, "FAIR-Calib W4A4": {t: _docs(90 + seed) for t in TASKS}})
    write(root, "rtn-s0", "RTN W4A4", "rtn", 0, {"FP": fp, "RTN W4A4": {t: _docs(50) for t in TASKS}})
    report, files = build_report(collect_runs([root]), tmp_path / "out")
    (table,) = dict(report.sections)["Accuracy"]
    assert table.header == ["method", "addition", "compare", "Avg", "n", "ref", "Δ Avg [95% CI]", "p", "MDD"]
    rows = dict(table.rows)
    assert list(rows) == ["FP", "RTN W4A4", "FlatQuant W4A4", "FAIR-Calib W4A4"]
    fair = rows["FAIR-Calib W4A4"]
    assert fair[2].mean == pytest.approx(91.0) and fair[2].sd == pytest.approx(1.0) and fair[3] == 3
    assert fair[4] == "FlatQuant" and fair[5].startswith("+10.0 [") and fair[5].endswith("]*")  # paired, significant
    assert rows["RTN W4A4"][4] == "FP" and rows["RTN W4A4"][5].startswith("-45.0 [")
    assert rows["FlatQuant W4A4"][4] == "FP" and rows["FP"][4] is None
    md = files["markdown"].read_text()
    assert "| FAIR-Calib W4A4 | **91.0 ±1.0 [" in md and "paired bootstrap against the reference row" in md
    assert r"$\pm$" in files["latex"].read_text()
    assert table.notes[-1] == "threads: not recorded"
    # another reference on request; a reference that no run has is one line, exit 2, nothing written
    (t2,) = dict(build_report(collect_runs([root]), tmp_path / "o2", {"FAIR-Calib": "RTN"})[0].sections)["Accuracy"]
    assert dict(t2.rows)["FAIR-Calib W4A4"][4] == "RTN"
    assert report_main([str(root), "--out", str(tmp_path / "o3"), "--reference", "FAIR-Calib=GPTQ"]) == 2
    assert not (tmp_path / "o3").exists()


def test_report_refuses_rows_that_scored_different_documents(tmp_path, capsys):
    root = tmp_path / "sweep"
    write(root, "a", "FlatQuant W4A4", "flatquant", 0, {"FlatQuant W4A4": {t: _docs(80) for t in TASKS}})
    write(root, "b", "FAIR-Calib W4A4", "fair_calib", 0, {"FAIR-Calib W4A4": {t: _docs(80, 50) for t in TASKS}})
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "cannot pair 'FAIR-Calib W4A4' with 'FlatQuant W4A4'" in err
    assert "benchmark.n" in err and not (tmp_path / "out").exists()


def test_diagnostics_cells_carry_their_ci_over_prompts(tmp_path):
    root = tmp_path / "sweep"
    write(root, "a", "FlatQuant W4A4", "flatquant", 0, {"FlatQuant W4A4": {t: _docs(80) for t in TASKS}})
    path = root / "a" / "results.json"
    data = json.loads(path.read_text())
    data["summary"] = {"diag/flip_rate": 0.05, "diag/flip_rate_ci_low": 0.03, "diag/flip_rate_ci_high": 0.08,
                       "diag/frontier_kl": 0.2}
    path.write_text(json.dumps(data))
    report, files = build_report(collect_runs([root]), tmp_path / "out")
    (diag,) = dict(report.sections)["Frontier diagnostics"]
    flip, kl = dict(diag.rows)["FlatQuant W4A4"]
    assert (flip.mean, flip.low, flip.high) == (0.05, 0.03, 0.08) and kl == 0.2
    assert "| FlatQuant W4A4 | 0.05 [0.03, 0.08] | 0.2 " in files["markdown"].read_text()
