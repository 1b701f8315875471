"""The example notebooks run top to bottom (FAST settings: tiny fits) and draw at least one figure."""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_temperature.ipynb", "03_strategies.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_fast_mode(name, monkeypatch):
    monkeypatch.setenv("LD_NOTEBOOK_FAST", "1")  # the kernel inherits this process's environment
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb = copy.deepcopy(committed)  # executed in memory: the committed file keeps its outputs
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # raises nbclient.exceptions.CellExecutionError (with the cell's traceback) if any cell fails
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{name} drew no figure"
    assert any("FAST mode: True" in out.get("text", "") for out in outputs), "the FAST switch was not picked up"
