"""Source for a SynthFundus folder (written by :func:`fundus_lib.data.synthetic.write_dataset`).

The folder has the shape of a real lesion dataset: ``<id>.png`` images, IDRiD-style
``<id>_<LESION>.png`` masks that exist only for lesions present, and ``labels.csv``. Every
synthetic image annotates all 8 lesions, so every ``lesion_<L>`` is 0 or 1 (never NA) and a
missing mask file means "annotated, absent". The source cross-checks the mask files against the
presence columns of ``labels.csv`` and raises :class:`~fundus_lib.data.manifest.ManifestError`
on any disagreement, so a half-copied folder is caught here rather than during training.

Rows get ``source = "synthetic"`` (results on them are synthetic results), ``patient_id =
image_id`` (each synthetic eye is its own patient) and ``split`` from ``labels.csv`` when the
folder was written with one. All further label columns (lesion counts per quadrant, quality
flags, seed, ...) are kept as extra manifest columns.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundus_lib.data.manifest import LESIONS, ManifestError, make_manifest
from fundus_lib.data.sources._common import drop_repeated_rows, grade_column, lesion_fields, require_dir, require_file

DATASET = "synthetic"

#: Columns ``labels.csv`` must have.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "image_id", "dr_grade", "dme_grade", "eye", "domain", "disc_x", "disc_y", "fovea_x", "fovea_y",
    "disc_diameter", *(f"lesion_{lesion}" for lesion in LESIONS),
)


def load_synthetic(root: str | Path) -> pd.DataFrame:
    """Manifest of a synthetic dataset folder; raises ManifestError naming what is wrong."""
    root = require_dir(Path(root), DATASET, "dataset").resolve()
    labels_path = require_file(root / "labels.csv", DATASET, "label file labels.csv")
    try:
        labels = pd.read_csv(labels_path, dtype={"image_id": str, "split": str}, encoding="utf-8-sig",
                             skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ManifestError(f"{DATASET}: cannot parse {labels_path}: {error}") from error
    missing = [column for column in REQUIRED_COLUMNS if column not in labels.columns]
    if missing:
        raise ManifestError(f"{DATASET}: {labels_path} lacks columns {missing}")
    labels.index = pd.RangeIndex(2, len(labels) + 2, name="line")  # line numbers for the messages
    labels = drop_repeated_rows(labels.dropna(how="all"), "image_id", dataset=DATASET, what="label file",
                                path=labels_path)
    for column, high in (("dr_grade", 4), ("dme_grade", 2)):
        labels[column] = grade_column(labels[column], low=0, high=high, dataset=DATASET, column=column,
                                      path=labels_path, names=labels["image_id"])
    for column in (f"lesion_{lesion}" for lesion in LESIONS):
        bad = labels.loc[~labels[column].isin([0, 1]), "image_id"].tolist()
        if bad:
            raise ManifestError(f"{DATASET}: column {column!r} of {labels_path} must be 0 or 1; bad rows: {bad[:5]}")

    files = {path.name for path in root.iterdir() if path.is_file()}
    rows = []
    for record in labels.to_dict("records"):
        name = str(record["image_id"])
        if f"{name}.png" not in files:
            raise ManifestError(f"{DATASET}: image listed in {labels_path} but missing on disk: {root / f'{name}.png'}")
        masks: dict[str, Path | None] = {}
        for lesion in LESIONS:
            mask_name = f"{name}_{lesion}.png"
            present = int(record[f"lesion_{lesion}"])
            if present and mask_name not in files:
                raise ManifestError(f"{DATASET}: {labels_path} marks {lesion} present in {name}, "
                                    f"but its mask is missing: {root / mask_name}")
            if not present and mask_name in files:
                raise ManifestError(f"{DATASET}: mask {root / mask_name} exists, but {labels_path} marks "
                                    f"{lesion} absent in {name}")
            masks[lesion] = root / mask_name if present else None
        row = dict(record)
        row.update(image_id=name, image_path=str(root / f"{name}.png"), source=DATASET, patient_id=name,
                   mask_rule="nonzero", split=record.get("split", pd.NA))
        row.update(lesion_fields(masks, {lesion: int(record[f"lesion_{lesion}"]) for lesion in LESIONS}))
        rows.append(row)
    if not rows:
        raise ManifestError(f"{DATASET}: {labels_path} lists no images")
    return make_manifest(rows)
