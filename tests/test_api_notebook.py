"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel (so it cannot rot, and
workers=2 is exercised from a kernel): nbclient executes it in a scratch folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    monkeypatch.chdir(tmp_path)  # runs/ and the data cache land here
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "History(10 steps" in text
    assert "perplexity" in text
    # The classifier's cell: two predictions and a score in [0, 1].
    last = nb.cells[-1]["outputs"][-1]["data"]["text/plain"]
    assert last.startswith("(array([") and len(list(tmp_path.glob("runs/tiny-cpu-*"))) == 1
