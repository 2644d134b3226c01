"""Messidor-1 (ADCIS; registration; research and teaching use only) -> manifest.

Expected layout (each ``BaseXX.zip`` of the download unpacked into its own folder)::

    <root>/Base11/20051019_38557_0100_PP.tif ...  (100 TIFFs per base)
    <root>/Base11/Annotation_Base11.xls
    ...                                             Base11-14, Base21-24, Base31-34
    <root>/messidor-2.csv                           optional: the Messidor-2 exam list (below)

The annotation workbook may also sit directly in ``<root>``; some copies name it with a space
(``Annotation Base11.xls``). Columns: ``Image name`` (with extension) | ``Ophthalmologic
department`` | ``Retinopathy grade`` (0-3) | ``Risk of macular edema`` (0-2: 0 none, 1 exudates
more than one disc diameter from the macula, 2 within one), read with xlrd. A folder unpacked
into itself (``Base11/Base11/``), a zip left unpacked, or a "workbook" that is really a web page
or a renamed file stop with a :class:`ManifestError` saying what was found and what was expected.

Manifest: ``image_id`` = file stem, ``domain`` = the department, ``dr_grade`` 0-3 (Messidor
scale, not ICDR), ``dme_grade`` 0-2, ``referable`` (1 for grades 2-3: CANet's binarisation;
"normal vs abnormal" is ``dr_grade > 0``), ``duplicate_of``, ``eye`` and ``patient_id``.

**Errata** (:data:`ERRATA`): the four DR grades ADCIS corrected are applied by default and each
applied correction is listed in one warning (``manifest.attrs["errata_applied"]``).
``errata=False`` gives the grades of the original sheets, as CANet and most papers before 2017
used them. ADCIS also ships corrected sheets ``Annotation_BaseXX_update<date>.xls``: with
``errata=True`` an update beside the original is read instead of it (with a warning) and a
correction it already contains is not applied twice; with ``errata=False`` the original sheet is
read, or, when only the update is there, its corrected grades are set back to the original ones.

**Duplicates**: ADCIS lists 13 pairs of duplicate photographs inside Base33
(:data:`BASE33_DUPLICATES`). With ``check_duplicates=True`` (default) every image is also
compared by its pixels (:mod:`fundus_lib.data.duplicates`), which finds copies that are not
byte-identical (re-saved, resized) anywhere in the data and checks the listed pairs. Each copy
gets ``duplicate_of`` = the first image of its group (manifest order); a warning counts them and
lists groups whose grades disagree (``manifest.attrs["duplicates"]``: copy -> original;
``attrs["duplicate_conflicts"]``).

**Patients**: Messidor-1 has no patient column, but Messidor-2's "Messidor-Original" part pairs
1,058 Messidor-1 images into 529 two-eye examinations. Its exam list - ``messidor-2.csv`` from
the Messidor-2 download, columns ``left;right`` (see :mod:`~fundus_lib.data.sources.messidor2`) -
is read from ``exams=`` or from ``<root>/messidor-2.csv``; then ``patient_id`` = the exam's
left-image stem and ``eye`` = its column. Without it ``patient_id`` is the image's own id (a
warning says so) and ``eye`` is NA. Either way copies join their original's ``patient_id``, so a
split grouped by ``patient_id`` keeps both eyes of an exam and all copies of a photograph together.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from fundus_lib.data.duplicates import fingerprints, group_of, similar_pairs
from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.data.sources._common import (
    find_image, grade_column, index_by_stem, read_xls_table, require_dir,
)
from fundus_lib.data.sources.messidor2 import read_exam_list

DATASET = "Messidor"
SOURCE = "messidor"
BASES: tuple[str, ...] = tuple(f"Base{site}{part}" for site in "123" for part in "1234")
ANNOTATION_COLUMNS: dict[str, str] = {
    "name": "Image name", "department": "Ophthalmologic department",
    "dr": "Retinopathy grade", "dme": "Risk of macular edema",
}
#: The Messidor-2 exam list looked for in the dataset root when ``exams`` is not given.
EXAM_LIST = "messidor-2.csv"


class GradeCorrection(NamedTuple):
    """One published correction of a Messidor-1 annotation sheet."""
    base: str
    image_id: str
    column: str      # manifest column corrected
    old: int         # grade in the original sheet
    new: int         # corrected grade
    published: str   # date of the ADCIS erratum


#: ADCIS errata of the Messidor-1 sheets (https://www.adcis.net/en/third-party/messidor/, errata
#: of 31 Aug 2016 and 24 Oct 2016). The page itself was not reachable from here; the table matches
#: the public loaders that reproduce it: mikevoets/jama16-retina-replication ``messidor.sh`` (moves
#: each image from its old to its new grade folder: 3 -> 0, 1 -> 3, 3 -> 1, 2 -> 3) and
#: simonEllershaw/Diabetic_Retinopathy_Vision_Transformer ``datasets/messidor.py`` (new grades).
ERRATA: tuple[GradeCorrection, ...] = (
    GradeCorrection("Base11", "20051020_63045_0100_PP", "dr_grade", 3, 0, "31 Aug 2016"),
    GradeCorrection("Base11", "20051020_64007_0100_PP", "dr_grade", 1, 3, "24 Oct 2016"),
    GradeCorrection("Base11", "20051020_63936_0100_PP", "dr_grade", 3, 1, "24 Oct 2016"),
    GradeCorrection("Base13", "20060523_48477_0100_PP", "dr_grade", 2, 3, "24 Oct 2016"),
)

#: ADCIS erratum of 16 Aug 2017: 13 pairs of duplicate images inside Base33, under different names.
#: Sources (the ADCIS page was not reachable from here): one name of every pair, in this order, is
#: deleted by mikevoets/jama16-retina-replication ``messidor.sh`` ("16 August 2017: Image
#: duplicates in Base33"; also pablojrios/jama16-retina-replication ``messidor.sh``); the other
#: name of every pair, in this order, is dropped by simonEllershaw/Diabetic_Retinopathy_Vision_
#: Transformer ``datasets/messidor.py`` (``base_33_duplicates``). Pairing the two lists by position
#: is confirmed for the two pairs that ADCIS's erratum of 09 Feb 2018 names (marked *: grades that
#: disagree, DR 2 vs 3 and DME 0 vs 1, as quoted in a public copy of ``messidor.sh``); the other 11
#: pairings are inferred from that order. The pixel check of ``check_duplicates=True`` tests every
#: pair on the user's copy and reports a pair whose pixels do not match.
BASE33_DUPLICATES: tuple[tuple[str, str], ...] = (
    ("20051202_54744_0400_PP", "20051202_55582_0400_PP"),
    ("20051202_40508_0400_PP", "20051202_41076_0400_PP"),
    ("20051202_41238_0400_PP", "20051202_48287_0400_PP"),
    ("20051202_41260_0400_PP", "20051202_48586_0400_PP"),
    ("20051202_54530_0400_PP", "20051202_55457_0400_PP"),
    ("20051205_33025_0400_PP", "20051202_55626_0400_PP"),  # * DR 3 vs 2
    ("20051202_55607_0400_PP", "20051202_54783_0400_PP"),
    ("20051202_41034_0400_PP", "20051202_48575_0400_PP"),
    ("20051205_35099_0400_PP", "20051205_32966_0400_PP"),
    ("20051202_54555_0400_PP", "20051202_55484_0400_PP"),
    ("20051205_35110_0400_PP", "20051205_32981_0400_PP"),
    ("20051202_54611_0400_PP", "20051202_55562_0400_PP"),  # * DME 1 vs 0
    ("20051202_55498_0400_PP", "20051202_54547_0400_PP"),
)

def _base_folder(root: Path, base: str) -> Path:
    """``root/base``, checked: a missing folder names what was found instead (an unpacked zip, the
    base one level deeper); a folder unpacked into itself (``Base11/Base11/``) is refused."""
    folder = root / base
    if not folder.is_dir():
        deeper = sorted(path for path in root.glob(f"*/{base}") if path.is_dir()) if root.is_dir() else []
        if (root / f"{base}.zip").is_file():
            found = f"found {root / f'{base}.zip'} still zipped"
        elif deeper:
            found = f"found {deeper[0]} one level deeper (point root at {deeper[0].parent})"
        else:
            found = "found neither the folder nor its zip"
        raise ManifestError(f"{DATASET}: {base} image folder not found: expected {folder} holding the {base} "
                            f"TIFFs and Annotation_{base}.xls; {found}")
    nested = folder / base
    if nested.is_dir():
        raise ManifestError(f"{DATASET}: found a nested folder {nested} (the archive was unpacked into a folder of "
                            f"its own name); expected the TIFFs and Annotation_{base}.xls directly in {folder}: "
                            "move the contents of the inner folder up one level")
    return folder


def _annotation_file(root: Path, base_dir: Path, base: str, prefer_update: bool) -> Path:
    """The annotation workbook of ``base``, in its folder or in ``root``. With an errata update
    ``..._update<date>.xls`` beside the original, ``prefer_update`` picks the update (with a
    warning), otherwise the original."""
    pattern = re.compile(rf"^annotation[ _]{base}(_update\w*)?\.xls$", re.IGNORECASE)
    found = sorted(path for folder in (base_dir, root) for path in folder.iterdir()
                   if path.is_file() and pattern.match(path.name))
    if not found:
        raise ManifestError(f"{DATASET}: annotation workbook of {base} not found: expected "
                            f"{base_dir / f'Annotation_{base}.xls'} (or 'Annotation {base}.xls', here or in {root})")
    updates = [path for path in found if pattern.match(path.name).group(1)]
    originals = [path for path in found if path not in updates]
    if len(originals) > 1:
        raise ManifestError(f"{DATASET}: several annotation workbooks for {base}: {[str(p) for p in originals]}")
    if updates and (prefer_update or not originals):
        if originals:
            warnings.warn(f"{DATASET}: using the errata update {updates[-1].name} instead of {originals[0].name}",
                          stacklevel=4)
        return updates[-1]
    return originals[0]


def _read_base(root: Path, base: str, errata: bool) -> pd.DataFrame:
    """The annotation rows of one base with checked grades and the path of each image."""
    base_dir = _base_folder(root, base)
    path = _annotation_file(root, base_dir, base, prefer_update=errata)
    table = read_xls_table(path, ANNOTATION_COLUMNS, dataset=DATASET, what="annotation workbook")
    table = table.dropna(subset=["name"])
    table["dr"] = grade_column(table["dr"], low=0, high=3, dataset=DATASET, column="Retinopathy grade",
                               path=path, names=table["name"])
    table["dme"] = grade_column(table["dme"], low=0, high=2, dataset=DATASET,
                                column="Risk of macular edema", path=path, names=table["name"])
    index = index_by_stem(base_dir, DATASET)
    table["image_path"] = [str(find_image(index, name, base_dir, dataset=DATASET, listed_in=path))
                           for name in table["name"]]
    table["base"] = base
    return table


def _apply_errata(frame: pd.DataFrame, errata: bool) -> list[str]:
    """Set the :data:`ERRATA` images to their corrected (``errata``) or original grades in place;
    return one line per grade changed. A grade that is neither the old nor the new one (a sheet
    edited by someone else) is left as read, with a warning."""
    changed, unexpected = [], []
    for fix in ERRATA:
        rows = frame.index[(frame["image_id"] == fix.image_id) & (frame["base"] == fix.base)]
        if len(rows) == 0:
            continue
        current = int(frame.at[rows[0], fix.column])
        target = fix.new if errata else fix.old
        if current == target:
            continue
        if current not in (fix.old, fix.new):
            unexpected.append(f"{fix.base}/{fix.image_id} {fix.column}={current} (original {fix.old}, "
                              f"corrected {fix.new})")
            continue
        frame.loc[rows, fix.column] = target
        changed.append(f"{fix.base}/{fix.image_id} {fix.column} {current} -> {target} (erratum of {fix.published})")
    if unexpected:
        warnings.warn(f"{DATASET}: grades that match neither the original sheet nor the ADCIS errata, left as "
                      f"read: {unexpected}", stacklevel=3)
    return changed


def _duplicate_groups(frame: pd.DataFrame, check_pixels: bool) -> np.ndarray:
    """Row position of each row's original (itself when it is not a copy): the listed Base33
    pairs, joined with pixel matches when ``check_pixels``; listed pairs whose pixels do not
    match are reported."""
    position = {image_id: i for i, image_id in enumerate(frame["image_id"])}
    listed = [(position[a], position[b]) for a, b in BASE33_DUPLICATES if a in position and b in position]
    pairs = list(listed)
    if check_pixels:
        matched = similar_pairs(fingerprints(frame["image_path"]))
        found = {(i, j) for i, j, _ in matched}
        pairs += sorted(found)
        unconfirmed = [(frame["image_id"].iat[i], frame["image_id"].iat[j]) for i, j in listed
                       if (min(i, j), max(i, j)) not in found]
        if unconfirmed:
            warnings.warn(f"{DATASET}: {len(unconfirmed)} pair(s) listed as duplicates by the ADCIS erratum do not "
                          f"match by pixels in this copy (kept as duplicates): {unconfirmed[:5]}", stacklevel=3)
    return group_of(len(frame), pairs)


def _report_duplicates(frame: pd.DataFrame, original: np.ndarray) -> tuple[dict[str, str], list[dict]]:
    """Fill ``duplicate_of``; return {copy: original} and the groups whose grades disagree (warned)."""
    copies = original != np.arange(len(frame))
    ids = frame["image_id"].to_numpy()
    frame.loc[copies, "duplicate_of"] = ids[original[copies]]
    duplicates = dict(zip(ids[copies], ids[original[copies]]))
    conflicts = []
    for group in np.unique(original[copies]):
        members = frame.iloc[np.flatnonzero(original == group)]
        if len(members[["dr_grade", "dme_grade"]].drop_duplicates()) > 1:
            conflicts.append({row.image_id: {"dr_grade": int(row.dr_grade), "dme_grade": int(row.dme_grade)}
                              for row in members.itertuples()})
    if duplicates:
        warnings.warn(f"{DATASET}: {len(duplicates)} image(s) are copies of others (column duplicate_of), "
                      f"{len(conflicts)} group(s) with different grades: {conflicts[:5]}", stacklevel=3)
    return duplicates, conflicts


def _exam_ids(frame: pd.DataFrame, exams: Path | None, all_bases: bool) -> tuple[pd.Series, pd.Series]:
    """Exam id and eye per row from the Messidor-2 exam list; per-image ids and NA eyes without one.
    A list that pairs none of the images of all twelve bases is the wrong file and raises."""
    if exams is None:
        warnings.warn(f"{DATASET}: no Messidor-2 exam list (pass exams= or put {EXAM_LIST} in the dataset root): "
                      "patient_id is per image, so the two eyes of one exam may land in different folds",
                      stacklevel=3)
        return frame["image_id"].copy(), pd.Series(pd.NA, index=frame.index, dtype="string")
    listed = read_exam_list(exams)
    found = [listed.get(image_id.lower()) for image_id in frame["image_id"]]
    if all_bases and not any(found):
        raise ManifestError(f"{DATASET}: none of the {len(frame)} images is in the exam list {exams}; expected the "
                            "Messidor-2 exam list, whose Messidor-Original part pairs 1,058 Messidor-1 images")
    exam = [hit[0] if hit else image_id for hit, image_id in zip(found, frame["image_id"])]
    eye = [hit[1] if hit else pd.NA for hit in found]
    return pd.Series(exam, index=frame.index), pd.Series(eye, index=frame.index, dtype="string")


def load_messidor(root: str | Path, bases: Sequence[str] = BASES, check_duplicates: bool = True, *,
                  errata: bool = True, exams: str | Path | None = None) -> pd.DataFrame:
    """Manifest of Messidor-1: 1200 TIFFs, DR 0-3, DME 0-2, ``referable``, ``duplicate_of``, exams.

    ``bases`` restricts the folders read (all twelve by default). ``check_duplicates`` compares
    every image by its pixels (reads each file once) on top of the listed Base33 pairs.
    ``errata`` applies the published grade corrections (False: the original sheets, as CANet
    used them). ``exams`` is the Messidor-2 exam list (default: ``<root>/messidor-2.csv`` if there).
    """
    root = require_dir(Path(root).expanduser().resolve(), DATASET, "dataset root")
    unknown = sorted(set(bases) - set(BASES))
    if unknown or not bases:
        raise ValueError(f"bases must be a non-empty subset of {BASES}, got {list(bases)}")
    if exams is None and (root / EXAM_LIST).is_file():
        exams = root / EXAM_LIST
    table = pd.concat([_read_base(root, base, errata) for base in bases], ignore_index=True)
    table["image_id"] = table["image_path"].map(lambda path: Path(path).stem)
    repeated = table["image_id"].duplicated()
    if repeated.any():
        warnings.warn(f"{DATASET}: {int(repeated.sum())} image name(s) listed more than once; kept the first "
                      f"row of each: {table.loc[repeated, 'image_id'].tolist()[:5]}", stacklevel=2)
        table = table[~repeated]
    frame = pd.DataFrame({
        "image_id": table["image_id"], "image_path": table["image_path"], "source": SOURCE, "base": table["base"],
        "dr_grade": table["dr"], "dme_grade": table["dme"], "domain": table["department"],
        "duplicate_of": pd.Series(pd.NA, index=table.index, dtype="string"),
    }).reset_index(drop=True)
    applied = _apply_errata(frame, errata)
    if applied:
        verb = "applied" if errata else "undid"
        warnings.warn(f"{DATASET}: {verb} {len(applied)} published grade correction(s)"
                      f"{'' if errata else ' (errata=False: grades of the original sheets)'}: {'; '.join(applied)}",
                      stacklevel=2)
    frame["referable"] = (frame["dr_grade"] >= 2).astype("Int64")
    original = _duplicate_groups(frame, check_duplicates)
    duplicates, conflicts = _report_duplicates(frame, original)
    exam, frame["eye"] = _exam_ids(frame, None if exams is None else Path(exams).expanduser(),
                                   all_bases=set(bases) == set(BASES))
    # one group per exam, joined across copies: a copy takes the group of its original's exam
    linked = [(i, int(original[i])) for i in range(len(frame)) if original[i] != i]
    first_of_exam = exam.groupby(exam, sort=False).transform(lambda rows: rows.index[0]).to_numpy()
    linked += [(i, int(first_of_exam[i])) for i in range(len(frame)) if first_of_exam[i] != i]
    frame["patient_id"] = exam.to_numpy()[group_of(len(frame), linked)]
    manifest = make_manifest(frame)
    manifest.attrs.update(errata_applied=applied, duplicates=duplicates, duplicate_conflicts=conflicts,
                          exams=None if exams is None else str(exams))
    return manifest
