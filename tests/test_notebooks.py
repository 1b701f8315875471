"""The example notebooks run top to bottom (FAST settings: tiny fits) and draw at least one figure."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
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
    # nothing on stderr: no warning (e.g. tqdm's "IProgress not found" when ipywidgets is not installed)
    assert not [out.get("text", "") for out in outputs if out.get("name") == "stderr"]
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{name} drew no figure"
    assert any("FAST mode: True" in out.get("text", "") for out in outputs), "the FAST switch was not picked up"


def test_notebook_runs_with_nbconvert_without_warnings(tmp_path):
    """The command the README gives (`jupyter nbconvert --execute --to notebook ...`; nbconvert comes with
    `[dev]`) runs a notebook headless, without warnings from the notebook (IProgress) or about it."""
    pytest.importorskip("nbconvert")
    env = dict(os.environ, LD_NOTEBOOK_FAST="1")
    command = [sys.executable, "-m", "nbconvert", "--execute", "--to", "notebook"]
    command += ["--output-dir", str(tmp_path), str(NOTEBOOKS / NAMES[0])]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the one warning left is ipykernel's own (its loopback connection to nbconvert is not encrypted)
    warnings = [line for line in proc.stderr.splitlines() if "warn" in line.lower() and "over TCP" not in line]
    assert not warnings, proc.stderr
    executed = json.loads((tmp_path / NAMES[0]).read_text())
    stderr = [
        "".join(out.get("text", ""))
        for cell in executed["cells"]
        for out in cell.get("outputs", [])
        if out.get("name") == "stderr"
    ]
    assert not stderr, stderr
