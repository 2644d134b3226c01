"""IDRiD sources against a fixture tree with the official layout and quirks."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fundus_lib.data.manifest import LESIONS, ManifestError, read_mask
from fundus_lib.data.sources.idrid import load_idrid_grading, load_idrid_localisation, load_idrid_segmentation
from fundus_lib.data.demo_layouts import (
    IDRID_DISC, IDRID_FOVEA, IDRID_GRADES, IDRID_MASK_FOLDERS, IDRID_SEGMENTATION, SIZE, build_idrid,
)

GRADING_CSV = "B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_idrid(tmp_path / "IDRiD")


def test_grading_fixture_has_the_official_quirks(root):
    header = (root / GRADING_CSV).read_text().splitlines()[0]
    assert header.startswith("Image name,Retinopathy grade,Risk of macular edema ,")
    assert header.endswith(",,,")


def test_grading_keys_on_split_and_name_and_reads_grades(root):
    manifest = load_idrid_grading(root)
    expected = {f"{split}/{name}": grades for split, names in IDRID_GRADES.items() for name, grades in names.items()}
    assert len(manifest) == len(expected) == 5
    got = {row.image_id: (row.dr_grade, row.dme_grade) for row in manifest.itertuples()}
    assert got == expected
    assert manifest.set_index("image_id").loc["test/IDRiD_001", "split"] == "test"
    assert (manifest["source"] == "idrid").all()
    for image_id, path in zip(manifest["image_id"], manifest["image_path"]):
        split, name = image_id.split("/")
        assert Path(path).is_absolute() and Path(path).is_file()
        assert Path(path).name == f"{name}.jpg" and ("Training" if split == "train" else "Testing") in path
    assert manifest[[f"lesion_{lesion}" for lesion in LESIONS]].isna().all().all()


def test_grading_splits_option(root):
    manifest = load_idrid_grading(root, splits=("test",))
    assert sorted(manifest["image_id"]) == ["test/IDRiD_001", "test/IDRiD_002"]
    with pytest.raises(ValueError, match="splits"):
        load_idrid_grading(root, splits=("val",))


def test_grading_csv_without_a_column_is_named(root):
    path = root / GRADING_CSV
    path.write_text("Image name,Risk of macular edema \nIDRiD_001,1\n")
    with pytest.raises(ManifestError, match=r"IDRiD: labels CSV .*Training Labels\.csv lacks column 'Retinopathy grade'"):
        load_idrid_grading(root)


def test_grading_image_missing_on_disk_is_named(root):
    missing = root / "B. Disease Grading/1. Original Images/a. Training Set/IDRiD_002.jpg"
    missing.unlink()
    with pytest.raises(ManifestError, match="image listed in .* but missing on disk: .*a. Training Set/IDRiD_002"):
        load_idrid_grading(root)


def test_grading_out_of_range_grade_is_named(root):
    path = root / GRADING_CSV
    path.write_text(path.read_text().replace("IDRiD_003,4,2", "IDRiD_003,7,2"))
    with pytest.raises(ManifestError, match=r"'Retinopathy grade'.*0\.\.4.*IDRiD_003"):
        load_idrid_grading(root)


def test_missing_part_folder_is_named(tmp_path):
    with pytest.raises(ManifestError, match="'B. Disease Grading' folder not found"):
        load_idrid_grading(tmp_path)


def test_segmentation_masks_map_to_the_lesion_vocabulary(root):
    manifest = load_idrid_segmentation(root).set_index("image_id")
    assert list(manifest.index) == ["IDRiD_01", "IDRiD_02", "IDRiD_55"]
    assert list(manifest["split"]) == ["train", "train", "test"]
    assert (manifest["mask_rule"] == "nonzero").all()
    names = {"MA": "MA", "iHE": "HE", "HaEx": "EX", "CWS": "SE"}
    for split, images in IDRID_SEGMENTATION.items():
        for image_id, lesions in images.items():
            row = manifest.loc[image_id]
            for lesion, idrid in names.items():
                expected = np.zeros(SIZE, dtype=bool)
                for pixel in lesions.get(idrid, []):
                    expected[pixel] = True
                mask = read_mask(row[f"mask_{lesion}"], row["mask_rule"], SIZE)
                np.testing.assert_array_equal(mask, expected)
                assert row[f"lesion_{lesion}"] == int(idrid in lesions)
                assert pd.isna(row[f"mask_{lesion}"]) == (idrid not in lesions)
            for lesion in ("vHE", "pHE", "NV", "FiP"):
                assert pd.isna(row[f"lesion_{lesion}"]) and pd.isna(row[f"mask_{lesion}"])
            assert Path(row["mask_OD"]).name == f"{image_id}_OD.tif"
            assert pd.isna(row["dr_grade"])


def test_segmentation_red_tiff_is_76_in_grey_but_read_as_lesion(root):
    manifest = load_idrid_segmentation(root).set_index("image_id")
    path = manifest.loc["IDRiD_01", "mask_MA"]
    with Image.open(path) as handle:
        assert handle.mode == "RGB"
        assert np.asarray(handle.convert("L"))[1, 1] == 76
    assert read_mask(path, "nonzero")[1, 1]


def test_segmentation_missing_lesion_folder_is_named(root):
    folder = root / "A. Segmentation/2. All Segmentation Groundtruths/b. Testing Set" / IDRID_MASK_FOLDERS["SE"]
    folder.rmdir()
    with pytest.raises(ManifestError, match="IDRiD: test SE masks folder not found: .*4. Soft Exudates"):
        load_idrid_segmentation(root)


def test_localisation_reads_disc_and_fovea_and_joins_grading(root):
    manifest = load_idrid_localisation(root).set_index("image_id")
    assert sorted(manifest.index) == ["test/IDRiD_001", "train/IDRiD_001", "train/IDRiD_002"]
    for split, points in IDRID_DISC.items():
        for name, (x, y) in points.items():
            assert (manifest.loc[f"{split}/{name}", "disc_x"], manifest.loc[f"{split}/{name}", "disc_y"]) == (x, y)
    for split, points in IDRID_FOVEA.items():
        for name, (x, y) in points.items():
            assert (manifest.loc[f"{split}/{name}", "fovea_x"], manifest.loc[f"{split}/{name}", "fovea_y"]) == (x, y)
    assert pd.isna(manifest.loc["train/IDRiD_002", "fovea_x"])
    joined = load_idrid_grading(root)[["image_id", "dr_grade"]].merge(manifest.reset_index()[["image_id", "disc_x"]])
    assert len(joined) == 3 and joined.set_index("image_id").loc["test/IDRiD_001", "dr_grade"] == 3


def test_localisation_bad_coordinate_is_named(root):
    path = root / "C. Localization/2. Groundtruths/2. Fovea Center Location/IDRiD_Fovea_Center_Training Set_Markups.csv"
    path.write_text("Image No,X- Coordinate,Y - Coordinate,,\nIDRiD_001,abc,1500,,\n")
    with pytest.raises(ManifestError, match=r"fovea centre CSV .*Markups\.csv has missing or invalid x .*IDRiD_001"):
        load_idrid_localisation(root)
