"""DDR sources: grading lists with ungradable label 5, segmentation masks incl. 'segmentation label'."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundus_lib.data.manifest import ManifestError, read_mask
from fundus_lib.data.sources.ddr import load_ddr_grading, load_ddr_segmentation
from fundus_lib.data.demo_layouts import DDR_GRADING, DDR_SEGMENTATION, SIZE, build_ddr

DDR_TO_PROJECT = {"MA": "MA", "HE": "iHE", "EX": "HaEx", "SE": "CWS"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_ddr(tmp_path / "DDR")


def test_grading_drops_label_5_and_renames_valid(root):
    manifest = load_ddr_grading(root)
    expected = {Path(name).stem: (("val" if split == "valid" else split), label)
                for split, labels in DDR_GRADING.items() for name, label in labels.items() if label != 5}
    assert {row.image_id: (row.split, row.dr_grade) for row in manifest.itertuples()} == expected
    assert manifest.attrs["dropped"] == {"ungradable": 2}
    for path, split in zip(manifest["image_path"], manifest["split"]):
        assert Path(path).parent.name == ("valid" if split == "val" else split) and Path(path).is_file()


def test_grading_malformed_line_is_named(root):
    (root / "DR_grading" / "valid.txt").write_text("007-0025-000.jpg 3\n007-0026-000.jpg\n")
    with pytest.raises(ManifestError, match=r"DDR: .*valid\.txt line 2: expected '<name> <label>'"):
        load_ddr_grading(root)


def test_grading_label_out_of_range_and_missing_list_are_named(root):
    (root / "DR_grading" / "test.txt").write_text("007-0031-000.jpg 6\n")
    with pytest.raises(ManifestError, match=r"'label' of .*test\.txt must hold integers 0\.\.5"):
        load_ddr_grading(root)
    (root / "DR_grading" / "test.txt").unlink()
    with pytest.raises(ManifestError, match=r"DDR: grading list not found: .*test\.txt"):
        load_ddr_grading(root)
    assert set(load_ddr_grading(root, splits=("train", "valid"))["split"]) == {"train", "val"}


def test_segmentation_reads_masks_and_presence_including_validation_folder(root):
    manifest = load_ddr_segmentation(root).set_index("image_id")
    for split, images in DDR_SEGMENTATION.items():
        for stem, lesions in images.items():
            row = manifest.loc[stem]
            assert row["split"] == ("val" if split == "valid" else split)
            for ddr_name, pixels in lesions.items():
                lesion = DDR_TO_PROJECT[ddr_name]
                expected = np.zeros(SIZE, dtype=bool)
                for pixel in pixels:
                    expected[pixel] = True
                np.testing.assert_array_equal(read_mask(row[f"mask_{lesion}"], row["mask_rule"]), expected)
                assert row[f"lesion_{lesion}"] == int(bool(pixels))
            for lesion in ("vHE", "pHE", "NV", "FiP"):
                assert pd.isna(row[f"lesion_{lesion}"])
    assert "segmentation label" in manifest.loc["007-2711-200", "mask_iHE"]


def test_segmentation_missing_mask_file_is_an_empty_annotation(root):
    (root / "lesion_segmentation" / "test" / "label" / "SE" / "007-3001-100.tif").unlink()
    row = load_ddr_segmentation(root).set_index("image_id").loc["007-3001-100"]
    assert pd.isna(row["mask_CWS"]) and row["lesion_CWS"] == 0


def test_segmentation_missing_mask_folder_is_named(root):
    folder = root / "lesion_segmentation" / "valid" / "segmentation label"
    folder.rename(folder.parent / "masks")
    with pytest.raises(ManifestError, match="DDR: mask folder not found: expected .*valid/label or .*valid/segmentation label"):
        load_ddr_segmentation(root)
