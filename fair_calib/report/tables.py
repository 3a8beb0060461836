"""The paper's table layouts from run records: rows = methods (or ablation settings), columns = tasks + Avg.

Cells hold percentages; a cell no run measured is missing and printed as "–" (Markdown/HTML) or "--"
(LaTeX). The average is taken only over complete rows, so a missing task never hides in a mean.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fair_calib.report.collect import RunRecord

METHOD_ORDER = ("FP", "RTN", "GPTQ", "SmoothQuant", "AWQ", "QuaRot", "FlatQuant", "FAIR-Calib")
MISSING_MD, MISSING_TEX = "–", "--"


@dataclass
class Table:
    title: str
    header: list[str]  # first entry names the row-label column
    rows: list[tuple[str, list[float | None]]] = field(default_factory=list)
    digits: int | None = 1  # None: 3 significant digits
    best: bool = True  # bold the best value of each column (higher is better)

    reference: tuple[str, ...] = ("FP",)  # rows that never compete for the best value

    def _best(self) -> list[float | None]:
        """Per column, the highest value among the competing rows, or None when they all tie."""
        competing = [vals for label, vals in self.rows if label not in self.reference]
        if not self.best or not competing:
            return []
        best = []
        for col in zip(*competing):
            present = [v for v in col if v is not None]
            best.append(max(present) if len(set(present)) > 1 else None)
        return best

    def _format(self, v: float) -> str:
        return f"{v:.{self.digits}f}" if self.digits is not None else f"{v:.3g}"

    def _cells(self, missing: str, bold: Callable[[str], str]) -> list[list[str]]:
        best = self._best()
        out = []
        for label, vals in self.rows:
            cells = [label]
            for j, v in enumerate(vals):
                text = missing if v is None else self._format(v)
                if v is not None and best and best[j] is not None and v == best[j] and label not in self.reference:
                    text = bold(text)
                cells.append(text)
            out.append(cells)
        return out

    def to_markdown(self) -> str:
        cells = self._cells(MISSING_MD, lambda s: f"**{s}**")
        widths = [max(len(r[i]) for r in [self.header] + cells) for i in range(len(self.header))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([f"**{self.title}**", "", line(self.header), sep] + [line(r) for r in cells])

    def to_latex(self) -> str:
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
        cells = self._cells(MISSING_TEX, lambda s: rf"\textbf{{{s}}}")
        spec = "l" + "r" * (len(self.header) - 1)
        lines = [rf"% {self.title}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                 " & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        lines += [" & ".join([esc(r[0])] + r[1:]) + r" \\" for r in cells]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines)

    def to_html(self) -> str:
        cells = self._cells(MISSING_MD, lambda s: f"<b>{s}</b>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{c if '<b>' in c else html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in cells)
        return f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def task_label(task: str) -> str:
    return task.removeprefix("tinyreason_")


def primary_metric(metrics: dict[str, float], headline: str | None = None) -> float | None:
    """The headline number of one task: the metric its config names (results.json `headline`); for results
    written before the headline was recorded, exact_match / acc / acc_norm / pass@1 in that order."""
    if headline is not None:
        return metrics.get(headline)
    for key in ("exact_match", "acc", "acc_norm", "pass@1", "pass_at_1"):
        if key in metrics:
            return metrics[key]
    return next(iter(metrics.values()), None)


def _method_rank(label: str) -> tuple[int, str]:
    base = label.split(" ")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


def _tasks(records: Sequence[RunRecord]) -> list[str]:
    tasks: list[str] = []
    for r in records:
        for column in r.metrics.values():
            tasks += [t for t in column if t not in tasks]
    return tasks


def _row(values_by_task: dict[str, float | None], tasks: list[str]) -> list[float | None]:
    vals = [None if values_by_task.get(t) is None else 100 * values_by_task[t] for t in tasks]
    done = [v for v in vals if v is not None]
    return vals + [sum(done) / len(done) if done and len(done) == len(vals) else None]


def models(records: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.model for r in records if r.ok))


def method_tables(records: Sequence[RunRecord]) -> list[Table]:
    """One block per model: FP and every quantized column of every run (deduplicated by label)."""
    tables = []
    ok = [r for r in records if r.ok]
    for model in models(ok):
        runs = [r for r in ok if r.model == model]
        tasks = _tasks(runs)
        columns: dict[str, dict[str, float | None]] = {}
        for r in runs:
            for label, by_task in r.metrics.items():
                if label in columns:
                    continue
                columns[label] = {t: primary_metric(m, r.headline.get(t)) for t, m in by_task.items()}
        table = Table(f"{model}: accuracy (%)", ["method"] + [task_label(t) for t in tasks] + ["Avg"])
        for label in sorted(columns, key=_method_rank):
            table.rows.append((label, _row(columns[label], tasks)))
        tables.append(table)
    return tables


def knob_tables(records: Sequence[RunRecord], key: Callable[[RunRecord], str | None], title: str,
                name: str) -> list[Table]:
    """Ablation layout: per model, one row per value of `key` (runs whose key is None are left out),
    columns = tasks of the run's own quantized column + Avg."""
    tables = []
    ok = [r for r in records if r.ok and key(r) is not None]
    for model in models(ok):
        runs = [r for r in ok if r.model == model]
        tasks = _tasks(runs)
        table = Table(f"{model}: {title} (%)", [name] + [task_label(t) for t in tasks] + ["Avg"])
        seen: set[str] = set()
        for r in runs:
            label = str(key(r))
            if label in seen or r.method not in r.metrics:
                continue
            seen.add(label)
            values = {t: primary_metric(m, r.headline.get(t)) for t, m in r.metrics[r.method].items()}
            table.rows.append((label, _row(values, tasks)))
        tables.append(table)
    return tables


