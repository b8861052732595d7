"""notebooks/quickstart.ipynb runs top to bottom on CPU at its small settings: every cell
without an error, speculative greedy output equal to target-only's (in the API section and
from the server), and a server that answered with its speculation usage. The notebook is
committed without outputs and executes as a copy in a temporary directory."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "SMALL =" in tagged[0].source


def _with_parameters(nb, **values):
    """The notebook with a cell setting `values` right after its parameters cell (as
    papermill injects them)."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)
    return nb


@pytest.mark.slow
def test_quickstart_runs_small_on_cpu(chat_ckpt, tmp_path, monkeypatch):
    """The suite's small chat checkpoint is the notebook's target (TARGET injected after its
    parameters cell), so the notebook trains no model of its own."""
    before = sorted(p.relative_to(ROOT) for p in NOTEBOOK.parent.rglob("*"))
    copy = tmp_path / "quickstart.ipynb"
    shutil.copy(NOTEBOOK, copy)
    monkeypatch.setenv("AURORA_QUICKSTART_SMALL", "1")
    monkeypatch.setenv("AURORA_JAX_CACHE", str(tmp_path / "cache"))  # no user cache touched
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as a user has
    nb = _with_parameters(nbformat.read(copy, as_version=4), TARGET=str(chat_ckpt))
    t0 = time.perf_counter()
    # Raises CellExecutionError, naming the cell, if any cell fails (asserts included).
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    wall = time.perf_counter() - t0
    nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.get("output_type") != "error" for c in code for o in c.outputs)
    assert all(c.execution_count is not None for c in code)
    out = "\n".join(_stdout(c) for c in code)
    assert f"target: {chat_ckpt}" in out  # the given checkpoint, not one trained here
    assert not (tmp_path / "quickstart" / "cache").exists()

    # The run: its summary's side-by-side check, and its three plots shown as images.
    assert "greedy outputs equal: True" in out
    run_dir = tmp_path / "quickstart" / "run"
    assert json.loads((run_dir / "summary.json").read_text())["final_window"][
        "greedy_outputs_equal"] is True
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(list(run_dir.glob("*.png"))) == 3

    # The API: the tree and target-only each printed their check, and they agree.
    same = re.findall(r"^(\w+) *: acceptance ([\d.]+), .*same tokens as target-only: (\w+)$",
                      out, flags=re.M)
    assert [(m, ok) for m, _, ok in same] == [("tree", "True"), ("off", "True")]
    assert float(same[0][1]) >= 1.0 and float(same[1][1]) == 1.0

    # The server answered: the usage of its greedy completion, and its text equals
    # target-only's; then it stopped.
    usage = json.loads(re.search(r"^usage: (.*)$", out, flags=re.M).group(1))
    assert usage["completion_tokens"] >= 1 and usage["acceptance_length"] >= 1.0
    assert usage["speculation"] and usage["target_forwards"] >= 1
    assert "server's greedy text equals target-only: True" in out
    assert out.rstrip().endswith("server stopped")

    # Nothing written into the repository.
    assert sorted(p.relative_to(ROOT) for p in NOTEBOOK.parent.rglob("*")) == before
    print(f"notebook executed in {wall:.1f} s")
