"""The source registry: names, lazy loading, dispatch and the unknown-name error."""
import importlib.util

import pytest

from fundus_lib.data.manifest import MANIFEST_COLUMNS
from fundus_lib.data.sources import SOURCES, get_loader, load_source
from fundus_lib.data.sources.idrid import load_idrid_grading
from fundus_lib.data.demo_layouts import build_aptos, build_idrid

EXPECTED = {"synthetic", "idrid_grading", "idrid_segmentation", "idrid_localisation", "messidor", "messidor2",
            "aptos", "eyepacs", "ddr_grading", "ddr_segmentation", "retinal_lesions"}


def test_registry_names():
    assert set(SOURCES) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED - {"synthetic"}))
def test_every_real_source_resolves_to_its_loader(name):
    loader = get_loader(name)
    assert callable(loader) and loader.__name__ == SOURCES[name].split(":")[1]


def test_synthetic_resolves_once_its_module_exists():
    if importlib.util.find_spec("fundus_lib.data.sources.synthetic") is None:
        pytest.skip("fundus_lib.data.sources.synthetic is not written yet")
    assert get_loader("synthetic").__name__ == "load_synthetic"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dataset source 'idrd'; expected one of \[.*'idrid_grading'.*\]"):
        load_source("idrd", "/nowhere")


def test_load_source_dispatches_with_kwargs(tmp_path):
    root = build_idrid(tmp_path / "IDRiD")
    via_registry = load_source("idrid_grading", root, splits=("train",))
    assert via_registry.equals(load_idrid_grading(root, splits=("train",)))
    manifest = load_source("aptos", build_aptos(tmp_path / "aptos"))
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
