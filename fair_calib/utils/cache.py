"""The one on-disk cache behind the evaluation, prior and teacher-trajectory caches.

An entry is a file `<folder>/<prefix><key><suffix>`, the key a content hash the caller computes (every cache of a
run hashes the FP weights once, `state_dict_hash`, and passes it in). `DiskCache.get(key, compute, load, save)`:

    hit      the file exists, `force` is off and `load(path)` succeeds: logged as a hit, returned
    corrupt  the file exists but cannot be read (truncated, foreign, old format): a warning, then recomputed
    miss     `compute()`, then `save(value, tmp)` into a temporary file renamed over the entry (atomic: a crash
             leaves the old entry or none, never half a file)

With `folder=None` nothing is read or written (`compute()` every time).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fair_calib.utils.io import atomic_file

T = TypeVar("T")

# what a loader may raise on an unreadable entry (json, torch.load, a missing field, a wrong type)
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, EOFError,
              pickle.UnpicklingError)


@dataclass(frozen=True)
class DiskCache:
    """Entries named by key under `folder`; `what` names the cache in log lines."""

    folder: Path | None
    what: str
    suffix: str = ".json"
    prefix: str = ""
    force: bool = False
    log: logging.Logger = logging.getLogger("fair_calib")  # the caller's logger: its log lines, its level

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else Path(self.folder).expanduser() / f"{self.prefix}{key}{self.suffix}"

    def get(self, key: str, compute: Callable[[], T], load: Callable[[Path], T],
            save: Callable[[T, Path], object], label: str = "") -> tuple[T, bool]:
        """(value, hit): the cached value for `key`, or `compute()`'s, which is then saved. `label` names the
        entry in the log lines ("evaluation cache hit (rtn): ...")."""
        tag = f" ({label})" if label else ""
        path = self.path(key)
        if path is not None and path.is_file() and not self.force:
            try:
                value = load(path)
            except UNREADABLE as err:
                first = str(err).splitlines()[0] if str(err) else ""
                self.log.warning("%s cache %s unreadable (%s: %s); computing again", self.what, path,
                            type(err).__name__, first)
            else:
                self.log.info("%s cache hit%s: %s", self.what, tag, path)
                return value, True
        if path is not None:
            self.log.info("%s cache miss%s (key %s)", self.what, tag, key)
        value = compute()
        if path is not None:
            with atomic_file(path) as tmp:
                save(value, tmp)
        return value, False
