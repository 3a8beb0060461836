"""How much of fair_calib a job runs: the files whose functions execute between `fair-calib` and results.json.

    python experiments/perf/code_path.py                       # the default job, shrunk (same code path)
    python experiments/perf/code_path.py method=gptq bits=w4a16_g64 ...   # any job's overrides

A profile hook records the file of every fair_calib function called while no module body is executing (so
imports, registry scans and decorators do not count: only code the job itself runs). The default overrides
shrink the default job (few documents, one epoch, a short probe) without changing which code runs. Prints the
count, then each file with its number of calls, grouped by package.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

SHRINK = ["benchmark.n=4", "benchmark.mc_num=2", "quantizer.epochs=1", "prior.n_probe=8", "data.n_samples=8",
          "diagnostics.n_prompts=4", "threads=1", "logger=none"]


def main(argv: list[str]) -> int:
    import fair_calib

    root = str(Path(fair_calib.__file__).parent)
    calls: dict[str, int] = defaultdict(int)
    in_module_body = [0]

    def hook(frame, event, arg):  # noqa: ARG001 - sys.setprofile's signature
        code = frame.f_code
        if code.co_name == "<module>":
            in_module_body[0] += {"call": 1, "return": -1}.get(event, 0)
        elif event == "call" and not in_module_body[0] and code.co_filename.startswith(root):
            calls[code.co_filename] += 1

    from fair_calib.cli import run

    sys.setprofile(hook)
    try:
        rc = run([*SHRINK, *argv])
    finally:
        sys.setprofile(None)
    files = sorted(os.path.relpath(f, root) for f in calls)
    print(f"\nexit code {rc}: {len(files)} fair_calib files run code")
    by_package: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_package[f.split("/")[0] if "/" in f else "."].append(f)
    for package, members in sorted(by_package.items()):
        print(f"  {package} ({len(members)}): " + ", ".join(
            f"{Path(m).name} {calls[os.path.join(root, m)]}" for m in members))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
