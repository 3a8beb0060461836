"""Evaluation through lm-eval, in process: `DiffusionEvalLM` (lm.py) under one evaluation path, `HarnessBenchmark`
(harness.py), for `benchmark=lm_eval` / `<task>` / `paper10` over lm-eval's own tasks (family defaults in
families.py) and for `benchmark=tiny` over the shipped tinyreason task folder (tiny.py turns its keys into
tasks); `offline_data` reads datasets without network and mirrors them, `lm_eval_plugin` registers the model
with lm-eval's CLI.

`TASKS_DIR` is the lm-eval task folder shipped with the package (tinyreason test splits); pass it
as `TaskManager(include_path=TASKS_DIR)` or `--include_path` on lm-eval's CLI.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
