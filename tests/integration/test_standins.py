"""Every source's stand-in tree (fundus_lib.data.standins) goes through a notebook's data path:
resolve() -> load_dataset() (source, splits, field-of-view cache at the size asked) -> the tasks it labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fundus_lib.config import resolve
from fundus_lib.data.pipeline import available_tasks, load_dataset
from fundus_lib.data.standins import WRITERS, build_standin
from fundus_lib.data.sources import SOURCES

#: Source -> the tasks its stand-in (like the real dataset) labels.
LABELLED = {
    "idrid_grading": {"dr", "dme"}, "idrid_segmentation": {"masks", "lesion_present"},
    "messidor": {"dr", "dme"}, "messidor2": {"dr", "dme"}, "aptos": {"dr"}, "eyepacs": {"dr"},
    "ddr_grading": {"dr"}, "ddr_segmentation": {"masks", "lesion_present"},
    "retinal_lesions": {"dr", "masks", "lesion_present"},
}


def test_every_real_source_has_a_standin():
    assert set(WRITERS) == set(SOURCES) - {"synthetic", "idrid_localisation"} == set(LABELLED)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project" / "configs" / "97_data"
    folder.mkdir(parents=True)
    quick = {"profile": "quick", "seed": 0, "dataset": "synthetic", "data_dir": None, "image_size": 48}
    (folder / "quick.yaml").write_text(yaml.safe_dump(quick))
    return tmp_path / "project"


@pytest.mark.parametrize("source", sorted(LABELLED))
def test_standin_runs_through_load_dataset(source, project, tmp_path, capsys):
    root = build_standin(source, tmp_path / source, size=64)  # the default 24 images: enough per grade to split
    cfg = resolve({"profile": "quick", "dataset": source, "data_dir": str(root)}, "97_data", root=project)
    manifest = load_dataset(cfg)
    assert set(manifest["split"]) == {"train", "val", "test"} and len(manifest) == 24
    assert manifest["source"].notna().all()
    with Image.open(manifest["image_path"].iloc[0]) as cached:
        assert cached.size == (48, 48)
    with Image.open(load_dataset(cfg, image_size=40)["image_path"].iloc[0]) as cached:
        assert cached.size == (40, 40)  # a second size has its own cache, not a resize of the first
    kept = available_tasks(manifest, ("dr", "dme", "masks", "lesion_present"), cfg.data_label)
    assert set(kept) == LABELLED[source]
    dropped = {"dr", "dme", "masks", "lesion_present"} - LABELLED[source]
    notes = capsys.readouterr().out
    assert all(f"the {task!r} task is left out" in notes for task in dropped), notes
    if "dr" in kept:
        assert manifest["dr_grade"].notna().all() and manifest["dr_grade"].between(0, 4).all()


def test_standin_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_standin("aptos", tmp_path)
    with pytest.raises(ValueError, match="no stand-in for source 'kaggle'"):
        build_standin("kaggle", tmp_path / "new")


def test_standin_masks_are_the_synthetic_lesions(tmp_path):
    """Retinal-Lesions keeps every lesion: the manifest's presence flags equal the generated masks'."""
    from fundus_lib.data.manifest import LESIONS
    from fundus_lib.data.sources import load_source
    from fundus_lib.data.standins import synthetic_photos

    manifest = load_source("retinal_lesions", build_standin("retinal_lesions", tmp_path, n=6, size=64))
    photos = synthetic_photos(6, 64)
    expected = np.array([[photo.masks[j].any() for j in range(len(LESIONS))] for photo in photos])
    assert np.array_equal(manifest[[f"lesion_{lesion}" for lesion in LESIONS]].to_numpy(dtype=int), expected)
