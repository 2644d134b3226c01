"""Messidor-2 source: mixed extensions, case-insensitive stems, ungradable rows, exam grouping."""
from pathlib import Path

import pandas as pd
import pytest

from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.sources.messidor2 import load_messidor2
from fundus_lib.data.demo_layouts import build_messidor2


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_messidor2(tmp_path / "messidor-2")


def test_manifest_drops_ungradable_and_blank_rows(root):
    manifest = load_messidor2(root)
    assert list(manifest["image_id"]) == ["20051020_43808_0100_PP", "20051020_43832_0100_PP", "IM000013", "IM000012"]
    assert list(manifest["dr_grade"]) == [0, 2, 4, 1]
    assert list(manifest["dme_grade"]) == [0, 1, 1, 0]
    assert manifest.attrs["dropped"] == {"ungradable": 1, "blank_grade": 1}
    assert manifest.attrs["unlabelled"] == ["IM000099.JPG"]
    assert (manifest["source"] == "messidor2").all() and pd.api.types.is_integer_dtype(manifest["dme_grade"])


def test_mixed_extensions_match_case_insensitively(root):
    paths = load_messidor2(root).set_index("image_id")["image_path"]
    assert Path(paths["IM000013"]).name == "IM000013.JPG"  # listed as IM000013.jpg
    assert Path(paths["20051020_43808_0100_PP"]).name == "20051020_43808_0100_PP.png"
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in paths)


def test_exam_list_gives_patient_and_eye(root):
    manifest = load_messidor2(root).set_index("image_id")
    assert manifest.loc["20051020_43808_0100_PP", "patient_id"] == manifest.loc["20051020_43832_0100_PP", "patient_id"]
    assert manifest.loc["IM000013", "patient_id"] == manifest.loc["IM000012", "patient_id"] == "IM000013"
    assert manifest["patient_id"].nunique() == 2
    assert list(manifest["eye"]) == ["left", "right", "left", "right"]


def test_missing_exam_list_is_named_unless_not_required(root):
    (root / "messidor-2.csv").unlink()
    with pytest.raises(ManifestError, match=r"Messidor-2: exam list not found: .*messidor-2\.csv"):
        load_messidor2(root)
    with pytest.warns(UserWarning, match="patient_id and eye are NA"):
        manifest = load_messidor2(root, require_exams=False)
    assert len(manifest) == 4 and manifest["patient_id"].isna().all()


def test_exam_list_line_without_both_eyes_is_named(root):
    (root / "messidor-2.csv").write_text("left;right\nIM000013.JPG;\n")
    with pytest.raises(ManifestError, match="lines without both eyes"):
        load_messidor2(root)


def test_image_absent_from_exam_list_is_named(root):
    (root / "messidor-2.csv").write_text("left;right\nIM000013.JPG;IM000012.JPG\n")
    with pytest.raises(ManifestError, match="image 20051020_43808_0100_PP.png is not in the exam list"):
        load_messidor2(root)


def test_listed_image_missing_on_disk_is_named(root):
    (root / "IMAGES" / "IM000012.JPG").unlink()
    with pytest.raises(ManifestError, match=r"image listed in .*messidor_data\.csv but missing on disk: .*IM000012\.jpg"):
        load_messidor2(root)


def test_labels_without_a_column_are_named(root):
    path = root / "messidor_data.csv"
    path.write_text(path.read_text().replace("adjudicated_gradable", "gradable"))
    with pytest.raises(ManifestError, match="labels CSV .*messidor_data.csv lacks column 'adjudicated_gradable'"):
        load_messidor2(root)


def test_dme_outside_binary_is_named(root):
    path = root / "messidor_data.csv"
    path.write_text(path.read_text().replace("IM000012.jpg,1,0,1", "IM000012.jpg,1,2,1"))
    with pytest.raises(ManifestError, match=r"'adjudicated_dme' .* 0\.\.1.*IM000012"):
        load_messidor2(root)
