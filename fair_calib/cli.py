"""`fair-calib` / `python -m fair_calib`: the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fair_calib import CONF_DIR
from fair_calib.registry import ConfigError


def _quiet_libraries() -> None:
    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "wandb", "urllib3", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float | None:
    from fair_calib.pipeline import Pipeline

    _quiet_libraries()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = Pipeline(cfg, run_dir).run()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            (run_dir / "error.txt").write_text(f"{err}\n")
            return None
        sys.exit(2)
    # the sweep objective (Optuna and friends): the quantized model's average
    return results["summary"].get("quant/avg")


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
