"""EyePACS / Kaggle Diabetic Retinopathy Detection 2015 (Kaggle competition rules) -> manifest.

Expected layout (the competition download unpacked)::

    <root>/trainLabels.csv            image,level          (35,126 rows, ICDR 0-4)
    <root>/train/<patient>_<left|right>.jpeg
    <root>/retinopathy_solution.csv   image,level,Usage    (optional: test labels, Usage Public/Private)
    <root>/test/<patient>_<left|right>.jpeg

``split`` is the official one ("train"/"test"); Kaggle split by patient, so a patient's two
eyes are always in one split. ``patient_id`` and ``eye`` come from the name
(``10_left`` -> patient "10", left eye); the test rows get an extra ``usage`` column.

Some images are black or corrupt. With ``check_images=True`` (default) each image is decoded
once at 1/8 scale (JPEG draft mode, in threads; about 20 ms of one core per 3888x2592 image)
and black or unreadable ones are skipped with a warning; ``manifest.attrs["skipped"]`` maps
their ids to the reason.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    find_image, grade_column, image_problems, index_by_stem, kaggle_name, read_csv_table, require_dir,
)

DATASET = "EyePACS"
SOURCE = "eyepacs"
TRAIN_LABELS = "trainLabels.csv"
TEST_LABELS = "retinopathy_solution.csv"


def _split_rows(root: Path, split: str) -> list[dict]:
    labels_path = root / (TRAIN_LABELS if split == "train" else TEST_LABELS)
    columns = {"name": "image", "dr": "level"} | ({"usage": "Usage"} if split == "test" else {})
    table = read_csv_table(labels_path, columns, dataset=DATASET, what="labels CSV").dropna(subset=["name"])
    dr = grade_column(table["dr"], low=0, high=4, dataset=DATASET, column="level", path=labels_path,
                      names=table["name"])
    folder = require_dir(root / split, DATASET, f"{split} image")
    index = index_by_stem(folder, DATASET)
    rows = []
    for position, (name, grade) in enumerate(zip(table["name"], dr)):
        patient, eye = kaggle_name(name, dataset=DATASET, where=labels_path)
        row = {"image_id": name, "image_path": str(find_image(index, name, folder, dataset=DATASET,
                                                              listed_in=labels_path)),
               "split": split, "source": SOURCE, "dr_grade": grade, "patient_id": patient, "eye": eye}
        if split == "test":
            row["usage"] = table["usage"].iloc[position]
        rows.append(row)
    return rows


def load_eyepacs(root: str | Path, include_test: bool | None = None, check_images: bool = True) -> pd.DataFrame:
    """Manifest of EyePACS: the 35,126 training images, plus the test images when labelled.

    ``include_test``: None reads the test set when ``retinopathy_solution.csv`` exists and the
    ``test/`` folder too (labels without images: a warning, training set only), True requires
    both, False skips it. ``check_images`` skips black or unreadable images (warning).
    """
    root = require_dir(Path(root).expanduser().resolve(), DATASET, "dataset root")
    if include_test and not (root / TEST_LABELS).is_file():
        raise ManifestError(f"{DATASET}: include_test=True but the test labels are missing: {root / TEST_LABELS}")
    if include_test is None and (root / TEST_LABELS).is_file() and not (root / "test").is_dir():
        warnings.warn(f"{DATASET}: found the test labels {root / TEST_LABELS} but no test image folder "
                      f"{root / 'test'}; loading the training set only (download test/ or pass "
                      "include_test=False to silence this)", stacklevel=2)
        include_test = False
    splits = ["train"] + (["test"] if include_test or (include_test is None and (root / TEST_LABELS).is_file())
                          else [])
    rows = [row for split in splits for row in _split_rows(root, split)]
    skipped: dict[str, str] = {}
    if check_images:
        problems = image_problems(Path(row["image_path"]) for row in rows)
        skipped = {row["image_id"]: problem for row, problem in zip(rows, problems) if problem}
        rows = [row for row, problem in zip(rows, problems) if not problem]
        if skipped:
            warnings.warn(f"{DATASET}: skipped {len(skipped)} black or unreadable image(s): "
                          f"{list(skipped.items())[:5]}", stacklevel=2)
    manifest = make_manifest(rows)
    if "usage" in manifest.columns:
        manifest["usage"] = manifest["usage"].astype("string")
    manifest.attrs["skipped"] = skipped
    return manifest
