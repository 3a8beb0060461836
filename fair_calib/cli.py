"""`fair-calib` / `python -m fair_calib`: the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fair_calib import CONF_DIR
from fair_calib.errors import (
    ConfigError,
    FairCalibError,
    Interrupted,
    one_line,
    report,
    signals_raise,
    traceback_wanted,
)
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
    """A failed or interrupted job: error.txt (the traceback) and a results.json whose status says so."""
    text = "".join(traceback.format_exception(err))
    write_text_atomic(run_dir / "error.txt", text)
    status = "interrupted" if isinstance(err, Interrupted | KeyboardInterrupt) else "failed"
    write_json_atomic(run_dir / "results.json", {"status": status, "error": f"{type(err).__name__}: {one_line(err)}",
                                                 "run": {"config_hash": config_hash}})


def _lock_folder(run_dir: Path):
    """An exclusive advisory lock on the job folder for the job's lifetime, released by the OS however the
    process ends: (open lock file, None), or (None, the holder's pid) when another process runs this folder."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".fair_calib.lock", "a+")  # noqa: SIM115 - held open until the job ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle, None


_WATCHING: list[int] = []


def _die_with_launcher() -> None:
    """In a joblib (loky) worker: when the launcher dies the worker is re-parented; end the running job as a
    SIGTERM would (folder marked `interrupted`) instead of computing on for nobody."""
    import multiprocessing

    if "Loky" not in multiprocessing.current_process().name or _WATCHING:
        return
    parent = os.getppid()
    _WATCHING.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="fair-calib-launcher-watch", daemon=True).start()


_FAILURE: list[BaseException] = []  # a single run's exception, raised again after Hydra has returned


class _StopSweep(BaseException):
    """Carries an interrupt past Hydra's job runner, which catches every Exception of a job and would go on
    with the next job of a sweep; a BaseException ends the sweep (the interrupted folder is marked first)."""

    def __init__(self, err: BaseException) -> None:
        super().__init__(str(err))
        self.err = err


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _app(cfg: DictConfig) -> float | None:

    _quiet_libraries()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    _die_with_launcher()
    lock, holder = _lock_folder(run_dir)
    if lock is None:  # another launcher runs this very job: leave its folder alone
        busy = (f"{run_dir} is in use by another fair-calib process (pid {holder}); left alone: wait for that run "
                "to finish (a rerun then skips it), or pick another folder")
        if not multirun:
            _FAILURE.append(ConfigError(busy))
            return None
        print(f"skipped: job {hc.job.num}: {busy}", file=sys.stderr)
        return None
    try:
        with signals_raise():  # also in a joblib worker, whose SIGTERM would otherwise leave the folder unmarked
            return _run_job(cfg, hc, run_dir, multirun)
    finally:
        lock.close()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: cgroup, taskset, SLURM allocation), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads(hc, multirun: bool) -> int:
    """``threads=null``: the available cores split between the jobs a joblib sweep runs at once (``n_jobs``; joblib's
    negative values count back from the cores), so parallel jobs never oversubscribe the machine."""
    cores = available_cores()
    jobs = 1
    n_jobs = OmegaConf.select(hc, "launcher.n_jobs") if multirun else None
    if isinstance(n_jobs, int) and not isinstance(n_jobs, bool) and n_jobs != 0:
        jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
    return max(1, cores // jobs)


def _run_job(cfg: DictConfig, hc, run_dir: Path, multirun: bool) -> float | None:
    from fair_calib.pipeline import Pipeline

    pipeline = None
    if cfg.get("threads", None) is None:
        cfg.threads = default_threads(hc, multirun)
    try:
        pipeline = Pipeline(cfg, run_dir, choices=dict(hc.runtime.choices), group=_group(cfg, hc))
        results = pipeline.run()
    except (Interrupted, KeyboardInterrupt) as err:  # the folder is marked; the sweep stops
        _record_failure(run_dir, err, pipeline.config_hash if pipeline else None)
        raise _StopSweep(err) from err
    except ConfigError as err:  # bad input: nothing was computed, nothing is left in a single run
        if not multirun:
            _FAILURE.append(err)
            return None
        print(f"error: job {hc.job.num}: {one_line(err)}", file=sys.stderr)
        _record_failure(run_dir, err, None)
        return None
    except Exception as err:  # noqa: BLE001 - one failed job must not stop the other jobs of a sweep
        _record_failure(run_dir, err, pipeline.config_hash if pipeline else None)
        if not multirun:
            _FAILURE.append(err)
            return None
        print(f"error: job {hc.job.num} failed ({type(err).__name__}: {one_line(err)}); "
              f"see {run_dir / 'error.txt'}", file=sys.stderr)
        return None
    # the sweep objective (Optuna and friends): the quantized model's average
    return results["summary"].get("quant/avg")


def run(argv: list[str] | None = None) -> int:
    """`fair-calib ARGS`: the exit code. Project errors and Hydra's own (an unknown config group option, a
    malformed override) print one line; the traceback only with HYDRA_FULL_ERROR=1 or debug=true."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    wanted = traceback_wanted()
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own two lines
    _FAILURE.clear()
    try:
        with signals_raise():
            _app()
            if _FAILURE:
                raise _FAILURE.pop()
    except _StopSweep as stop:
        return report(stop.err, full=wanted)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
    except (FairCalibError, HydraException, OmegaConfBaseException, KeyboardInterrupt) as err:
        return report(err, full=wanted)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
