"""The tinyreason test splits as lm-eval tasks: shipped data files, their loader, and exact-match scoring.

The task folder `TASKS_DIR` (YAML + `utils.py` + `data/*.jsonl`) is shipped inside the package;
`utils.py` resolves the data files from its own location, so the YAMLs work from any working
directory and from an installed wheel, in process (`TaskManager(include_path=TASKS_DIR)`) and from
lm-eval's CLI (`--include_path`, see `fair_calib/benchmark/tasks/tinyreason/README.md`).

Regenerate the data files (deterministic from the generators, seed 0):

    python -m fair_calib.benchmark.tinyreason_tasks --n 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fair_calib.benchmark import TASKS_DIR
from fair_calib.data.tinyreason import TASKS, examples, extract_answer

TASK_FOLDER = TASKS_DIR / "tinyreason"
DATA_DIR = TASK_FOLDER / "data"
LM_EVAL_NAME = {task: f"tinyreason_{task}" for task in TASKS}
DATA_SEED = 0
SHIPPED_N = 1000


def doc_row(ex, doc_id: int) -> dict[str, Any]:
    """One lm-eval document: generation tasks keep prompt/answer/target, multiple choice adds choices/label."""
    row: dict[str, Any] = {"id": doc_id, "prompt": ex.prompt, "answer": ex.answer, "target": ex.target}
    if ex.choices:
        row["choices"] = list(ex.choices)
        row["label"] = ex.label
    return row


def expected_rows(task: str, n: int, seed: int = DATA_SEED) -> list[dict[str, Any]]:
    """The first n test examples of `task` as documents (what the shipped files must contain)."""
    return [doc_row(ex, i) for i, ex in enumerate(examples(task, "test", n, seed))]


def data_path(task: str) -> Path:
    return DATA_DIR / f"{task}.jsonl"


def write_data_files(n: int = SHIPPED_N, seed: int = DATA_SEED, out_dir: Path | None = None) -> dict[str, Path]:
    """Write `<task>.jsonl` (n test documents per task) into the task folder's `data/`."""
    out_dir = Path(out_dir) if out_dir is not None else DATA_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in TASKS:
        path = out_dir / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in expected_rows(task, n, seed)))
        paths[task] = path
    return paths


def read_rows(task: str) -> list[dict[str, Any]]:
    path = data_path(task)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate with: python -m fair_calib.benchmark.tinyreason_tasks")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_test_split(task: str):
    """lm-eval `custom_dataset` result: {'test': datasets.Dataset} read from the shipped jsonl (no hub access)."""
    import datasets

    return {"test": datasets.Dataset.from_list(read_rows(task))}


def available(task: str) -> int:
    """Number of shipped test documents of `task`."""
    with data_path(task).open() as f:
        return sum(1 for line in f if line.strip())


# ---- scoring ------------------------------------------------------------------------------------
def exact_match(generation: str, target: str) -> float:
    """1.0 when the final answer of the generation ('#### N', else its first integer) equals the target number."""
    pred = extract_answer(generation)
    if pred is None:
        return 0.0
    try:
        return float(int(pred) == int(target))
    except ValueError:
        return float(pred.strip() == str(target).strip())


def process_exact_match(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval `process_results` for the generation tasks."""
    return {"exact_match": exact_match(results[0], doc["target"])}


def process_answer_ll(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval `process_results` of the `*_ll` tasks: log p(reference answer | prompt), in nats."""
    return {"answer_ll": float(results[0][0])}


def process_compare(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """compare: acc (the correct choice has the highest log-likelihood; ties go to the first choice, as in
    lm-eval's argmax) and answer_ll, the log-likelihood of the correct choice."""
    lls = [float(r[0]) for r in results]
    label = int(doc["label"])
    return {"acc": float(max(range(len(lls)), key=lls.__getitem__) == label), "answer_ll": lls[label]}


def main() -> None:
    parser = argparse.ArgumentParser(description="write the tinyreason lm-eval test files")
    parser.add_argument("--n", type=int, default=SHIPPED_N)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for task, path in write_data_files(args.n, out_dir=args.out).items():
        print(f"{task}: {path}")


if __name__ == "__main__":
    main()
