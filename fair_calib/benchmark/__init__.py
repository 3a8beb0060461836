"""Evaluation through lm-eval, in process: `DiffusionEvalLM` (lm.py), `benchmark=tiny` (tiny.py) and
`benchmark=lm_eval` / `<task>` / `paper10` over lm-eval's own tasks (harness.py, family defaults in
families.py); `lm_eval_plugin` registers the model with lm-eval's CLI, `offline_data` mirrors datasets.

`TASKS_DIR` is the lm-eval task folder shipped with the package (tinyreason test splits); pass it
as `TaskManager(include_path=TASKS_DIR)` or `--include_path` on lm-eval's CLI.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
