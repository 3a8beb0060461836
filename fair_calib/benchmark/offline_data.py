"""Which datasets a benchmark reads, and a local mirror of them for machines without network.

    python -m fair_calib.benchmark.offline_data list paper10             # dataset paths and configs
    python -m fair_calib.benchmark.offline_data download paper10 --data-dir /data/hf   # on a machine with network

`download` writes each dataset repository to `<data-dir>/<dataset path>` (a Hugging Face snapshot:
data files + README configs), which is where `benchmark.data_dir` (or FAIR_CALIB_DATA) looks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fair_calib import CONF_DIR
from fair_calib.benchmark.harness import DatasetRef, HarnessTask, dataset_refs, leaf_configs, task_manager
from fair_calib.registry import ConfigError


def benchmark_tasks(option: str) -> list[HarnessTask]:
    """The tasks of conf/benchmark/<option>.yaml (composed with Hydra, no model or sampler needed)."""
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / "benchmark" / f"{option}.yaml").is_file():
        valid = ", ".join(sorted(p.stem for p in (CONF_DIR / "benchmark").glob("*.yaml")))
        raise ConfigError(f"no benchmark config {option!r}; valid: {valid}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"benchmark={option}"])
    tasks = OmegaConf.to_container(cfg.benchmark, resolve=True).get("tasks") or {}
    if not tasks:
        raise ConfigError(f"benchmark={option} names no lm-eval tasks")
    return [HarnessTask(**{"task": key, **spec}) for key, spec in tasks.items()]


def required_datasets(option: str) -> list[DatasetRef]:
    refs: dict[tuple[str, str | None], DatasetRef] = {}
    for task in benchmark_tasks(option):
        manager = task_manager(tuple(task.folders) if task.folders else None)
        for ref in dataset_refs(leaf_configs(manager, task.task)):
            refs.setdefault((ref.path, ref.name), ref)
    return list(refs.values())


def download(refs: list[DatasetRef], data_dir: Path) -> list[Path]:
    """Snapshot every dataset repository into data_dir/<path> (needs network)."""
    from huggingface_hub import snapshot_download

    done = []
    for path in dict.fromkeys(r.path for r in refs):
        target = data_dir / path
        snapshot_download(repo_id=path, repo_type="dataset", local_dir=str(target))
        done.append(target)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["list", "download"])
    parser.add_argument("benchmark", help="a conf/benchmark option, e.g. paper10 or gsm8k")
    parser.add_argument("--data-dir", type=Path, default=None, help="mirror root (download)")
    args = parser.parse_args(argv)
    try:
        refs = required_datasets(args.benchmark)
        if args.action == "list":
            for ref in refs:
                print(f"{ref.path}\t{ref.name or '-'}\t{ref.task}")
            return 0
        if args.data_dir is None:
            raise ConfigError("download needs --data-dir <mirror root>")
        for target in download(refs, args.data_dir):
            print(f"wrote {target}")
        print(f"offline runs: benchmark.data_dir={args.data_dir} (or FAIR_CALIB_DATA={args.data_dir})")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - no network, unknown repository: one line, not a traceback
        print(f"error: download failed ({type(err).__name__}: {str(err).strip().splitlines()[0]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
