"""Run loggers: `logger=none` keeps only the run folder files; `logger=wandb` mirrors them to W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fair_calib.registry import register


@register("logger", "none")
class RunLogger:
    """Interface and no-op implementation."""

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None = None,
              tags: list[str] | None = None) -> None:
        self.run_dir = run_dir

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self, status: str = "ok") -> None:
        """End the run; `status` is ok, failed or interrupted."""


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (the form W&B's config panel filters on)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out
