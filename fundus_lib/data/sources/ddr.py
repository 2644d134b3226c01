"""DDR (Li et al., Information Sciences 2019; 13,673 images from 147 Chinese hospitals) -> manifests.

Expected layout (the release unpacked; ``root`` holds both tasks)::

    <root>/DR_grading/{train,valid,test}.txt        lines "<name> <label>", space separated, no header
    <root>/DR_grading/{train,valid,test}/<name>     images (.jpg)
    <root>/lesion_segmentation/{train,valid,test}/image/<stem>.jpg
    <root>/lesion_segmentation/{train,test}/label/{EX,HE,MA,SE}/<stem>.tif
    <root>/lesion_segmentation/valid/segmentation label/{EX,HE,MA,SE}/<stem>.tif

Grading labels are ICDR 0-4 plus 5 = ungradable; ungradable rows are dropped (count in
``manifest.attrs["dropped"]``). The official split folder "valid" becomes split "val". Image
names are unique across splits, so ``image_id`` is the file stem.

The release ships a mask for every image and lesion, all black when the lesion is absent, so
presence is read from the mask pixels ("nonzero" rule; this reads every mask once); a mask
file that is missing is taken as annotated but empty (NA path, presence 0), as for IDRiD. DDR's
MA/HE/EX/SE map to the project's MA/iHE/HaEx/CWS; the other four lesions are NA. The mask
folder is ``label`` for train/test and ``segmentation label`` for valid; either name is
accepted in any split. DDR publishes no patient ids or eyes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    drop_repeated_rows, find_image, grade_column, index_by_stem, lesion_fields, presence_from_masks, require_dir,
    require_file,
)

DATASET = "DDR"
SOURCE = "ddr"
UNGRADABLE = 5
#: Official split name -> manifest split.
SPLITS: dict[str, str] = {"train": "train", "valid": "val", "test": "test"}
#: DDR lesion folder -> project lesion.
SEGMENTATION_MASKS: dict[str, str] = {"MA": "MA", "iHE": "HE", "HaEx": "EX", "CWS": "SE"}
MASK_FOLDERS: tuple[str, ...] = ("label", "segmentation label")


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {tuple(SPLITS)} (official names), got {list(splits)}")
    return tuple(splits)


def _read_list(path: Path) -> pd.DataFrame:
    """Parse a ``<name> <label>`` list (index: line numbers); raise naming the line that does not fit.
    An image listed twice is handled by :func:`drop_repeated_rows`."""
    require_file(path, DATASET, "grading list")
    names, labels, numbers = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ManifestError(f"{DATASET}: {path} line {number}: expected '<name> <label>', got {line!r}")
        names.append(fields[0])
        labels.append(fields[1])
        numbers.append(number)
    if not names:
        raise ManifestError(f"{DATASET}: grading list {path} is empty")
    table = pd.DataFrame({"name": names, "label": labels}, dtype="string",
                         index=pd.Index(numbers, name="line"))
    return drop_repeated_rows(table, "name", dataset=DATASET, what="grading list", path=path)


def load_ddr_grading(root: str | Path, splits: Sequence[str] = ("train", "valid", "test")) -> pd.DataFrame:
    """Manifest of DDR DR grading (ICDR 0-4; label 5 = ungradable, dropped). ``splits`` uses official names."""
    part = require_dir(Path(root).expanduser().resolve() / "DR_grading", DATASET, "DR_grading")
    rows, dropped = [], 0
    for split in _check_splits(splits):
        list_path = part / f"{split}.txt"
        table = _read_list(list_path)
        labels = grade_column(table["label"], low=0, high=UNGRADABLE, dataset=DATASET, column="label",
                              path=list_path, names=table["name"])
        gradable = (labels != UNGRADABLE).to_numpy(dtype=bool)
        dropped += int((~gradable).sum())
        folder = require_dir(part / split, DATASET, f"{split} image")
        index = index_by_stem(folder, DATASET)
        for name, grade in zip(table["name"][gradable], labels[gradable]):
            path = find_image(index, name, folder, dataset=DATASET, listed_in=list_path)
            rows.append({"image_id": path.stem, "image_path": str(path), "split": SPLITS[split],
                         "source": SOURCE, "dr_grade": grade})
    manifest = make_manifest(rows)
    manifest.attrs["dropped"] = {"ungradable": dropped}
    return manifest


def _mask_root(split_dir: Path) -> Path:
    for name in MASK_FOLDERS:
        if (split_dir / name).is_dir():
            return split_dir / name
    raise ManifestError(f"{DATASET}: mask folder not found: expected {split_dir / MASK_FOLDERS[0]} "
                        f"or {split_dir / MASK_FOLDERS[1]}")


def load_ddr_segmentation(root: str | Path, splits: Sequence[str] = ("train", "valid", "test")) -> pd.DataFrame:
    """Manifest of DDR lesion segmentation (757 images) with MA/iHE/HaEx/CWS masks; presence read from the masks."""
    part = require_dir(Path(root).expanduser().resolve() / "lesion_segmentation", DATASET, "lesion_segmentation")
    rows = []
    for split in _check_splits(splits):
        split_dir = require_dir(part / split, DATASET, f"{split} segmentation")
        folder = require_dir(split_dir / "image", DATASET, f"{split} segmentation image")
        mask_root = _mask_root(split_dir)
        mask_indexes = {lesion: index_by_stem(require_dir(mask_root / sub, DATASET, f"{split} {sub} mask"), DATASET)
                        for lesion, sub in SEGMENTATION_MASKS.items()}
        images = index_by_stem(folder, DATASET)
        if not images:
            raise ManifestError(f"{DATASET}: no images in {folder}")
        for key, path in images.items():
            masks = {lesion: mask_indexes[lesion].get(key) for lesion in SEGMENTATION_MASKS}
            rows.append({"image_id": path.stem, "image_path": str(path), "split": SPLITS[split],
                         "source": SOURCE, "mask_rule": "nonzero",
                         **lesion_fields(masks, presence_from_masks(masks, "nonzero", dataset=DATASET))})
    return make_manifest(rows)
