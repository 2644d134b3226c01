"""APTOS 2019 Blindness Detection (Kaggle competition rules) -> manifest.

Expected layout (the competition download unpacked)::

    <root>/train.csv                 id_code,diagnosis   (3662 rows, ICDR 0-4)
    <root>/train_images/<id_code>.png

Only the labelled training set is read (the competition's test labels were never released), so
``split`` is NA; APTOS publishes no patient ids or eyes.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundus_lib.data.manifest import make_manifest
from fundus_lib.data.sources._common import find_image, grade_column, index_by_stem, read_csv_table, require_dir

DATASET = "APTOS"
SOURCE = "aptos"
LABEL_COLUMNS: dict[str, str] = {"name": "id_code", "dr": "diagnosis"}


def load_aptos(root: str | Path) -> pd.DataFrame:
    """Manifest of the 3662 labelled APTOS 2019 images (ICDR DR 0-4)."""
    root = require_dir(Path(root).expanduser().resolve(), DATASET, "dataset root")
    labels_path = root / "train.csv"
    table = read_csv_table(labels_path, LABEL_COLUMNS, dataset=DATASET, what="labels CSV").dropna(subset=["name"])
    dr = grade_column(table["dr"], low=0, high=4, dataset=DATASET, column="diagnosis", path=labels_path,
                      names=table["name"])
    folder = require_dir(root / "train_images", DATASET, "train_images")
    index = index_by_stem(folder, DATASET)
    return make_manifest([
        {"image_id": name, "image_path": str(find_image(index, name, folder, dataset=DATASET, listed_in=labels_path)),
         "source": SOURCE, "dr_grade": grade}
        for name, grade in zip(table["name"], dr)
    ])
