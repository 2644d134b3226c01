"""EyePACS / Kaggle 2015 source: patients from names, optional test labels, black/corrupt images."""
from pathlib import Path

import pytest

from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.sources.eyepacs import load_eyepacs
from fundus_lib.data.demo_layouts import EYEPACS_BLACK, EYEPACS_CORRUPT, EYEPACS_TEST, EYEPACS_TRAIN, build_eyepacs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_eyepacs(tmp_path / "eyepacs")


def test_black_and_corrupt_images_are_skipped_counted_and_warned(root):
    with pytest.warns(UserWarning, match=r"skipped 2 black or unreadable image\(s\)"):
        manifest = load_eyepacs(root)
    assert manifest.attrs["skipped"].keys() == {EYEPACS_BLACK, EYEPACS_CORRUPT}
    assert manifest.attrs["skipped"][EYEPACS_BLACK] == "black"
    assert manifest.attrs["skipped"][EYEPACS_CORRUPT].startswith("unreadable")
    kept = set(EYEPACS_TRAIN) - {EYEPACS_BLACK, EYEPACS_CORRUPT}
    assert set(manifest["image_id"]) == kept | set(EYEPACS_TEST)


def test_splits_patients_eyes_grades_and_usage(root):
    manifest = load_eyepacs(root, check_images=False).set_index("image_id")
    assert len(manifest) == len(EYEPACS_TRAIN) + len(EYEPACS_TEST)
    for name, level in EYEPACS_TRAIN.items():
        patient, eye = name.split("_")
        assert tuple(manifest.loc[name, ["split", "dr_grade", "patient_id", "eye"]]) == ("train", level, patient, eye)
        assert Path(manifest.loc[name, "image_path"]) == (root / "train" / f"{name}.jpeg").resolve()
    for name, (level, usage) in EYEPACS_TEST.items():
        assert tuple(manifest.loc[name, ["split", "dr_grade", "usage"]]) == ("test", level, usage)
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1


def test_include_test_options(root):
    assert set(load_eyepacs(root, include_test=False, check_images=False)["split"]) == {"train"}
    (root / "retinopathy_solution.csv").unlink()
    assert set(load_eyepacs(root, check_images=False)["split"]) == {"train"}
    with pytest.raises(ManifestError, match=r"include_test=True but the test labels are missing: .*retinopathy_solution\.csv"):
        load_eyepacs(root, include_test=True)


def test_malformed_image_name_is_named(root):
    (root / "trainLabels.csv").write_text("image,level\n10_centre,0\n")
    with pytest.raises(ManifestError, match=r"'10_centre' in .*trainLabels\.csv is not of the form"):
        load_eyepacs(root, check_images=False)


def test_missing_column_and_missing_image_are_named(root):
    (root / "test" / "1_right.jpeg").unlink()
    with pytest.raises(ManifestError, match="image listed in .*retinopathy_solution.csv but missing on disk: .*test/1_right"):
        load_eyepacs(root, check_images=False)
    (root / "trainLabels.csv").write_text("image,grade\n10_left,0\n")
    with pytest.raises(ManifestError, match=r"EyePACS: labels CSV .*trainLabels\.csv lacks column 'level'"):
        load_eyepacs(root, check_images=False)
