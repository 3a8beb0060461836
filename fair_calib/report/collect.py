"""Read finished runs (results.json of run and sweep folders) into flat records for tables and figures."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fair_calib.pipeline import run_key

SKIP_DIRS = {"wandb", ".hydra", "samples", "diagnostics", "prior", "quantized_model"}


@dataclass
class RunRecord:
    """One job of a sweep: what was run (model, method, bits, knobs) and what it measured."""

    path: Path
    status: str
    model: str = "?"
    method: str = "?"  # table label of the quantized column, e.g. "FAIR-Calib W4A4"
    method_name: str = "custom"
    bits: str = ""
    weighting: str = "uniform"
    schedule: str | None = None
    n_probe: int | None = None
    experiment: str | None = None
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # column -> task -> metric
    headline: dict[str, str] = field(default_factory=dict)  # task -> headline metric key (results.json)
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)  # column -> task -> key -> docs
    seed: int = 0
    threads: int | None = None  # torch intra-op threads of the run: Stage II's bits can depend on it
    config_key: str = ""  # hash of the resolved config without seeds and volatile keys: the seeds of one row share it
    summary: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def diag(self, key: str) -> float | None:
        v = self.summary.get(f"diag/{key}")
        return float(v) if isinstance(v, int | float) else None


def _record(path: Path, data: dict[str, Any]) -> RunRecord:
    run = data.get("run") or {}
    config = data.get("config") or {}
    prior = config.get("prior") or {}
    rec = RunRecord(path=path.parent, status=str(data.get("status", "?")), error=data.get("error"))
    if not rec.ok:
        rec.model = str((config.get("model") or {}).get("label") or "?")
        return rec
    rec.model = str(run.get("model", "?"))
    rec.method = str(run.get("method", "?"))
    rec.method_name = str(run.get("method_name", run.get("quantizer", "custom")))
    rec.bits = str(run.get("bits", ""))
    rec.weighting = str(run.get("weighting", "uniform"))
    rec.experiment = run.get("experiment")
    if run.get("prior", "none") != "none":
        rec.schedule = prior.get("schedule")
        rec.n_probe = prior.get("n_probe")
    rec.metrics = data.get("metrics") or {}
    rec.headline = data.get("headline") or {}
    rec.scores = data.get("scores") or {}
    rec.seed = int(run.get("seed", config.get("seed", 0)) or 0)
    rec.threads = run.get("threads")
    rec.config_key = run_key(config, ignore=frozenset({"seed"})) if config else str(path.parent)
    rec.summary = data.get("summary") or {}
    rec.timings = data.get("timings") or {}
    return rec


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every results.json under the given run / sweep folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found.add(p.resolve())
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"no such run or sweep folder: {p}")
        for f in p.rglob("results.json"):
            if not SKIP_DIRS.intersection(f.relative_to(p).parts[:-1]):
                found.add(f.resolve())
    return sorted(found)


def collect_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Records of every run found; unreadable files become failed records (the report shows them)."""
    records = []
    for f in find_results(paths):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            records.append(RunRecord(path=f.parent, status="unreadable", error=str(err)))
            continue
        if not isinstance(data, dict):
            records.append(RunRecord(path=f.parent, status="unreadable",
                                     error=f"results.json holds a JSON {type(data).__name__}, not an object"))
            continue
        records.append(_record(f, data))
    return records


def records_from_wandb(path: str) -> list[RunRecord]:
    """Records of the finished runs of a W&B project ("entity/project"), read through the public API.

    Needs network access and a W&B key; the metrics come from each run's summary (`fp/...`, `quant/...`)."""
    import wandb

    api = wandb.Api()
    records = []
    for run in api.runs(path):
        summary = {k: v for k, v in dict(run.summary).items() if isinstance(v, int | float)}
        config = dict(run.config)
        results = {"status": "ok" if run.state == "finished" else str(run.state),
                   "run": {"model": (config.get("model") or {}).get("label", "?"), "method": run.name.split("/")[-1],
                           "method_name": (config.get("method") or {}).get("name", "custom"),
                           "weighting": (config.get("weighting") or {}).get("name", "uniform"),
                           "prior": (config.get("prior") or {}).get("name", "none"),
                           "experiment": config.get("experiment_name")},
                   "config": config, "summary": summary, "metrics": _metrics_from_summary(summary, run.name)}
        records.append(_record(Path(f"wandb/{run.id}/results.json"), results))
    return records


def _metrics_from_summary(summary: dict[str, float], name: str) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] in ("fp", "quant"):
            column = "FP" if parts[0] == "fp" else name.split("/")[-1]
            out.setdefault(column, {}).setdefault(parts[1], {})[parts[2]] = float(value)
    return out
