"""`fair-calib` / `python -m fair_calib`: the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fair_calib import CONF_DIR
from fair_calib.registry import ConfigError
from fair_calib.utils.io import write_json_atomic, write_text_atomic


def _quiet_libraries() -> None:
    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "wandb", "urllib3", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _group(cfg: DictConfig, hc) -> str | None:
    """W&B group: `group=` if given, else the experiment name, plus the sweep folder in multirun."""
    if cfg.get("group"):
        return str(cfg.group)
    parts = [str(cfg.experiment_name)] if cfg.get("experiment_name") else []
    if hc.mode.name == "MULTIRUN":
        parts.append(Path(hc.sweep.dir).name)
    return "/".join(parts) or None


def _record_failure(run_dir: Path, err: BaseException, config_hash: str | None) -> None:
    """One failed job of a sweep: error.txt (the traceback) and a results.json with status "failed"."""
    text = "".join(traceback.format_exception(err))
    write_text_atomic(run_dir / "error.txt", text)
    write_json_atomic(run_dir / "results.json", {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                                 "run": {"config_hash": config_hash}})


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from fair_calib.pipeline import Pipeline

    _quiet_libraries()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    pipeline = None
    try:
        pipeline = Pipeline(cfg, run_dir, choices=dict(hc.runtime.choices), group=_group(cfg, hc))
        results = pipeline.run()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if multirun:
            _record_failure(run_dir, err, None)
            return None
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - one failed job must not stop the other jobs of a sweep
        if not multirun:
            raise
        print(f"error: job {hc.job.num} failed ({type(err).__name__}: {err}); see {run_dir / 'error.txt'}",
              file=sys.stderr)
        _record_failure(run_dir, err, pipeline.config_hash if pipeline else None)
        return None
    # the sweep objective (Optuna and friends): the quantized model's average
    return results["summary"].get("quant/avg")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
