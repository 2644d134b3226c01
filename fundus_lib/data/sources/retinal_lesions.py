"""Retinal-Lesions (Wei et al., ICPR 2020: the public part of the L-Net/SiAN data) -> manifest.

1,593 images from the Kaggle 2015 (EyePACS) set, cropped to the field of view and resized to
896x896, re-graded (DR 0-4) by a panel of ophthalmologists and annotated with masks for the
eight L-Net/SiAN lesions. Request it from the authors (github.com/WeiQijie/retinal-lesions).
Layout of the release ``retinal-lesions-v20191227`` (``root`` is that folder)::

    <root>/images_896x896/<patient>_<left|right>.jpg
    <root>/lesion_segs_896x896/<patient>_<left|right>/<lesion>.png    greyscale masks
    <root>/dr_grades.csv          "image id,kaggle label,our label" (id without extension)

Mask files, named by lesion: microaneurysm (MA), retinal_hemorrhage (iHE), hard_exudate
(HaEx), cotton_wool_spots (CWS), vitreous_hemorrhage (vHE), preretinal_hemorrhage (pHE),
neovascularization (NV), fibrous_proliferation (FiP). A file exists only for the lesions an image
has (a few images have no mask folder at all): a missing file means annotated but absent. Pixel
value 255 marks a lesion used in the experiments, 127 a lesion the authors excluded (annotations
that do not follow the AAO grading guideline), so ``mask_rule`` is "value255" and
``lesion_<L>`` is 1 only where a mask has a 255 pixel (each mask is read once).

``dr_grade`` is the re-graded "our label" (the README's counts); the Kaggle grade is kept in the
extra column ``kaggle_grade``. There is no official split (``split`` NA); ``patient_id`` and
``eye`` come from the Kaggle name, so a patient's two eyes can be kept together. This layout was
taken from the authors' README and from public readers of the release; the folder and column
names are checked and any mismatch is reported by name.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundus_lib.data.manifest import LESIONS, ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    find_image, folder_files, grade_column, index_by_stem, kaggle_name, lesion_fields, presence_from_masks,
    read_csv_table, require_dir,
)

DATASET = "Retinal-Lesions"
SOURCE = "retinal_lesions"
IMAGES = "images_896x896"
MASKS = "lesion_segs_896x896"
GRADES = "dr_grades.csv"
GRADE_COLUMNS: dict[str, str] = {"name": "image id", "dr": "our label"}
#: Mask file stem -> project lesion.
MASK_FILES: dict[str, str] = {
    "microaneurysm": "MA", "retinal_hemorrhage": "iHE", "hard_exudate": "HaEx", "cotton_wool_spots": "CWS",
    "vitreous_hemorrhage": "vHE", "preretinal_hemorrhage": "pHE", "neovascularization": "NV",
    "fibrous_proliferation": "FiP",
}


def _masks_of(folder: Path) -> dict[str, Path | None]:
    """Mask path (or None) per lesion for one image's mask folder; unknown file names raise,
    OS junk (``.DS_Store``, ``Thumbs.db``, ...) is skipped."""
    masks: dict[str, Path | None] = dict.fromkeys(LESIONS)
    if not folder.is_dir():
        return masks
    for path in folder_files(folder):
        lesion = MASK_FILES.get(path.stem.lower())
        if lesion is None or path.suffix.lower() != ".png":
            raise ManifestError(f"{DATASET}: unexpected file {path}; mask files are "
                                f"{sorted(f'{stem}.png' for stem in MASK_FILES)}")
        masks[lesion] = path.resolve()
    return masks


def load_retinal_lesions(root: str | Path) -> pd.DataFrame:
    """Manifest of Retinal-Lesions: 1,593 images, DR 0-4, masks of all 8 lesions ("value255" rule)."""
    root = Path(root).expanduser().resolve()
    folder = require_dir(root / IMAGES, DATASET, IMAGES)
    mask_root = require_dir(root / MASKS, DATASET, MASKS)
    grades_path = root / GRADES
    table = read_csv_table(grades_path, GRADE_COLUMNS, dataset=DATASET, what="grades CSV",
                           optional={"kaggle": "kaggle label"}).dropna(subset=["name"])
    dr = grade_column(table["dr"], low=0, high=4, dataset=DATASET, column="our label", path=grades_path,
                      names=table["name"])
    kaggle = (grade_column(table["kaggle"], low=0, high=4, dataset=DATASET, column="kaggle label",
                           path=grades_path, names=table["name"], allow_missing=True)
              if "kaggle" in table.columns else pd.Series(pd.NA, index=table.index, dtype="Int64"))
    index = index_by_stem(folder, DATASET)
    rows = []
    for name, grade, kaggle_grade in zip(table["name"], dr, kaggle):
        path = find_image(index, name, folder, dataset=DATASET, listed_in=grades_path)
        patient, eye = kaggle_name(path.stem, dataset=DATASET, where=grades_path)
        masks = _masks_of(mask_root / path.stem)
        rows.append({"image_id": path.stem, "image_path": str(path), "source": SOURCE, "dr_grade": grade,
                     "patient_id": patient, "eye": eye, "mask_rule": "value255",
                     **lesion_fields(masks, presence_from_masks(masks, "value255", dataset=DATASET)),
                     "kaggle_grade": kaggle_grade})
    manifest = make_manifest(rows)
    manifest["kaggle_grade"] = manifest["kaggle_grade"].astype("Int64")
    return manifest
