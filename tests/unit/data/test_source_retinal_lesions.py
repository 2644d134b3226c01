"""Retinal-Lesions source: 8 lesion masks with 255 kept / 127 excluded, grades, Kaggle names."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundus_lib.data.manifest import LESIONS, ManifestError, read_mask
from fundus_lib.data.sources.retinal_lesions import MASK_FILES, load_retinal_lesions
from fundus_lib.data.demo_layouts import RETINAL_LESIONS, SIZE, build_retinal_lesions


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_retinal_lesions(tmp_path / "retinal-lesions-v20191227")


def test_grades_patients_and_eyes(root):
    manifest = load_retinal_lesions(root).set_index("image_id")
    for name, (ours, kaggle, _masks) in RETINAL_LESIONS.items():
        patient, eye = name.split("_")
        assert tuple(manifest.loc[name, ["dr_grade", "kaggle_grade", "patient_id", "eye"]]) == (ours, kaggle, patient, eye)
    assert (manifest["mask_rule"] == "value255").all() and manifest["split"].isna().all()
    assert (manifest["source"] == "retinal_lesions").all()


def test_masks_keep_255_and_exclude_127(root):
    manifest = load_retinal_lesions(root).set_index("image_id")
    for name, (_ours, _kaggle, masks) in RETINAL_LESIONS.items():
        row = manifest.loc[name]
        for stem, lesion in MASK_FILES.items():
            pixels = (masks or {}).get(stem)
            if pixels is None:
                assert pd.isna(row[f"mask_{lesion}"]) and row[f"lesion_{lesion}"] == 0
                continue
            expected = np.zeros(SIZE, dtype=bool)
            for r, c, value in pixels:
                expected[r, c] = value == 255
            np.testing.assert_array_equal(read_mask(row[f"mask_{lesion}"], row["mask_rule"]), expected)
            assert row[f"lesion_{lesion}"] == int(expected.any())
    # retinal_hemorrhage of 10_left holds only excluded (127) pixels: the file exists, the lesion does not count
    assert Path(manifest.loc["10_left", "mask_iHE"]).name == "retinal_hemorrhage.png"
    assert manifest.loc["10_left", "lesion_iHE"] == 0
    assert manifest.loc["4604_right", [f"lesion_{lesion}" for lesion in LESIONS]].sum() == 0


def test_unexpected_mask_file_is_named(root):
    (root / "lesion_segs_896x896" / "10_left" / "drusen.png").write_bytes(b"")
    with pytest.raises(ManifestError, match=r"unexpected file .*10_left/drusen\.png"):
        load_retinal_lesions(root)


def test_grades_csv_without_our_label_is_named(root):
    (root / "dr_grades.csv").write_text("image id,kaggle label\n10_left,1\n")
    with pytest.raises(ManifestError, match=r"grades CSV .*dr_grades\.csv lacks column 'our label'"):
        load_retinal_lesions(root)


def test_missing_images_folder_is_named(root):
    (root / "images_896x896").rename(root / "images")
    with pytest.raises(ManifestError, match="Retinal-Lesions: images_896x896 folder not found"):
        load_retinal_lesions(root)
