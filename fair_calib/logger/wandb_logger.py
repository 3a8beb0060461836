"""Weights & Biases logger: offline unless a key is configured (WANDB_API_KEY or `wandb login`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fair_calib.logger.base import RunLogger, flatten
from fair_calib.registry import register

log = logging.getLogger(__name__)
MODES = ("auto", "offline", "online", "disabled")
EXIT_CODES = {"ok": 0, "failed": 1, "interrupted": 130}


@register("logger", "wandb")
class WandbLogger(RunLogger):
    def __init__(self, project: str = "fair-calib", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None) -> None:
        if mode not in MODES:
            from fair_calib.registry import ConfigError

            raise ConfigError(f"logger.mode={mode} unknown; valid: {', '.join(MODES)}")
        self.project, self.entity, self.mode = project, entity, mode
        self.group, self.tags = group, list(tags or [])
        self.run = None

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None = None,
              tags: list[str] | None = None) -> None:
        import wandb

        super().start(run_dir, config, name, group, tags)
        os.environ.setdefault("WANDB_SILENT", "true")
        mode = self.resolved_mode()
        if mode != "online":  # offline = no network at all: W&B's process-wide telemetry reads WANDB_MODE, not
            os.environ["WANDB_MODE"] = mode  # the run's mode, and looked up its host otherwise
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=mode, dir=str(run_dir), name=name,
            group=self.group or group, tags=sorted(set(self.tags + list(tags or []))), config=flatten(config),
            reinit="finish_previous", settings=wandb.Settings(console="off", silent=True),
        )

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics)
            for k, v in metrics.items():
                self.run.summary[k] = v

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def finish(self, status: str = "ok") -> None:
        """An interrupted or failed run ends with a non-zero exit code (W&B marks it failed, not finished) and
        `status` in its summary, so a dashboard never shows a killed run as complete."""
        if self.run is not None:
            self.run.summary["status"] = status
            self.run.finish(exit_code=EXIT_CODES.get(status, 1))
            self.run = None
