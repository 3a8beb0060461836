"""Evaluation through lm-eval, in process: `DiffusionEvalLM` (lm.py) and `benchmark=tiny` (tiny.py).

`TASKS_DIR` is the lm-eval task folder shipped with the package (tinyreason test splits); pass it
as `TaskManager(include_path=TASKS_DIR)` or `--include_path` on lm-eval's CLI.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
