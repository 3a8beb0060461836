"""Assemble the report of one or more sweep folders: Markdown, LaTeX, a self-contained HTML page, PNGs."""

from __future__ import annotations

import base64
import datetime
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fair_calib.report.collect import RunRecord
from fair_calib.report.figures import ablation_figure, diagnostics_figure, probe_budget_figure
from fair_calib.report.tables import (
    ANSWER_LL,
    Table,
    diagnostics_tables,
    knob_tables,
    method_tables,
    timing_table,
)
from fair_calib.utils.io import write_text_atomic


@dataclass
class Report:
    sections: list[tuple[str, list[Table]]] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    failed: list[RunRecord] = field(default_factory=list)
    n_runs: int = 0

    def to_markdown(self) -> str:
        out = [f"# fair-calib report ({self.n_runs} runs)", ""]
        for title, tables in self.sections:
            out += [f"## {title}", ""]
            for t in tables:
                out += [t.to_markdown(), ""]
        for name, path in self.figures.items():
            out += [f"![{name}]({path.name})", ""]
        if self.failed:
            out += ["## Failed runs", ""] + [f"- `{r.path}`: {r.error}" for r in self.failed] + [""]
        return "\n".join(out)

    def to_latex(self) -> str:
        out = ["% fair-calib report: paste into a document with \\usepackage{booktabs}"]
        for title, tables in self.sections:
            out += [f"% ---- {title}"] + [t.to_latex() for t in tables]
        return "\n\n".join(out) + "\n"

    def to_html(self) -> str:
        style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
                 "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
                 "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}"
                 "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fair-calib report</title>"
                 f"<style>{style}</style></head><body><h1>fair-calib report</h1>"
                 f"<p>{self.n_runs} runs, generated {stamp}.</p>"]
        for title, tables in self.sections:
            parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(t.to_html() for t in tables))
        for name, path in self.figures.items():
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' "
                         f"src='data:image/png;base64,{data}'>")
        if self.failed:
            items = "".join(f"<li><code>{html.escape(str(r.path))}</code>: {html.escape(str(r.error))}</li>"
                            for r in self.failed)
            parts.append(f"<h2>Failed runs</h2><ul>{items}</ul>")
        return "".join(parts) + "</body></html>\n"


def _varies(records: Sequence[RunRecord], attr: str) -> bool:
    return len({getattr(r, attr) for r in records if r.ok and r.method_name == "fair_calib"}) > 1


WEIGHTING_ORDER = ("uniform", "frontier", "reliability", "fair")
SCHEDULE_ORDER = ("early", "flat", "late")


def _ablation_row(r: RunRecord) -> bool:
    """FAIR-Calib runs, and FlatQuant's as the uniform row: weighting=uniform ignores the prior, so FAIR-Calib
    with uniform weights calibrates exactly as FlatQuant (tests/test_cli.py checks it) and a sweep with both
    needs no uniform jobs of its own."""
    return r.method_name == "fair_calib" or (r.method_name == "flatquant" and r.weighting == "uniform")


def _ablation_label(r: RunRecord) -> str:
    """'uniform (= FlatQuant)' for every uniform run (the schedule changes nothing there), else
    'weighting / schedule'."""
    return "uniform (= FlatQuant)" if r.weighting == "uniform" else f"{r.weighting} / {r.schedule}"


def _ablation_order(r: RunRecord) -> tuple[int, int]:
    w = WEIGHTING_ORDER.index(r.weighting) if r.weighting in WEIGHTING_ORDER else len(WEIGHTING_ORDER)
    s = SCHEDULE_ORDER.index(r.schedule) if r.schedule in SCHEDULE_ORDER else len(SCHEDULE_ORDER)
    return w, s


def build_report(records: Sequence[RunRecord], out_dir: str | Path,
                 references: dict[str, str] | None = None) -> tuple[Report, dict[str, Path]]:
    """Tables and figures of the records, written to out_dir as report.md / report.tex / report.html.

    `references` maps a row's method to the method it is compared with (default FAIR-Calib -> FlatQuant,
    every other row -> FP); a named reference that no run has is a ConfigError."""
    out = Path(out_dir)
    ok = [r for r in records if r.ok]
    if not records:
        raise ValueError("no results.json found: point the report at a run or sweep folder that has finished jobs")
    report = Report(failed=[r for r in records if not r.ok], n_runs=len(records))
    report.sections.append(("Accuracy", method_tables(ok, references=references)))
    likelihood = [t for t in method_tables(ok, ANSWER_LL, references) if t.rows]
    if likelihood:
        report.sections.append(("Answer log-likelihood (continuous metric)", likelihood))
    if _varies(ok, "weighting") or _varies(ok, "schedule"):
        fair = sorted((r for r in ok if _ablation_row(r)), key=_ablation_order)
        knob = _ablation_label
        tables = knob_tables(fair, knob, "weighting ablation", "weighting / schedule")
        report.sections.append(("Weighting ablation (FAIR-Calib)", tables))
        ll = [t for t in knob_tables(fair, knob, "weighting ablation", "weighting / schedule", ANSWER_LL) if t.rows]
        if ll:
            report.sections.append(("Weighting ablation: answer log-likelihood", ll))
        if fig := ablation_figure(tables, out / "ablation.png"):
            report.figures["weighting ablation"] = fig
    if _varies(ok, "n_probe"):
        fair = sorted((r for r in ok if r.method_name == "fair_calib"), key=lambda r: r.n_probe or 0)
        report.sections.append(("Probe budget", knob_tables(fair, lambda r: r.n_probe, "probe budget", "n_probe")))
        if fig := probe_budget_figure(fair, out / "probe_budget.png"):
            report.figures["probe budget"] = fig
    diag = diagnostics_tables(ok)
    if any(t.rows for t in diag):
        report.sections.append(("Frontier diagnostics", diag))
        if fig := diagnostics_figure(diag, out / "diagnostics.png"):
            report.figures["frontier diagnostics"] = fig
    if ok:
        report.sections.append(("Wall time", [timing_table(ok)]))
    files = {
        "markdown": write_text_atomic(out / "report.md", report.to_markdown()),
        "latex": write_text_atomic(out / "report.tex", report.to_latex()),
        "html": write_text_atomic(out / "report.html", report.to_html()),
    }
    return report, files
