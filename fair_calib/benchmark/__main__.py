"""lm-eval's CLI with the "fair_calib" model registered and the tinyreason tasks on the include path.

    python -m fair_calib.benchmark run --model fair_calib \
        --model_args path=fair_calib/assets/tiny-llada,decoding=llada,mc_num=16 --tasks tinyreason
"""

from __future__ import annotations

import sys

import torch

from fair_calib.benchmark import lm  # noqa: F401  (registers model "fair_calib")
from fair_calib.benchmark.tinyreason_tasks import TASKS_DIR
from fair_calib.errors import guarded


def _evaluate() -> None:
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:]
    if "--include_path" not in args and any(a in ("run", "ls", "list", "validate") or a.startswith("--tasks")
                                            for a in args):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    if "--device" not in args and any(a.startswith("--model") for a in args) and not torch.cuda.is_available():
        sys.argv += ["--device", "cpu"]  # lm-eval's CLI defaults to cuda
    cli_evaluate()


def main() -> None:
    """lm-eval's CLI; project errors and bad arguments to it (ValueError, FileNotFoundError) end in one line."""
    sys.exit(guarded(_evaluate, expected=(ValueError, FileNotFoundError, OSError)))


if __name__ == "__main__":
    main()
