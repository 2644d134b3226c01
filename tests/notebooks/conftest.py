"""Shared helpers for the notebook tests."""
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def read(notebook: Path) -> nbformat.NotebookNode:
    return nbformat.read(notebook, as_version=4)


def parameters_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]


def notebook_params():
    return pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.stem for nb in NOTEBOOKS])
