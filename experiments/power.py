"""Statistical power of a sweep's comparisons: the minimum detectable difference (MDD, 80% power, paired, alpha
0.05) of each row against its reference row, at the sweep's test documents and projected to other sizes.

    python experiments/power.py multirun/paper_main [--docs 1000] [--target 1.0]

For every model and row: the per-task sd of the per-document paired differences (seed-averaged), the MDD of
the task average at the documents the runs scored, the MDD if every task had `--docs` documents, and the
documents per task needed for an MDD of `--target` points (the same spread assumed). Accuracy rows only.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from fair_calib import stats
from fair_calib.report.collect import collect_runs
from fair_calib.report.tables import (
    ACCURACY,
    DEFAULT_REFERENCES,
    _find_reference,
    _method_rank,
    _method_rows,
    _tasks,
    models,
)

Z = 2.8016  # z_{0.975} + z_{0.8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--docs", type=int, default=1000, help="projected documents per task")
    parser.add_argument("--target", type=float, default=1.0, help="target MDD in points")
    args = parser.parse_args()
    records = [r for r in collect_runs(args.folders) if r.ok]
    for model in models(records):
        runs = [r for r in records if r.model == model]
        rows = _method_rows(runs, ACCURACY)
        tasks = [t for t in _tasks(runs) if all(t in row.tasks for row in rows.values())]
        labels = sorted(rows, key=_method_rank)
        print(f"\n{model}  (tasks: {', '.join(tasks)})")
        print(f"{'row':<18} {'reference':<16} {'seeds':>5} {'docs':>13} {'sd per task':>22} {'MDD':>6} "
              f"{'MDD@' + str(args.docs):>9} {'docs for ' + str(args.target):>12}")
        for label in labels:
            ref = _find_reference(label, labels, DEFAULT_REFERENCES, set(), model)
            if ref is None:
                continue
            a, b = rows[label].matrices(tasks), rows[ref].matrices(tasks)
            if a is None or b is None or any(x.shape[1] != y.shape[1] for x, y in zip(a, b)):
                continue
            diffs = [x.mean(axis=0) - y.mean(axis=0) for x, y in zip(a, b)]
            sds = [float(np.std(d, ddof=1)) for d in diffs]
            mdd = 100 * stats.mdd_mean_of_means(diffs)
            projected = 100 * Z * math.sqrt(sum(s * s / args.docs for s in sds)) / len(sds)
            needed = math.ceil((Z * 100 / (args.target * len(sds))) ** 2 * sum(s * s for s in sds))
            print(f"{label:<18} {ref:<16} {a[0].shape[0]:>5} {'/'.join(str(x.shape[1]) for x in a):>13} "
                  f"{' '.join(f'{s:.3f}' for s in sds):>22} {mdd:>6.2f} {projected:>9.2f} {needed:>12}")


if __name__ == "__main__":
    main()
