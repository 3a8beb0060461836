"""Resident memory of this process, for the perf scripts that run each configuration in a fresh process.

`peak_rss_mb` reads the kernel's high-water mark of this process's own address space (VmHWM), which starts afresh
at exec. `resource.getrusage(...).ru_maxrss` does not: Linux carries the RSS the process had before exec (a forked
copy of the launching parent) into it, so a child of a 1 GB parent reports at least 1 GB whatever it did.
"""

from __future__ import annotations

import resource


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size (MB)."""
    now = _status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (MB); ru_maxrss where /proc is missing."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
