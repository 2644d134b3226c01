"""Messidor-1 (ADCIS; registration; research and teaching use only) -> manifest.

Expected layout (each ``BaseXX.zip`` of the download unpacked into its own folder)::

    <root>/Base11/20051019_38557_0100_PP.tif ...  (100 TIFFs per base)
    <root>/Base11/Annotation_Base11.xls
    ...                                             Base11-14, Base21-24, Base31-34

The annotation workbook may also sit directly in ``<root>``; some copies name it with a space
(``Annotation Base11.xls``), and ADCIS's errata release ships corrected sheets named
``Annotation_BaseXX_update<date>.xls`` - when an update sits beside the original, the update is
used and a warning says so. Columns: ``Image name`` (with extension) | ``Ophthalmologic
department`` | ``Retinopathy grade`` (0-3) | ``Risk of macular edema`` (0-2: 0 none, 1 exudates
more than one disc diameter from the macula, 2 within one). The ``.xls`` files are read with
xlrd.

Manifest: ``image_id`` = file stem, ``domain`` = the department, ``dr_grade`` 0-3 (Messidor
scale, not ICDR), ``dme_grade`` 0-2, plus ``referable`` (1 for grades 2-3: CANet's binarisation;
"normal vs abnormal" is ``dr_grade > 0``) and ``duplicate_of``.

Duplicates: Messidor-1 has known duplicate images (see the ADCIS errata page). The loader
reports what it finds rather than trusting a hard-coded list: a name listed twice keeps its
first row (warning); with ``check_duplicates=True`` (default) every image file is hashed and
byte-identical copies get ``duplicate_of`` = the first copy's ``image_id`` and share its
``patient_id``, so a group-aware split keeps copies together (a warning counts them; the mapping
is in ``manifest.attrs["duplicates"]``). ``patient_id`` is otherwise the image's own id:
Messidor-1 publishes no patient or eye information.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    find_image, grade_column, index_by_stem, read_xls_table, require_dir,
)

DATASET = "Messidor"
SOURCE = "messidor"
BASES: tuple[str, ...] = tuple(f"Base{site}{part}" for site in "123" for part in "1234")
ANNOTATION_COLUMNS: dict[str, str] = {
    "name": "Image name", "department": "Ophthalmologic department",
    "dr": "Retinopathy grade", "dme": "Risk of macular edema",
}


def _annotation_file(root: Path, base_dir: Path, base: str) -> Path:
    """The annotation workbook of ``base``: in its folder or in ``root``; an errata update wins."""
    pattern = re.compile(rf"^annotation[ _]{base}(_update\w*)?\.xls$", re.IGNORECASE)
    found = sorted(path for folder in (base_dir, root) for path in folder.iterdir()
                   if path.is_file() and pattern.match(path.name))
    if not found:
        raise ManifestError(f"{DATASET}: annotation workbook of {base} not found: expected "
                            f"{base_dir / f'Annotation_{base}.xls'} (or 'Annotation {base}.xls', here or in {root})")
    updates = [path for path in found if pattern.match(path.name).group(1)]
    if updates:
        if len(found) > len(updates):
            warnings.warn(f"{DATASET}: using the errata update {updates[-1].name} instead of "
                          f"{[p.name for p in found if p not in updates]}", stacklevel=3)
        return updates[-1]
    if len(found) > 1:
        raise ManifestError(f"{DATASET}: several annotation workbooks for {base}: {[str(p) for p in found]}")
    return found[0]


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mark_duplicates(frame: pd.DataFrame) -> dict[str, str]:
    """Set ``duplicate_of`` / ``patient_id`` for byte-identical images; return {copy: first}."""
    digests = frame["image_path"].map(lambda path: _file_digest(Path(path)))
    first = frame.groupby(digests, sort=False)["image_id"].transform("first")
    copies = first != frame["image_id"]
    frame["patient_id"] = first
    frame.loc[copies, "duplicate_of"] = first[copies]
    duplicates = dict(zip(frame.loc[copies, "image_id"], first[copies]))
    if duplicates:
        grades = frame.set_index("image_id")[["dr_grade", "dme_grade"]]
        conflicting = [copy for copy, original in duplicates.items()
                       if not grades.loc[copy].equals(grades.loc[original])]
        warnings.warn(f"{DATASET}: {len(duplicates)} image(s) are byte-identical copies of others "
                      f"(column duplicate_of), {len(conflicting)} with different grades: "
                      f"{list(duplicates.items())[:5]}", stacklevel=3)
    return duplicates


def load_messidor(root: str | Path, bases: Sequence[str] = BASES, check_duplicates: bool = True) -> pd.DataFrame:
    """Manifest of Messidor-1: 1200 TIFFs, DR 0-3, DME 0-2, ``referable``, ``duplicate_of``.

    ``bases`` restricts the folders read (all twelve by default); ``check_duplicates`` hashes
    every image to find byte-identical copies (reads each file once).
    """
    root = require_dir(Path(root).expanduser().resolve(), DATASET, "dataset root")
    unknown = sorted(set(bases) - set(BASES))
    if unknown or not bases:
        raise ValueError(f"bases must be a non-empty subset of {BASES}, got {list(bases)}")
    tables = []
    for base in bases:
        base_dir = require_dir(root / base, DATASET, f"{base} image")
        path = _annotation_file(root, base_dir, base)
        table = read_xls_table(path, ANNOTATION_COLUMNS, dataset=DATASET, what="annotation workbook")
        table = table.dropna(subset=["name"])
        table["dr"] = grade_column(table["dr"], low=0, high=3, dataset=DATASET, column="Retinopathy grade",
                                   path=path, names=table["name"])
        table["dme"] = grade_column(table["dme"], low=0, high=2, dataset=DATASET,
                                    column="Risk of macular edema", path=path, names=table["name"])
        index = index_by_stem(base_dir, DATASET)
        table["image_path"] = [str(find_image(index, name, base_dir, dataset=DATASET, listed_in=path))
                               for name in table["name"]]
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    table["image_id"] = table["image_path"].map(lambda path: Path(path).stem)
    repeated = table["image_id"].duplicated()
    if repeated.any():
        warnings.warn(f"{DATASET}: {int(repeated.sum())} image name(s) listed more than once; kept the first "
                      f"row of each: {table.loc[repeated, 'image_id'].tolist()[:5]}", stacklevel=2)
        table = table[~repeated]
    frame = pd.DataFrame({
        "image_id": table["image_id"], "image_path": table["image_path"], "source": SOURCE,
        "dr_grade": table["dr"], "dme_grade": table["dme"], "domain": table["department"],
        "patient_id": table["image_id"], "referable": (table["dr"] >= 2).astype("Int64"),
        "duplicate_of": pd.Series(pd.NA, index=table.index, dtype="string"),
    }).reset_index(drop=True)
    duplicates = _mark_duplicates(frame) if check_duplicates else {}
    manifest = make_manifest(frame)
    manifest.attrs["duplicates"] = duplicates
    return manifest
