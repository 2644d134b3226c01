"""IDRiD (Indian Diabetic Retinopathy Image Dataset, ISBI 2018; CC BY 4.0) -> manifests.

The official download (IEEE DataPort) has three parts, each read by its own loader; ``root`` is
the folder that holds them::

    A. Segmentation/1. Original Images/{a. Training Set, b. Testing Set}/IDRiD_01.jpg ...
    A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set, b. Testing Set}/
        {1. Microaneurysms, 2. Haemorrhages, 3. Hard Exudates, 4. Soft Exudates, 5. Optic Disc}/
        IDRiD_01_MA.tif  (suffixes _MA _HE _EX _SE _OD)
    B. Disease Grading/1. Original Images/{a. Training Set, b. Testing Set}/IDRiD_001.jpg ...
    B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
    B. Disease Grading/2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv
    C. Localization/1. Original Images/{a. Training Set, b. Testing Set}/IDRiD_001.jpg ...
    C. Localization/2. Groundtruths/1. Optic Disc Center Location/
        a. IDRiD_OD_Center_Training Set_Markups.csv, b. IDRiD_OD_Center_Testing Set_Markups.csv
    C. Localization/2. Groundtruths/2. Fovea Center Location/
        IDRiD_Fovea_Center_Training Set_Markups.csv, IDRiD_Fovea_Center_Testing Set_Markups.csv

Quirks handled: the grading CSV header ``Image name,Retinopathy grade,Risk of macular edema ``
has a trailing space and trailing empty columns, ``Image name`` has no extension, and the test
names repeat the training names (3-digit ids restart at IDRiD_001), so grading and
localisation rows are keyed ``"<split>/<name>"`` (``"train/IDRiD_001"``) - the same key in both,
so the two manifests join on ``image_id``. Segmentation ids (2-digit) are unique and kept as they
are; there is no official mapping between them and the grading ids.

Segmentation masks are RGB TIFFs with pure-red lesion pixels ("nonzero" rule; a mirror's .jpg
masks are read with a threshold by :func:`~fundus_lib.data.manifest.read_mask`). A mask file exists
only when the lesion is present: a missing file means annotated but empty (NA mask path,
``lesion_<L> = 0``). IDRiD's MA/HE/EX/SE map to the project's MA/iHE/HaEx/CWS; the other four
lesions are not annotated (NA). The optic-disc mask goes to the extra column ``mask_OD``.

Localisation: the markup files carry ``Image No, X- Coordinate, Y - Coordinate`` (pixels of
the original 4288x2848 image) plus trailing empty columns and blank rows. The file and column
names above are those of the IEEE DataPort release as used by public readers of it; headers are
matched ignoring case and whitespace. Neither IDRiD part gives patient ids or eyes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    check_mask_files, find_image, grade_column, index_by_stem, lesion_fields, read_csv_table, require_dir,
)

DATASET = "IDRiD"
SOURCE = "idrid"

#: Official split folder names -> manifest split.
SPLIT_FOLDERS: dict[str, str] = {"train": "a. Training Set", "test": "b. Testing Set"}

#: Segmentation ground-truth folder and file suffix per project lesion (IDRiD name in the comment).
SEGMENTATION_MASKS: dict[str, tuple[str, str]] = {
    "MA": ("1. Microaneurysms", "MA"),
    "iHE": ("2. Haemorrhages", "HE"),
    "HaEx": ("3. Hard Exudates", "EX"),
    "CWS": ("4. Soft Exudates", "SE"),
}
OPTIC_DISC_MASKS: tuple[str, str] = ("5. Optic Disc", "OD")

GRADING_LABELS: dict[str, str] = {
    "train": "a. IDRiD_Disease Grading_Training Labels.csv",
    "test": "b. IDRiD_Disease Grading_Testing Labels.csv",
}
GRADING_COLUMNS: dict[str, str] = {
    "name": "Image name", "dr": "Retinopathy grade", "dme": "Risk of macular edema",
}

DISC_MARKUPS: dict[str, str] = {
    "train": "1. Optic Disc Center Location/a. IDRiD_OD_Center_Training Set_Markups.csv",
    "test": "1. Optic Disc Center Location/b. IDRiD_OD_Center_Testing Set_Markups.csv",
}
FOVEA_MARKUPS: dict[str, str] = {
    "train": "2. Fovea Center Location/IDRiD_Fovea_Center_Training Set_Markups.csv",
    "test": "2. Fovea Center Location/IDRiD_Fovea_Center_Testing Set_Markups.csv",
}
MARKUP_COLUMNS: dict[str, str] = {"name": "Image No", "x": "X- Coordinate", "y": "Y - Coordinate"}


def _check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(splits) - set(SPLIT_FOLDERS))
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {tuple(SPLIT_FOLDERS)}, got {list(splits)}")
    return tuple(splits)


def _image_folder(part: Path, split: str) -> Path:
    return require_dir(part / "1. Original Images" / SPLIT_FOLDERS[split], DATASET, f"{split} images")


def load_idrid_grading(root: str | Path, splits: Sequence[str] = ("train", "test")) -> pd.DataFrame:
    """Manifest of IDRiD part B (disease grading): 413 train + 103 test images, DR 0-4, DME 0-2.

    ``image_id`` is ``"<split>/<name>"`` because test names repeat training names.
    """
    part = require_dir(Path(root).expanduser().resolve() / "B. Disease Grading", DATASET, "'B. Disease Grading'")
    rows = []
    for split in _check_splits(splits):
        folder = _image_folder(part, split)
        csv_path = part / "2. Groundtruths" / GRADING_LABELS[split]
        table = read_csv_table(csv_path, GRADING_COLUMNS, dataset=DATASET, what="labels CSV")
        table = table.dropna(subset=["name"])
        dr = grade_column(table["dr"], low=0, high=4, dataset=DATASET, column="Retinopathy grade",
                          path=csv_path, names=table["name"])
        dme = grade_column(table["dme"], low=0, high=2, dataset=DATASET, column="Risk of macular edema",
                           path=csv_path, names=table["name"])
        index = index_by_stem(folder, DATASET)
        for name, dr_grade, dme_grade in zip(table["name"], dr, dme):
            rows.append({
                "image_id": f"{split}/{name}",
                "image_path": str(find_image(index, name, folder, dataset=DATASET, listed_in=csv_path)),
                "split": split, "source": SOURCE, "dr_grade": dr_grade, "dme_grade": dme_grade,
            })
    return make_manifest(rows)


def load_idrid_segmentation(root: str | Path, splits: Sequence[str] = ("train", "test")) -> pd.DataFrame:
    """Manifest of IDRiD part A (lesion segmentation): 54 train + 27 test images with MA/iHE/HaEx/CWS masks.

    Every image in the original-images folders is listed; its mask paths come from the five
    ground-truth folders (a missing file = annotated but empty). Mask files are not decoded here,
    but an empty or non-image mask file raises now, naming it. No grades (NA).
    """
    part = require_dir(Path(root).expanduser().resolve() / "A. Segmentation", DATASET, "'A. Segmentation'")
    rows = []
    for split in _check_splits(splits):
        folder = _image_folder(part, split)
        truth = part / "2. All Segmentation Groundtruths" / SPLIT_FOLDERS[split]
        mask_indexes = {
            lesion: index_by_stem(require_dir(truth / sub, DATASET, f"{split} {suffix} masks"), DATASET)
            for lesion, (sub, suffix) in {**SEGMENTATION_MASKS, "OD": OPTIC_DISC_MASKS}.items()
        }
        images = index_by_stem(folder, DATASET)
        if not images:
            raise ManifestError(f"{DATASET}: no images in {folder}")
        for path in images.values():
            masks = {lesion: mask_indexes[lesion].get(f"{path.stem}_{suffix}".lower())
                     for lesion, (_, suffix) in SEGMENTATION_MASKS.items()}
            disc = mask_indexes["OD"].get(f"{path.stem}_{OPTIC_DISC_MASKS[1]}".lower())
            check_mask_files([*masks.values(), disc], dataset=DATASET)
            rows.append({
                "image_id": path.stem, "image_path": str(path), "split": split, "source": SOURCE,
                "mask_rule": "nonzero", **lesion_fields(masks),
                "mask_OD": pd.NA if disc is None else str(disc),
            })
    manifest = make_manifest(rows)
    manifest["mask_OD"] = manifest["mask_OD"].astype("string")
    return manifest


def _read_markups(path: Path, what: str) -> pd.DataFrame:
    table = read_csv_table(path, MARKUP_COLUMNS, dataset=DATASET, what=what).dropna(subset=["name"])
    for axis in ("x", "y"):
        numbers = pd.to_numeric(table[axis], errors="coerce")
        bad = numbers.isna() | (numbers < 0)
        if bad.any():
            raise ManifestError(f"{DATASET}: {what} {path} has missing or invalid {axis} coordinates for "
                                f"{table['name'][bad].tolist()[:5]}")
        table[axis] = numbers.astype(float)
    return table.set_index("name")


def load_idrid_localisation(root: str | Path, splits: Sequence[str] = ("train", "test")) -> pd.DataFrame:
    """Manifest of IDRiD part C (localisation): optic-disc and fovea centres (pixels) per image.

    ``disc_x, disc_y`` and ``fovea_x, fovea_y`` come from the two markup CSVs; an image listed in
    only one of them has NA for the other. ``image_id`` is ``"<split>/<name>"`` as in
    :func:`load_idrid_grading`.
    """
    part = require_dir(Path(root).expanduser().resolve() / "C. Localization", DATASET, "'C. Localization'")
    rows = []
    for split in _check_splits(splits):
        folder = _image_folder(part, split)
        truth = part / "2. Groundtruths"
        disc = _read_markups(truth / DISC_MARKUPS[split], "optic-disc centre CSV")
        fovea = _read_markups(truth / FOVEA_MARKUPS[split], "fovea centre CSV")
        index = index_by_stem(folder, DATASET)
        names = list(dict.fromkeys([*disc.index, *fovea.index]))
        for name in names:
            listed_in = truth / (DISC_MARKUPS[split] if name in disc.index else FOVEA_MARKUPS[split])
            rows.append({
                "image_id": f"{split}/{name}",
                "image_path": str(find_image(index, name, folder, dataset=DATASET, listed_in=listed_in)),
                "split": split, "source": SOURCE,
                "disc_x": disc["x"].get(name, pd.NA), "disc_y": disc["y"].get(name, pd.NA),
                "fovea_x": fovea["x"].get(name, pd.NA), "fovea_y": fovea["y"].get(name, pd.NA),
            })
    return make_manifest(rows)