DIAG_COLUMNS = (("flip_rate", "flip rate"), ("mean_disagree", "post-commit mismatch"),
                ("never_agree", "never agree"), ("lag_mean_q", "lag (steps)"),
                ("selection_disagreement", "selection disagr."), ("frontier_kl", "frontier KL"),
                ("hidden_mse_unweighted", "hidden MSE"))


def diagnostics_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Per model: the frontier diagnostics of each quantized run (lower is better, so nothing in bold)."""
    tables = []
    ok = [r for r in records if r.ok and any(k.startswith("diag/") for k in r.summary)]
    for model in models(ok):
        runs = sorted((r for r in ok if r.model == model), key=lambda r: _method_rank(r.method))
        cols = [(k, n) for k, n in DIAG_COLUMNS if any(r.diag(k) is not None for r in runs)]
        table = Table(f"{model}: frontier diagnostics against the FP teacher", ["method"] + [n for _, n in cols],
                      digits=None, best=False)
        settings: dict[str, set] = {}
        for r in runs:
            settings.setdefault(r.method, set()).add((r.weighting, r.schedule))
        seen: set[str] = set()
        for r in runs:  # one row per method, or per weighting / schedule where an ablation varies them
            varied = len(settings[r.method]) > 1 and r.schedule
            label = f"{r.method} ({r.weighting} / {r.schedule})" if varied else r.method
            if label in seen:
                continue
            seen.add(label)
            table.rows.append((label, [r.diag(k) for k, _ in cols]))
        tables.append(table)
    return tables


def timing_table(records: Sequence[RunRecord]) -> Table:
    """Wall time of each run's stages (seconds): calibration, prior, evaluation, total."""
    keys = ("prior_s", "quantize_s", "diagnostics_s", "eval_quant_s")
    table = Table("wall time per run (s)", ["model / method", "prior", "calibration", "diagnostics", "eval", "total"],
                  best=False)
    for r in sorted((r for r in records if r.ok), key=lambda r: (r.model, _method_rank(r.method))):
        label = f"{r.model} / {r.method}" + (f" ({r.weighting}, {r.schedule})" if r.schedule else "")
        table.rows.append((label, [r.timings.get(k) for k in keys] + [sum(r.timings.values())]))
    return table
