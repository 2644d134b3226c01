"""APTOS 2019 source against a fixture tree with the competition layout."""
from pathlib import Path

import pytest

from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.sources.aptos import load_aptos
from fundus_lib.data.demo_layouts import APTOS_LABELS, build_aptos


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_aptos(tmp_path / "aptos")


def test_manifest_reads_ids_grades_and_paths(root):
    manifest = load_aptos(root)
    assert dict(zip(manifest["image_id"], manifest["dr_grade"])) == APTOS_LABELS
    for image_id, path in zip(manifest["image_id"], manifest["image_path"]):
        assert Path(path) == (root / "train_images" / f"{image_id}.png").resolve()
    assert manifest["split"].isna().all() and manifest["patient_id"].isna().all()
    assert (manifest["source"] == "aptos").all()


def test_missing_column_is_named(root):
    (root / "train.csv").write_text("id_code,level\n000c1434d8d7,2\n")
    with pytest.raises(ManifestError, match=r"APTOS: labels CSV .*train\.csv lacks column 'diagnosis'"):
        load_aptos(root)


def test_missing_labels_file_is_named(root):
    (root / "train.csv").unlink()
    with pytest.raises(ManifestError, match=r"APTOS: labels CSV not found: .*train\.csv"):
        load_aptos(root)


def test_listed_image_missing_on_disk_is_named(root):
    (root / "train_images" / "001639a390f0.png").unlink()
    with pytest.raises(ManifestError, match="image listed in .*train.csv but missing on disk: .*train_images/001639a390f0"):
        load_aptos(root)


def test_non_integer_grade_is_named(root):
    (root / "train.csv").write_text("id_code,diagnosis\n000c1434d8d7,two\n")
    with pytest.raises(ManifestError, match=r"'diagnosis' .*0\.\.4.*000c1434d8d7: 'two'"):
        load_aptos(root)
