"""Both notebooks run top to bottom (with a short run) and show their plots."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def execute(name: str, parameters: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = parameters
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    return notebook


def images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )


def test_notebooks_run_top_to_bottom(tmp_path):
    quick = execute("quickstart.ipynb", f"MAX_STEPS = 20\nSAVE_STEPS = 10\nWORK = {str(tmp_path)!r}")
    assert images(quick) == 3  # the loss curve, evaluate-all's plot, the predicted images
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-20",
    ]
    inspect = execute("inspect_run.ipynb", f"RUN_DIR = {str(tmp_path / 'run')!r}")
    assert images(inspect) == 2  # curves and the evaluate-all accuracy
    nbformat.write(quick, tmp_path / "quickstart.executed.ipynb")
