"""Paired comparison of two FP runs of the same model that differ in one evaluation setting.

    python experiments/compare_numerics.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]

Each RUN is a run folder (results.json + samples/). Prints, per task and for the average of the task
headlines, mean(A) - mean(B) with its paired-bootstrap 95% CI over documents (`fair_calib.stats`),
how many documents got a different answer, and the same for the continuous `answer_ll`. Used for the
README's `decoding.numerics=official` vs `exact` and `benchmark.estimator=official` vs `stratified` figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fair_calib.stats import paired_bootstrap, paired_bootstrap_mean_of_means


def load(run: Path) -> tuple[dict, dict]:
    results = json.loads((run / "results.json").read_text())
    samples = json.loads(next((run / "samples").glob("*.json")).read_text())
    return results, samples


def compare(a: Path, b: Path) -> None:
    ra, sa = load(a)
    _, sb = load(b)
    headline = ra["headline"]
    print(f"\n{a.name} - {b.name}")
    heads_a, heads_b = [], []
    for task, docs_a in sa.items():
        docs_b = sb[task]
        metric = headline[task] if isinstance(headline, dict) and task in headline else next(
            k for k in ("exact_match", "acc") if k in docs_a[0])
        xa, xb = [d[metric] for d in docs_a], [d[metric] for d in docs_b]
        heads_a.append(xa)
        heads_b.append(xb)
        diff = paired_bootstrap(xa, xb, seed=0)
        changed = sum(da.get("response") != db.get("response") or da[metric] != db[metric]
                      for da, db in zip(docs_a, docs_b))
        ll = paired_bootstrap([d["answer_ll"] for d in docs_a], [d["answer_ll"] for d in docs_b], seed=0)
        print(f"  {task:28s} {metric} {100 * sum(xa) / len(xa):6.1f} vs {100 * sum(xb) / len(xb):6.1f}  "
              f"diff {100 * diff.mean:+.1f} [{100 * diff.ci_low:+.1f}, {100 * diff.ci_high:+.1f}]  "
              f"docs changed {changed}/{len(xa)}  answer_ll diff {ll.mean:+.4f} [{ll.ci_low:+.4f}, {ll.ci_high:+.4f}]")
    avg = paired_bootstrap_mean_of_means(heads_a, heads_b, seed=0)
    print(f"  {'average':28s} diff {100 * avg.mean:+.2f} [{100 * avg.ci_low:+.2f}, {100 * avg.ci_high:+.2f}] "
          f"p={avg.p_value:.3f}")


if __name__ == "__main__":
    args = [Path(p) for p in sys.argv[1:]]
    if not args or len(args) % 2:
        sys.exit(__doc__)
    for a, b in zip(args[::2], args[1::2]):
        compare(a, b)
