"""Time the report's bootstrap: 2000 resamples of 3 seeds x 500 documents (a cell and a paired difference).

Run: python experiments/perf/bootstrap_speed.py
"""

from __future__ import annotations

import time

import numpy as np

from fair_calib.stats import bootstrap_ci, bootstrap_ci_mean_of_means, paired_bootstrap


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    a = (rng.random((3, 500)) < 0.9).astype(np.float64)
    b = (rng.random((3, 500)) < 0.9).astype(np.float64)
    tasks_a = [a, a[:, :200], a[:, :300]]
    print(f"bootstrap_ci       3 seeds x 500 docs, B=2000: {1e3 * best_of(lambda: bootstrap_ci(a)):7.1f} ms")
    print(f"bootstrap_ci       1 seed  x 500 docs, B=2000: {1e3 * best_of(lambda: bootstrap_ci(a[0])):7.1f} ms")
    print(f"paired_bootstrap   3 seeds x 500 docs, B=2000: {1e3 * best_of(lambda: paired_bootstrap(a, b)):7.1f} ms")
    t = best_of(lambda: bootstrap_ci_mean_of_means(tasks_a))
    print(f"mean of means      3 tasks (500/200/300 docs) x 3 seeds, B=2000: {1e3 * t:7.1f} ms")
    big = (rng.random((3, 5000)) < 0.9).astype(np.float64)
    print(f"bootstrap_ci       3 seeds x 5000 docs, B=2000: {1e3 * best_of(lambda: bootstrap_ci(big), 2):7.1f} ms")


if __name__ == "__main__":
    main()
