"""The latency notebook executes top to bottom offline (tiny model on a CPU) and writes no file."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "latency_comparison.ipynb"


@pytest.mark.timeout(600)
def test_latency_notebook_runs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("MAME_MODEL", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/markdown", "") for o in outputs
    )
    assert "tiny offline model" in text and "| method |" in text and "MaMe" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the frontier, the live latency plot and the image grid
    assert not list(tmp_path.iterdir())  # figures are shown inline, nothing left in the working folder
