"""Datasets without network: which datasets a benchmark reads, reading them offline, and a local mirror.

In an evaluation (`harness.HarnessBenchmark`): `hf_offline` keeps the Hugging Face libraries off the network,
`local_mirror` reads `data_dir/<dataset path>` (e.g. `data_dir/openai/gsm8k`) where that folder exists,
`check_datasets` stops with one line (`DatasetUnavailableError`, `missing_dataset_message`) for a dataset
neither in the mirror nor in the cache, and `load_error` words what lm-eval raised while building a task.

    python -m fair_calib.benchmark.offline_data list paper10             # dataset paths and configs
    python -m fair_calib.benchmark.offline_data download paper10 --data-dir /data/hf   # on a machine with network

`download` writes each dataset repository to `<data-dir>/<dataset path>` (a Hugging Face snapshot:
data files + README configs), which is where `benchmark.data_dir` (or FAIR_CALIB_DATA) looks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from fair_calib.registry import ConfigError

if TYPE_CHECKING:
    from fair_calib.benchmark.harness import HarnessTask


class DatasetUnavailableError(ConfigError):
    """A task's dataset (or another resource it loads) is not available offline."""


@dataclass(frozen=True)
class DatasetRef:
    path: str
    name: str | None
    task: str  # a leaf task that reads it (for the message)


def leaf_configs(manager, name: str) -> list[dict[str, Any]]:
    """The raw YAML configs (functions unresolved) of every leaf task under a task / group / tag name."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(spec: str | Mapping[str, Any]) -> None:
        key = spec if isinstance(spec, str) else str(spec.get("task") or spec.get("group"))
        if key in seen:
            return
        seen.add(key)
        entry = manager.task_index.get(key)
        if entry is None:
            if isinstance(spec, Mapping) and "task" in spec:
                out.append(dict(spec))
            return
        if entry.kind == Kind.TAG:
            for child in sorted(entry.tags):
                walk(child)
            return
        cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
        if entry.kind == Kind.GROUP:
            for child in cfg.get("task") or []:
                walk(child)
        else:
            out.append(cfg if isinstance(spec, str) else {**cfg, **spec})

    walk(name)
    return out


def dataset_refs(configs: Sequence[Mapping[str, Any]]) -> list[DatasetRef]:
    refs: dict[tuple[str, str | None], DatasetRef] = {}
    for cfg in configs:
        path = cfg.get("dataset_path")
        if path and not (cfg.get("dataset_kwargs") or {}).get("data_files"):
            refs.setdefault((str(path), cfg.get("dataset_name")), DatasetRef(str(path), cfg.get("dataset_name"),
                                                                             str(cfg.get("task"))))
    return list(refs.values())


def missing_dataset_message(ref: DatasetRef, data_dir: str | None) -> str:
    config = f" (config {ref.name})" if ref.name else ""
    name = f", {ref.name!r}" if ref.name else ""
    root = data_dir or "<data_dir>"
    return (f"task {ref.task}: dataset {ref.path}{config} is not available offline; provide local files with "
            f"`hf download --repo-type dataset {ref.path} --local-dir {Path(root) / ref.path}` on a machine with "
            f"network and benchmark.data_dir={root} (or FAIR_CALIB_DATA), or fill the Hugging Face cache there with "
            f"datasets.load_dataset({ref.path!r}{name}) and copy ~/.cache/huggingface to HF_HOME here")


def check_datasets(refs: Sequence[DatasetRef], data_dir: str | None, known: set | None = None) -> None:
    """Raise DatasetUnavailableError (one line) for the first dataset neither in the local mirror nor the cache.
    `known`: (path, name) pairs already found, skipped and extended (a benchmark checks before every run)."""
    import datasets

    known = set() if known is None else known
    for ref in refs:
        if (ref.path, ref.name) in known or (data_dir and (Path(data_dir) / ref.path).is_dir()):
            continue
        try:
            datasets.load_dataset_builder(ref.path, ref.name)
        except Exception as err:  # noqa: BLE001 - offline datasets raise ConnectionError, FileNotFoundError, ValueError
            raise DatasetUnavailableError(missing_dataset_message(ref, data_dir)) from err
        known.add((ref.path, ref.name))


@contextlib.contextmanager
def hf_offline(enabled: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / HF_EVALUATE_OFFLINE for this scope, also in already imported modules
    (they read the variables at import), so a missing file fails at once instead of retrying the network."""
    if not enabled:
        yield
        return
    import sys

    import datasets.config  # noqa: F401  (imported here, with the caller's environment, then patched)
    import huggingface_hub.constants  # noqa: F401

    with contextlib.suppress(ImportError):
        import evaluate.config  # noqa: F401

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")
    old_env = {k: os.environ.get(k) for k in names}
    patched: list[tuple[Any, str, Any]] = []
    for module, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          ("evaluate.config", ("HF_EVALUATE_OFFLINE",))):
        mod = sys.modules.get(module)
        for attr in attrs if mod is not None else ():
            patched.append((mod, attr, getattr(mod, attr, None)))
            setattr(mod, attr, True)
    os.environ.update({k: "1" for k in names})
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_mirror(data_dir: str | None) -> Iterator[None]:
    """datasets.load_dataset(path, ...) reads `data_dir/path` when that folder exists (a local copy of the dataset
    repository: parquet / json / csv files, or a hub snapshot with its README configs)."""
    if not data_dir:
        yield
        return
    import datasets

    original = datasets.load_dataset

    @functools.wraps(original)
    def load_dataset(path: str, *args: Any, **kwargs: Any):
        local = Path(data_dir) / str(path)
        return original(str(local) if local.is_dir() else path, *args, **kwargs)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original



def load_error(task: str, err: BaseException) -> ConfigError:
    """One line for an exception raised while lm-eval builds a task (missing package, metric or file)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ImportError):
        return ConfigError(f"task {task} needs a Python package that is not installed ({first}); install lm-eval's "
                           "extra for it, e.g. pip install 'lm-eval[math]' for minerva_math")
    if "code_eval" in str(err) or "evaluate" in type(err).__module__:
        return DatasetUnavailableError(
            f"task {task}: the Hugging Face `evaluate` metric code_eval is not available offline ({first}); on a "
            "machine with network run python -c \"import evaluate; evaluate.load('code_eval')\" and copy "
            "~/.cache/huggingface/modules to HF_HOME/modules here")
    return DatasetUnavailableError(f"task {task} could not be loaded offline ({type(err).__name__}: {first}); "
                                   "see the README section on datasets for offline use")



# ---- the mirror CLI ------------------------------------------------------------------------------
def benchmark_tasks(option: str) -> list[HarnessTask]:
    """The tasks of conf/benchmark/<option>.yaml (composed with Hydra, no model or sampler needed)."""
    from fair_calib.benchmark.harness import HarnessTask
    from fair_calib.compose import compose_config, group_options

    if option not in group_options("benchmark"):
        raise ConfigError(f"no benchmark config {option!r}; valid: {', '.join(group_options('benchmark'))}")
    cfg = compose_config([f"benchmark={option}"])
    tasks = OmegaConf.to_container(cfg.benchmark, resolve=True).get("tasks") or {}
    if not tasks:
        raise ConfigError(f"benchmark={option} names no lm-eval tasks")
    return [HarnessTask(**{"task": key, **spec}) for key, spec in tasks.items()]


def required_datasets(option: str) -> list[DatasetRef]:
    from fair_calib.benchmark.harness import task_manager

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
