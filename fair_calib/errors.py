"""The project's exception family and the one way an entry point reports it.

    FairCalibError            anything the project expects to go wrong, with a message that says what to do
      ConfigError             bad input (a value, a file, a folder, a combination): exit 2
        ModelLoadError        a model folder that cannot be loaded
      ComputationError        a failure during the computation (divergence, non-finite weights): exit 1
        NonFiniteWeightError  a quantized or calibrated weight with NaN/Inf (names the layer)
      Interrupted             SIGINT / SIGTERM: exit 130 / 143

`report(err)` prints one line on stderr and returns the exit code; the full traceback only with
`HYDRA_FULL_ERROR=1` (or `debug=true` on the command line). Entry points (`fair-calib`,
`python -m fair_calib.benchmark`, `python -m fair_calib.report`) wrap their work in `guarded`.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class FairCalibError(Exception):
    """Base of every expected failure; `exit_code` is what the command line returns."""

    exit_code = 1


class ConfigError(FairCalibError, ValueError):
    """A user-facing input error: one line that says what to change."""

    exit_code = 2


class ModelLoadError(ConfigError):
    """A model folder that cannot be loaded; the message says what to fix."""


class ComputationError(FairCalibError, RuntimeError):
    """The computation failed (diverged, produced non-finite values); the message names where."""

    exit_code = 1


class NonFiniteWeightError(ComputationError):
    """A weight about to be written holds NaN or Inf (never written: the message names the layer)."""


class DivergenceError(ComputationError):
    """A calibration loss became non-finite or blew up (the message names the layer and the setting to lower)."""


class Interrupted(FairCalibError):
    """The run was stopped by a signal; `signum` is SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def one_line(err: BaseException) -> str:
    """The error's message on one line (Hydra's and lm-eval's messages span several: a list after a line
    ending in ':' is joined with commas; Hydra's config search path is dropped)."""
    text = str(err).strip() or type(err).__name__
    text = text.split("\nConfig search path:")[0]
    out = ""
    listing = False
    for part in (p.strip() for p in text.replace("\t", " ").splitlines()):
        if not part:
            continue
        if not out:
            out = part
        elif out.endswith(":"):
            out, listing = f"{out} {part}", True
        else:
            out = f"{out}, {part}" if listing else f"{out}; {part}"
    return out


def traceback_wanted(argv: list[str] | None = None) -> bool:
    """HYDRA_FULL_ERROR=1 in the environment, or debug=true / +debug=true / --debug on the command line."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    args = sys.argv[1:] if argv is None else argv
    return any(a.lstrip("+").lower() in ("debug=true", "debug=1", "debug=yes") or a == "--debug" for a in args)


def exit_code(err: BaseException) -> int:
    if isinstance(err, FairCalibError):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 2  # Hydra's own composition / override errors are bad input


def report(err: BaseException, prefix: str = "error", full: bool | None = None) -> int:
    """Print `err` as one stderr line (or its traceback when `full`, default: when wanted); return the exit code."""
    if traceback_wanted() if full is None else full:
        traceback.print_exception(err, file=sys.stderr)
    elif isinstance(err, Interrupted | KeyboardInterrupt):
        print("interrupted" if isinstance(err, KeyboardInterrupt) else str(err), file=sys.stderr)
    else:
        print(f"{prefix}: {one_line(err)}", file=sys.stderr)
    sys.stderr.flush()
    return exit_code(err)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise `Interrupted` in the main thread (so `finally` blocks run and the
    run folder can be marked); a second signal while handling the first is ignored. Restored on exit."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    except Interrupted:
        for s in old:  # one signal is enough: cleanup is not interrupted by a second one
            signal.signal(s, signal.SIG_IGN)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def guarded(fn: Callable[[], int | None], expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run an entry point: project errors (and `expected` library errors) become one line and an exit code;
    anything else is a bug and keeps its traceback."""
    try:
        with signals_raise():
            return int(fn() or 0)
    except (FairCalibError, KeyboardInterrupt, *expected) as err:
        return report(err)
