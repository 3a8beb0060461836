"""The paper's table layouts from run records: rows = methods (or ablation settings), columns = tasks + Avg.

Cells hold percentages; a cell no run measured is missing and printed as "–" (Markdown/HTML) or "--"
(LaTeX). The average is taken only over complete rows, so a missing task never hides in a mean.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fair_calib.registry import ConfigError
from fair_calib.report.cells import Cell, Row, Seeded, compare
from fair_calib.report.collect import RunRecord

METHOD_ORDER = ("FP", "RTN", "GPTQ", "SmoothQuant", "AWQ", "QuaRot", "FlatQuant", "FAIR-Calib")
MISSING_MD, MISSING_TEX = "–", "--"


Value = Cell | float | str | None


def number(v: Value) -> float | None:
    """The number a cell stands for (a Cell's mean); None for missing cells and text."""
    if isinstance(v, Cell):
        return v.mean
    return float(v) if isinstance(v, int | float) else None


@dataclass
class Table:
    title: str
    header: list[str]  # first entry names the row-label column
    rows: list[tuple[str, list[Value]]] = field(default_factory=list)
    digits: int | None = 1  # None: 3 significant digits
    best: bool = True  # bold the best value of each numeric column (higher is better)
    notes: list[str] = field(default_factory=list)  # printed under the table
    best_columns: int | None = None  # only the first k value columns compete for bold (None: all)

    reference: tuple[str, ...] = ("FP",)  # rows that never compete for the best value

    def _best(self) -> list[float | None]:
        """Per column, the highest number among the competing rows, or None when they all tie."""
        competing = [vals for label, vals in self.rows if label not in self.reference]
        if not self.best or not competing:
            return []
        best = []
        for j, col in enumerate(zip(*competing)):
            if self.best_columns is not None and j >= self.best_columns:
                best.append(None)
                continue
            present = [number(v) for v in col if isinstance(v, Cell | int | float)]
            best.append(max(present) if len(set(present)) > 1 else None)  # type: ignore[type-var]
        return best

    def _format(self, v: Value) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        fmt = (lambda x: f"{x:.{self.digits}f}") if self.digits is not None else (lambda x: f"{x:.3g}")
        if not isinstance(v, Cell):
            return fmt(v)
        text = fmt(v.mean)
        if v.sd is not None:
            text += f" ±{fmt(v.sd)}"
        if v.low is not None and v.high is not None:
            text += f" [{fmt(v.low)}, {fmt(v.high)}]"
        return text

    def _cells(self, missing: str, bold: Callable[[str], str]) -> list[list[str]]:
        best = self._best()
        out = []
        for label, vals in self.rows:
            cells = [label]
            for j, v in enumerate(vals):
                text = missing if v is None else self._format(v)
                top = best[j] if best and j < len(best) else None
                if top is not None and not isinstance(v, str) and number(v) == top and label not in self.reference:
                    text = bold(text)
                cells.append(text)
            out.append(cells)
        return out

    def column(self, name: str) -> list[Value]:
        """The values of the column headed `name`, row by row."""
        k = self.header.index(name) - 1
        return [vals[k] for _, vals in self.rows]

    def to_markdown(self) -> str:
        cells = self._cells(MISSING_MD, lambda s: f"**{s}**")
        widths = [max(len(r[i]) for r in [self.header] + cells) for i in range(len(self.header))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        notes = ["", *self.notes] if self.notes else []
        return "\n".join([f"**{self.title}**", "", line(self.header), sep] + [line(r) for r in cells] + notes)

    def to_latex(self) -> str:
        esc = lambda s: (s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
                         .replace("±", r"$\pm$").replace("Δ", r"$\Delta$"))
        cells = self._cells(MISSING_TEX, lambda s: rf"\textbf{{{s}}}")
        spec = "l" + "r" * (len(self.header) - 1)
        lines = [rf"% {self.title}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                 " & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        lines += [" & ".join([esc(r[0])] + [c if c.startswith(r"\textbf") else esc(c) for c in r[1:]]) + r" \\"
                  for r in cells]
        lines += [r"\bottomrule", r"\end{tabular}"] + [f"% {n}" for n in self.notes]
        return "\n".join(lines)

    def to_html(self) -> str:
        cells = self._cells(MISSING_MD, lambda s: f"<b>{html.escape(s)}</b>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{c if c.startswith('<b>') else html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in cells)
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in self.notes)
        return (f"<h3>{html.escape(self.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"{notes}")


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


def models(records: Sequence[RunRecord]) -> list[str]:
    return list(dict.fromkeys(r.model for r in records if r.ok))


# ---- rows of seeds ------------------------------------------------------------------------------
HEADLINE = None  # `metric=None`: each task's headline metric (results.json `headline`)
DEFAULT_REFERENCES = {"FAIR-Calib": "FlatQuant", "*": "FP"}  # row method -> the method it is compared against


@dataclass(frozen=True)
class Metric:
    """What a table shows: the headline (percent) or a named metric key such as answer_ll (raw units)."""

    key: str | None = HEADLINE
    title: str = "accuracy (%)"
    scale: float = 100.0
    digits: int = 1


ACCURACY = Metric()
ANSWER_LL = Metric("answer_ll", "answer log-likelihood (nats, higher is better)", 1.0, 2)


def _add(row: Row, r: RunRecord, column: str, metric: Metric) -> None:
    """Put the tasks of `column` of run `r` into `row` as seed `r.seed` (the first run of a seed wins)."""
    for task, m in r.metrics.get(column, {}).items():
        key = r.headline.get(task) if metric.key is None else metric.key
        value = primary_metric(m, key) if metric.key is None else m.get(metric.key)
        entry = row.tasks.setdefault(task, Seeded())
        if value is None or r.seed in entry.values:
            continue
        entry.values[r.seed] = float(value)
        docs = (r.scores.get(column) or {}).get(task, {}).get(key) if key else None
        if docs:
            entry.docs[r.seed] = list(docs)


def _method_rows(runs: Sequence[RunRecord], metric: Metric) -> dict[str, Row]:
    """label -> Row over the runs' columns. The seeds of a row come from runs of one config (up to the seed):
    the first run that brings a label fixes it (FP, identical in every run of a model, takes any run)."""
    rows: dict[str, Row] = {}
    owner: dict[str, str] = {}
    for r in runs:
        for label in r.metrics:
            if owner.setdefault(label, r.config_key) != r.config_key and label != "FP":
                continue
            _add(rows.setdefault(label, Row(label)), r, label, metric)
    return rows


def parse_references(specs: Sequence[str] | None) -> dict[str, str]:
    """["FAIR-Calib=FlatQuant", "*=FP"] -> {row method: reference method}; a ConfigError for a bad spec."""
    out: dict[str, str] = {}
    for spec in specs or []:
        method, sep, ref = spec.partition("=")
        if not sep or not method.strip() or not ref.strip():
            raise ConfigError(f"--reference {spec!r}: write METHOD=REFERENCE, e.g. --reference FAIR-Calib=FlatQuant "
                              "(or '*=FP' for every other row)")
        out[method.strip()] = ref.strip()
    return out


def _base(label: str) -> str:
    return label.split(" ")[0]


def _find_reference(label: str, rows: Sequence[str], refs: dict[str, str], explicit: set[str],
                    model: str) -> str | None:
    """The row `label` is compared with: refs[method] (or refs['*']) at the same bit settings; FP is
    always the fallback of a default reference. A reference the user named that no run has is an error."""
    method = _base(label)
    key = method if method in refs else "*"
    want = refs.get(key)
    if want is None or want == method:
        return None
    bits = label.partition(" ")[2]
    for cand in rows:
        if _base(cand) == want and (want == "FP" or cand.partition(" ")[2] == bits):
            return cand
    if key in explicit:
        raise ConfigError(f"reference {want!r} for {label} is not among the runs of {model} (rows: {', '.join(rows)}); "
                          f"add method={want.lower()} to the sweep or pass --reference {key}=<one of the rows>")
    return None if want == "FP" or "FP" not in rows or label == "FP" else "FP"


def _comparison_cells(row: Row, ref: Row | None, tasks: Sequence[str], scale: float, digits: int) -> list[Value]:
    """[reference, Δ Avg [CI], p, MDD] of a row (text cells; '*' marks a CI that excludes 0)."""
    if ref is None:
        return [None, None, None, None]
    comp = compare(row, ref, tasks)
    if comp is None:
        return [_base(ref.label), None, None, None]
    d = comp.diff
    mark = "*" if d.significant else ""
    f = lambda v: f"{scale * v:+.{digits}f}"  # noqa: E731
    return [_base(ref.label), f"{f(d.mean)} [{f(d.ci_low)}, {f(d.ci_high)}]{mark}", f"{d.p_value:.3f}",
            None if comp.mdd is None else f"{scale * comp.mdd:.{digits}f}"]


def _note(metric: Metric, any_seeds: bool, compared: bool) -> list[str]:
    notes = ["cells: mean" + (" ±sd over seeds" if any_seeds else "") +
             " [95% bootstrap CI over documents" + (" and seeds" if any_seeds else "") + "]; n = seeds"]
    if compared:
        notes.append("Δ Avg: paired bootstrap against the reference row on the same documents (* = CI excludes 0); "
                     "p: two-sided; MDD: minimum detectable difference of the pair (80% power, alpha 0.05)")
    return notes


def _threads_note(runs: Sequence[RunRecord]) -> str:
    """Which torch thread counts the runs used: calibration bits can differ between thread counts."""
    counts = sorted({r.threads for r in runs if r.threads is not None})
    if not counts:
        return "threads: not recorded"
    if len(counts) == 1:
        return f"threads: {counts[0]} in every run"
    return (f"threads: mixed ({', '.join(map(str, counts))}); calibration results can differ between thread "
            "counts, rerun with one threads= value to compare bit for bit")


def _table(title: str, name: str, rows: Sequence[Row], tasks: list[str], metric: Metric,
           refs: dict[str, str] | None, explicit: set[str], model: str, fixed_ref: str | None = None) -> Table:
    table = Table(title, [name] + [task_label(t) for t in tasks] + ["Avg", "n"], digits=metric.digits)
    labels = [r.label for r in rows]
    by_label = {r.label: r for r in rows}
    extra: list[list[Value]] = []
    for row in rows:
        ref_label = fixed_ref if fixed_ref is not None else _find_reference(row.label, labels, refs or {}, explicit,
                                                                            model)
        ref = by_label.get(ref_label) if ref_label and ref_label != row.label else None
        cells = [row.cell(t) for t in tasks] + [row.average(tasks)]
        values: list[Value] = [None if c is None else c.scaled(metric.scale) for c in cells]
        table.rows.append((row.label, values + [len(row.seeds)]))
        extra.append(_comparison_cells(row, ref, tasks, metric.scale, metric.digits))
    compared = any(e[1] is not None for e in extra)
    if compared:
        table.header += ["ref", "Δ Avg [95% CI]", "p", "MDD"]
        table.rows = [(label, vals + e) for (label, vals), e in zip(table.rows, extra, strict=True)]
    table.notes = _note(metric, any(len(r.seeds) > 1 for r in rows), compared)
    table.best_columns = len(tasks) + 1
    return table


def method_tables(records: Sequence[RunRecord], metric: Metric = ACCURACY,
                  references: dict[str, str] | None = None) -> list[Table]:
    """One block per model: FP and every quantized column of every run, the seeds of each row grouped;
    each row is compared with its reference (`references`, default FAIR-Calib -> FlatQuant, others -> FP)."""
    refs = {**DEFAULT_REFERENCES, **(references or {})}
    explicit = set(references or {})
    tables = []
    ok = [r for r in records if r.ok]
    for model in models(ok):
        runs = [r for r in ok if r.model == model]
        rows = _method_rows(runs, metric)
        tasks = [t for t in _tasks(runs) if any(t in row.tasks for row in rows.values())]
        present = [rows[label] for label in sorted(rows, key=_method_rank) if rows[label].tasks]
        if not present:
            continue
        table = _table(f"{model}: {metric.title}", "method", present, tasks, metric, refs, explicit, model)
        table.notes.append(_threads_note(runs))
        tables.append(table)
    return tables


def knob_tables(records: Sequence[RunRecord], key: Callable[[RunRecord], str | None], title: str,
                name: str, metric: Metric = ACCURACY) -> list[Table]:
    """Ablation layout: per model, one row per value of `key` (runs whose key is None are left out) over
    its seeds, columns = tasks of the run's own quantized column + Avg; rows compared with the first row."""
    tables = []
    ok = [r for r in records if r.ok and key(r) is not None]
    for model in models(ok):
        runs = [r for r in ok if r.model == model]
        tasks = _tasks(runs)
        rows: dict[str, Row] = {}
        owner: dict[str, str] = {}
        for r in runs:
            label = str(key(r))
            if r.method not in r.metrics or owner.setdefault(label, r.config_key) != r.config_key:
                continue
            _add(rows.setdefault(label, Row(label)), r, r.method, metric)
        present = [row for row in rows.values() if row.tasks]
        if not present:
            continue
        unit = "%" if metric.key is None else metric.title
        table = _table(f"{model}: {title} ({unit})", name, present, tasks, metric, None, set(), model,
                       fixed_ref=present[0].label)
        table.reference = ()
        tables.append(table)
    return tables


DIAG_COLUMNS = (("flip_rate", "flip rate"), ("mean_disagree", "post-commit mismatch"),
                ("never_agree", "never agree"), ("lag_mean_q", "lag (steps)"),
                ("selection_disagreement", "selection disagr."), ("frontier_kl", "frontier KL"),
                ("hidden_mse_unweighted", "hidden MSE"))


def _diag_cell(r: RunRecord, key: str) -> Value:
    """A diagnostic scalar, with its CI over prompts when the run recorded one (`diag/<key>_ci_low/_high`)."""
    value, low, high = r.diag(key), r.diag(f"{key}_ci_low"), r.diag(f"{key}_ci_high")
    if value is None or low is None or high is None:
        return value
    return Cell(value, low, high)


def diagnostics_tables(records: Sequence[RunRecord]) -> list[Table]:
    """Per model: the frontier diagnostics of each quantized run (lower is better, so nothing in bold)."""
    tables = []
    ok = [r for r in records if r.ok and any(k.startswith("diag/") for k in r.summary)]
    for model in models(ok):
        runs = sorted((r for r in ok if r.model == model), key=lambda r: _method_rank(r.method))
        cols = [(k, n) for k, n in DIAG_COLUMNS if any(r.diag(k) is not None for r in runs)]
        table = Table(f"{model}: frontier diagnostics against the FP teacher", ["method"] + [n for _, n in cols],
                      digits=None, best=False, notes=["cells: value [95% bootstrap CI over prompts] where recorded"])
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
            table.rows.append((label, [_diag_cell(r, k) for k, _ in cols]))
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
