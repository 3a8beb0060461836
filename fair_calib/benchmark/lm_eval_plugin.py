"""Make lm-eval's own CLI know the model "fair_calib" (`lm_eval run --model fair_calib --model_args path=...`).

lm-eval 0.4 has no plugin entry points: a model is known once its module is imported. `install`
writes `fair_calib_lm_eval.pth` into site-packages; at interpreter start it adds an import hook
that, right after `lm_eval.models` is imported (which lm-eval does before looking up a model),
registers "fair_calib" as a lazy placeholder for `fair_calib.benchmark.lm:DiffusionEvalLM`. Nothing
else is imported until lm-eval asks for the model.

    python -m fair_calib.benchmark.lm_eval_plugin install     # once per environment
    python -m fair_calib.benchmark.lm_eval_plugin uninstall
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

PTH_NAME = "fair_calib_lm_eval.pth"
MODEL_NAME = "fair_calib"
TARGET = "fair_calib.benchmark.lm:DiffusionEvalLM"
WATCHED = "lm_eval.models"


def register_placeholder() -> None:
    """Register "fair_calib" with lm-eval's model registry (lazily: the class is imported on first use)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of `lm_eval.models` so registration follows its execution."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            register_placeholder()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def activate() -> None:
    """Called from the .pth file at interpreter start: cheap (no lm-eval import)."""
    if WATCHED in sys.modules:
        register_placeholder()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(site_dir: str | Path | None = None) -> Path:
    path = Path(site_dir or site_packages()) / PTH_NAME
    path.write_text("import fair_calib.benchmark.lm_eval_plugin as _p; _p.activate()\n")
    return path


def uninstall(site_dir: str | Path | None = None) -> bool:
    path = Path(site_dir or site_packages()) / PTH_NAME
    if path.is_file():
        path.unlink()
        return True
    return False


def installed(site_dir: str | Path | None = None) -> bool:
    return (Path(site_dir or site_packages()) / PTH_NAME).is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    parser.add_argument("--site-dir", default=None, help="target folder (default: this environment's site-packages)")
    args = parser.parse_args(argv)
    if args.action == "install":
        print(f"installed {install(args.site_dir)}: lm_eval --model fair_calib now works in this environment")
    elif args.action == "uninstall":
        print("removed" if uninstall(args.site_dir) else "not installed")
    else:
        print("installed" if installed(args.site_dir) else "not installed")


if __name__ == "__main__":
    main()
