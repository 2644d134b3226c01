"""Messidor-2 (ADCIS licence; adjudicated labels published separately) -> manifest.

Expected layout::

    <root>/IMAGES/20051020_43808_0100_PP.png ... IM000013.JPG ...   (1748 images, mixed extensions)
    <root>/messidor-2.csv        the ADCIS exam list: header "left;right", one exam per line,
                                 "20051020_43808_0100_PP.png;20051020_43832_0100_PP.png"
    <root>/messidor_data.csv     adjudicated grades (Krause et al. 2018, Kaggle
                                 "google-brain/messidor2-dr-grades"): image_id,adjudicated_dr_grade,
                                 adjudicated_dme,adjudicated_gradable

The file names carry no exam id (the two eyes of an exam have unrelated numbers:
``20051020_43808_0100_PP`` / ``20051020_43832_0100_PP``, ``IM000013`` / ``IM000012``), so the
exam grouping comes from the ADCIS exam list: ``patient_id`` = the exam's left-image stem and
``eye`` = its column. Without that file (``require_exams=False``) patient ids and eyes are NA
and a warning says both eyes of an exam may then land in different splits.

Labels: rows with ``adjudicated_gradable == 0`` or a blank grade are dropped (counts in
``manifest.attrs["dropped"]``); ``dr_grade`` is ICDR 0-4 and ``dme_grade`` is the adjudicated
*binary* DME flag (0/1). Label names match image files by stem, case-insensitively
(``IM000013.jpg`` in the CSV is ``IM000013.JPG`` on disk). Images without a label row (four
in the public release) are left out and listed in ``manifest.attrs["unlabelled"]``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    find_image, grade_column, index_by_stem, read_csv_table, require_dir, stem_of,
)

DATASET = "Messidor-2"
SOURCE = "messidor2"
LABEL_COLUMNS: dict[str, str] = {
    "name": "image_id", "dr": "adjudicated_dr_grade", "dme": "adjudicated_dme", "gradable": "adjudicated_gradable",
}
EXAM_COLUMNS: dict[str, str] = {"left": "left", "right": "right"}


def read_exam_list(path: Path) -> dict[str, tuple[str, str]]:
    """lower-case image stem -> (exam id, eye) from the ADCIS exam list (``left;right``, one exam
    per line; the exam id is the left image's stem). The Messidor-1 source reads it too: the
    list's "Messidor-Original" part pairs 1,058 Messidor-1 images into 529 two-eye exams."""
    table = read_csv_table(path, EXAM_COLUMNS, dataset=DATASET, what="exam list", sep=";", key=None)
    incomplete = table[["left", "right"]].isna().any(axis=1)
    if incomplete.any():
        raise ManifestError(f"{DATASET}: exam list {path} has lines without both eyes: "
                            f"{table[incomplete].fillna('').values.tolist()[:5]}")
    exams: dict[str, tuple[str, str]] = {}
    for left, right in zip(table["left"], table["right"]):
        exam = stem_of(left)
        for name, eye in ((left, "left"), (right, "right")):
            key = stem_of(name).lower()
            if key in exams:
                raise ManifestError(f"{DATASET}: exam list {path} lists {name!r} in more than one exam")
            exams[key] = (exam, eye)
    return exams


def load_messidor2(root: str | Path, require_exams: bool = True) -> pd.DataFrame:
    """Manifest of the gradable Messidor-2 images: ICDR DR 0-4, binary DME, exam-level ``patient_id``."""
    root = require_dir(Path(root).expanduser().resolve(), DATASET, "dataset root")
    folder = require_dir(root / "IMAGES", DATASET, "IMAGES")
    labels_path = root / "messidor_data.csv"
    table = read_csv_table(labels_path, LABEL_COLUMNS, dataset=DATASET, what="labels CSV").dropna(subset=["name"])
    gradable = grade_column(table["gradable"], low=0, high=1, dataset=DATASET, column="adjudicated_gradable",
                            path=labels_path, names=table["name"], allow_missing=True)
    dr = grade_column(table["dr"], low=0, high=4, dataset=DATASET, column="adjudicated_dr_grade",
                      path=labels_path, names=table["name"], allow_missing=True)
    dme = grade_column(table["dme"], low=0, high=1, dataset=DATASET, column="adjudicated_dme",
                       path=labels_path, names=table["name"], allow_missing=True)
    ungradable = (gradable == 0).fillna(False).to_numpy(dtype=bool)
    blank = ~ungradable & dr.isna().to_numpy()
    keep = ~ungradable & ~blank

    exams_path = root / "messidor-2.csv"
    if exams_path.is_file() or require_exams:
        exams = read_exam_list(exams_path)
    else:
        exams = {}
        warnings.warn(f"{DATASET}: no exam list {exams_path}; patient_id and eye are NA, so the two eyes "
                      "of an exam are not kept together by group-aware splits", stacklevel=2)

    index = index_by_stem(folder, DATASET)
    rows = []
    for name, dr_grade, dme_grade in zip(table["name"][keep], dr[keep], dme[keep]):
        path = find_image(index, name, folder, dataset=DATASET, listed_in=labels_path)
        exam, eye = exams.get(path.stem.lower(), (pd.NA, pd.NA))
        if exams and exam is pd.NA:
            raise ManifestError(f"{DATASET}: image {path.name} is not in the exam list {exams_path}")
        rows.append({"image_id": path.stem, "image_path": str(path), "source": SOURCE, "dr_grade": dr_grade,
                     "dme_grade": dme_grade, "patient_id": exam, "eye": eye})
    manifest = make_manifest(rows)
    labelled = {stem_of(name).lower() for name in table["name"]}
    manifest.attrs["dropped"] = {"ungradable": int(ungradable.sum()), "blank_grade": int(blank.sum())}
    manifest.attrs["unlabelled"] = sorted(path.name for key, path in index.items() if key not in labelled)
    return manifest
