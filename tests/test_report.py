"""The report builder: paper table layout, averages, missing cells, ablation rows, LaTeX/HTML, failed runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fair_calib.report.__main__ import main as report_main
from fair_calib.report.build import build_report
from fair_calib.report.collect import collect_runs
from fair_calib.report.tables import number

TASKS = ("tinyreason_addition", "tinyreason_word_problems", "tinyreason_compare")


def _metrics(add, wp, cmp):
    vals = dict(zip(TASKS, (add, wp, cmp)))
    return {t: ({"acc": v} if t.endswith("compare") else {"exact_match": v}) for t, v in vals.items() if v is not None}


def write_run(root: Path, name: str, model: str, method: str, method_name: str, quant: dict | None,
              fp: dict | None = None, weighting: str = "uniform", schedule: str = "early", n_probe: int = 128,
              diag: dict | None = None) -> Path:
    metrics = {}
    if fp is not None:
        metrics["FP"] = fp
    if quant is not None:
        metrics[method] = quant
    prior = "fair" if method_name == "fair_calib" else "none"
    summary = {f"diag/{k}": v for k, v in (diag or {}).items()}
    if quant is not None:
        vals = [next(iter(m.values())) for m in quant.values()]
        summary["quant/avg"] = sum(vals) / len(vals)
    data = {"status": "ok",
            "run": {"model": model, "method": method, "method_name": method_name, "bits": "W4A4",
                    "weighting": weighting, "prior": prior, "experiment": "x"},
            "config": {"prior": {"name": prior, "schedule": schedule, "n_probe": n_probe}},
            "metrics": metrics, "summary": summary, "timings": {"quantize_s": 2.0, "eval_quant_s": 1.5}}
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    fp = _metrics(0.95, 0.80, 0.90)
    write_run(root, "0", "tiny-llada", "RTN W4A4", "rtn", _metrics(0.50, 0.20, 0.80), fp,
              diag={"flip_rate": 0.25, "mean_disagree": 0.1, "lag_mean_q": 3.0})
    write_run(root, "1", "tiny-llada", "FAIR-Calib W4A4", "fair_calib", _metrics(0.90, None, 0.85), fp,
              diag={"flip_rate": 0.05, "mean_disagree": 0.02, "lag_mean_q": 1.0})
    write_run(root, "2", "tiny-dream", "QuaRot W4A4", "quarot", _metrics(0.10, 0.0, 0.70), _metrics(0.2, 0.1, 0.9))
    bad = root / "3" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom", "run": {"config_hash": None}}))
    return root


def test_method_table_layout_average_and_missing_cells(sweep, tmp_path):
    records = collect_runs([sweep])
    assert len(records) == 4 and sum(r.ok for r in records) == 3
    report, files = build_report(records, tmp_path / "out")
    md = files["markdown"].read_text()
    llada = md[md.index("tiny-llada: accuracy"):md.index("tiny-dream: accuracy")]
    lines = [line for line in llada.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["method", "addition", "word_problems", "compare", "Avg",
                                                             "n"]  # no per-document scores: no CI, no comparison
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[1:]}
    assert list(rows) == ["FP", "RTN W4A4", "FAIR-Calib W4A4"]  # FP first, then the paper's method order
    assert rows["FP"] == ["95.0", "80.0", "90.0", "88.3", "1"]  # (95 + 80 + 90) / 3; the reference is never bold
    assert rows["RTN W4A4"] == ["50.0", "20.0", "80.0", "50.0", "1"]  # a lone value in a column is not "best"
    assert rows["FAIR-Calib W4A4"] == ["**90.0**", "–", "**85.0**", "–", "1"]  # missing task => no average
    tex = files["latex"].read_text()
    assert r"FAIR-Calib W4A4 & \textbf{90.0} & -- & \textbf{85.0} & -- & 1 \\" in tex
    assert r"word\_problems" in tex
    page = files["html"].read_text()
    assert "data:image/png;base64," in page and "<b>90.0</b>" in page
    assert "RuntimeError: boom" in page and "RuntimeError: boom" in md  # failed runs are listed
    assert (tmp_path / "out" / "diagnostics.png").stat().st_size > 1000


def test_diagnostics_and_timing_tables(sweep, tmp_path):
    report, _ = build_report(collect_runs([sweep]), tmp_path / "out")
    sections = dict(report.sections)
    (diag,) = sections["Frontier diagnostics"][:1]
    assert diag.header[:4] == ["method", "flip rate", "post-commit mismatch", "lag (steps)"]
    assert dict(diag.rows) == {"RTN W4A4": [0.25, 0.1, 3.0], "FAIR-Calib W4A4": [0.05, 0.02, 1.0]}
    (timing,) = sections["Wall time"]
    assert timing.rows[0] == ("tiny-dream / QuaRot W4A4", [None, 2.0, None, 1.5, 3.5])


def test_ablation_and_probe_budget_tables(tmp_path):
    root = tmp_path / "abl"
    for i, (w, s, acc) in enumerate([("uniform", "early", 0.6), ("fair", "early", 0.7), ("fair", "late", 0.65)]):
        write_run(root, str(i), "tiny-llada", "FAIR-Calib W4A4", "fair_calib", _metrics(acc, acc, acc),
                  weighting=w, schedule=s)
    for i, n in enumerate([16, 64]):
        write_run(root, f"p{i}", "tiny-llada", "FAIR-Calib W4A4", "fair_calib", _metrics(0.5, 0.5, 0.5 + i / 10),
                  weighting="fair", schedule="early", n_probe=n)
    report, files = build_report(collect_runs([root]), tmp_path / "out")
    sections = dict(report.sections)
    (abl,) = sections["Weighting ablation (FAIR-Calib)"]
    assert [label for label, _ in abl.rows] == ["uniform (= FlatQuant)", "fair / early", "fair / late"]
    assert [number(v) for v in abl.rows[1][1]] == pytest.approx([70.0, 70.0, 70.0, 70.0, 1])
    (probe,) = sections["Probe budget"]
    assert number(probe.column("Avg")[1]) == pytest.approx(100 * (0.5 + 0.5 + 0.6) / 3)
    assert (tmp_path / "out" / "ablation.png").is_file() and (tmp_path / "out" / "probe_budget.png").is_file()


def test_flatquant_runs_are_the_ablations_uniform_row(tmp_path):
    """A sweep of FlatQuant and FAIR-Calib weightings (paper_main + paper_ablation): FlatQuant's runs are the uniform
    row (FAIR-Calib with uniform weights calibrates exactly as FlatQuant), first, the row the others are compared to."""
    root = tmp_path / "abl"
    write_run(root, "f", "m", "FlatQuant W4A4", "flatquant", _metrics(0.6, 0.6, 0.6))
    for i, (w, s, acc) in enumerate([("fair", "late", 0.7), ("frontier", "early", 0.8)]):
        write_run(root, str(i), "m", "FAIR-Calib W4A4", "fair_calib", _metrics(acc, acc, acc), weighting=w, schedule=s)
    write_run(root, "r", "m", "RTN W4A4", "rtn", _metrics(0.1, 0.1, 0.1))
    report, _ = build_report(collect_runs([root]), tmp_path / "out")
    (abl,) = dict(report.sections)["Weighting ablation (FAIR-Calib)"]
    assert [label for label, _ in abl.rows] == ["uniform (= FlatQuant)", "frontier / early", "fair / late"]
    assert [number(v) for v in abl.rows[0][1][:4]] == pytest.approx([60.0, 60.0, 60.0, 60.0])


def test_ablation_rows_follow_the_paper_order_and_diagnostics_split_by_setting(tmp_path):
    root = tmp_path / "abl"
    for i, (w, s) in enumerate([("fair", "late"), ("uniform", "early"), ("fair", "early"), ("frontier", "early")]):
        write_run(root, str(i), "m", "FAIR-Calib W4A4", "fair_calib", _metrics(0.5, 0.5, 0.5), weighting=w,
                  schedule=s, diag={"flip_rate": i / 10})
    report, _ = build_report(collect_runs([root]), tmp_path / "out")
    sections = dict(report.sections)
    (abl,) = sections["Weighting ablation (FAIR-Calib)"]
    assert [label for label, _ in abl.rows] == ["uniform (= FlatQuant)", "frontier / early", "fair / early",
                                                 "fair / late"]
    (diag,) = sections["Frontier diagnostics"]
    assert dict(diag.rows)["FAIR-Calib W4A4 (fair / late)"] == [0.0]
    assert len(diag.rows) == 4


def test_cli_prints_tables_and_fails_cleanly(sweep, tmp_path, capsys):
    assert report_main([str(sweep), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "tiny-dream: accuracy (%)" in out and f"html: {tmp_path / 'o' / 'report.html'}" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    assert "no results.json found" in capsys.readouterr().err
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "no such run or sweep folder" in capsys.readouterr().err


def test_report_over_only_failed_or_foreign_results_exits_1(tmp_path, capsys):
    """A results.json that is a JSON list (or not JSON) is an unreadable run, listed, not a traceback; a report
    in which no run finished is not a success."""
    for name, text in [("failed", '{"status": "failed", "error": "CUDA out of memory"}'), ("list", "[1, 2]"),
                       ("binary", "\udcff\udcfe")]:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(text, errors="surrogateescape")
    records = {r.path.name: r for r in collect_runs([tmp_path / "runs"])}
    assert records["list"].status == "unreadable" and "holds a JSON list, not an object" in records["list"].error
    assert records["binary"].status == "unreadable" and records["failed"].error == "CUDA out of memory"
    assert report_main([str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "none of the 3 runs finished (2 unreadable, 1 failed)" in err and "Traceback" not in err
