"""The notebooks run top to bottom on a small finished sweep (a real one: two FAIR-Calib schedules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny
from test_cli import SMALL_BENCH, SMALL_FAIR, run_cli

from fair_calib.models.loading import save_dllm

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb")
    model = root / "tiny-test"
    save_dllm(make_tiny("llada"), model)
    proc = run_cli(["-m", f"model.path={model}", "logger=none", "hydra.sweep.dir=sweep", "prior.schedule=early,late",
                    *SMALL_BENCH, *SMALL_FAIR], root, root / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted((root / "sweep").glob("*/results.json"))
    assert [json.loads(p.read_text())["status"] for p in runs] == ["ok", "ok"]
    return root / "sweep"


@pytest.mark.parametrize("name", ["frontier_prior", "diagnostics", "results"])
def test_notebook_executes(name, sweep, monkeypatch):
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in book.cells if c.cell_type == "code"), "commit notebooks without outputs"
    monkeypatch.setenv("FAIR_CALIB_RUNS", str(sweep))
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure"
    text = json.dumps([o.get("text", "") for o in outputs] + [o.get("data", {}).get(kind, "") for o in outputs
                                                               for kind in ("text/markdown", "text/plain")])
    if name == "frontier_prior":
        assert "2 runs with a saved prior" in text and "'early', 'late'" in text
    else:
        assert "FAIR-Calib W4A4" in text
