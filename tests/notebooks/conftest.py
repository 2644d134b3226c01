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


#: The course's "clear margin" for the learning bars of the quick profile, for every seed: a trained
#: grader's quadratic kappa must exceed the majority-class baseline's (which is 0) by KAPPA_MARGIN,
#: and its accuracy (or joint accuracy) the baseline's by ACCURACY_MARGIN.
KAPPA_MARGIN = 0.2
ACCURACY_MARGIN = 0.05


def quick_results(stem: str) -> dict:
    """{key: value} of every metric recorded by the committed quick run of a notebook
    (``results/<stem>/quick.json``, written by ``make notebooks``)."""
    import json

    path = ROOT / "results" / stem / "quick.json"
    assert path.is_file(), f"{path} is missing: run `make notebooks` and commit results/"
    return {key: entry["value"] for key, entry in json.loads(path.read_text())["metrics"].items()}
