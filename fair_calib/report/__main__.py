"""python -m fair_calib.report <sweep or run folder>... [--out DIR] [--wandb ENTITY/PROJECT]

Prints the Markdown tables and writes report.md, report.tex, report.html (self-contained: the offline
dashboard) and the PNG figures to --out (default: <first folder>/report).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from fair_calib.errors import guarded
from fair_calib.report.build import build_report
from fair_calib.report.collect import collect_runs, records_from_wandb
from fair_calib.report.tables import parse_references


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0, 2 for bad input (one line on stderr), 1 when every run given had failed."""
    return guarded(lambda: _main(argv), expected=(FileNotFoundError, ValueError))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fair_calib.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="run or sweep folders (searched for results.json)")
    parser.add_argument("--out", default=None, help="output folder (default: <first folder>/report)")
    parser.add_argument("--reference", action="append", default=None, metavar="METHOD=REF",
                        help="compare rows of METHOD with REF (paired bootstrap); default FAIR-Calib=FlatQuant and "
                             "*=FP; repeatable, e.g. --reference GPTQ=RTN")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT",
                        help="also read the finished runs of a W&B project (needs network and a W&B key)")
    args = parser.parse_args(argv)
    if not args.folders and not args.wandb:
        parser.error("give at least one sweep folder (e.g. multirun/paper_main) or --wandb ENTITY/PROJECT")
    records = collect_runs(args.folders)
    if args.wandb:
        records += records_from_wandb(args.wandb)
    out = Path(args.out) if args.out else Path(args.folders[0] if args.folders else ".") / "report"
    report, files = build_report(records, out, references=parse_references(args.reference))
    print(report.to_markdown())
    print("\n".join(f"{kind}: {path}" for kind, path in files.items()))
    if records and not any(r.status == "ok" for r in records):
        counts = Counter(r.status for r in records)
        print(f"error: none of the {len(records)} runs finished ({', '.join(f'{n} {s}' for s, n in counts.items())}); "
              "see each run's error.txt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
