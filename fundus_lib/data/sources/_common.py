"""Helpers shared by the dataset sources: checked file access, label tables (line numbers,
repeated rows), grade columns, case-insensitive image look-up that skips OS junk files, lesion
columns and cheap image and mask checks.

Every helper raises :class:`~fundus_lib.data.manifest.ManifestError` with a message that starts
with the dataset name and names the file, folder, column or line that is wrong, so a user who
points a notebook at a half-unpacked download learns at once what is missing.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from fundus_lib.data.manifest import LESIONS, ManifestError, read_mask
from fundus_lib.utils import usable_cores

#: File suffixes accepted as images (and as lossy copies of mask files), compared lower-case.
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

_KAGGLE_NAME = re.compile(r"^(\d+)_(left|right)$")

#: Files that operating systems and archivers drop into folders (compared lower-case); together
#: with every hidden file (name starting with ".", e.g. ``.DS_Store`` and macOS ``._IDRiD_01.jpg``
#: resource forks) they are never images, masks or labels.
OS_JUNK_NAMES: frozenset[str] = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})


def is_os_junk(path: Path) -> bool:
    """True for files a dataset folder may hold by accident of the operating system (hidden files,
    ``Thumbs.db``, ``desktop.ini``); every source skips them when it lists a folder."""
    return path.name.startswith(".") or path.name.lower() in OS_JUNK_NAMES


def folder_files(folder: Path) -> list[Path]:
    """The files of ``folder`` in name order, without OS junk (:func:`is_os_junk`)."""
    return [path for path in sorted(folder.iterdir()) if path.is_file() and not is_os_junk(path)]


def require_dir(path: Path, dataset: str, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise naming it and what it should hold."""
    if not path.is_dir():
        raise ManifestError(f"{dataset}: {what} folder not found: {path}")
    return path


def require_file(path: Path, dataset: str, what: str) -> Path:
    """Return ``path`` if it is a file, else raise naming it and what it should be."""
    if not path.is_file():
        raise ManifestError(f"{dataset}: {what} not found: {path}")
    return path


def _normalise(name: object) -> str:
    """Column-name key that ignores case and whitespace ('Risk of macular edema ' -> 'riskofmacularedema')."""
    return re.sub(r"\s+", "", str(name)).lower()


def select_columns(frame: pd.DataFrame, columns: Mapping[str, str], *, dataset: str, what: str,
                   path: Path, optional: Mapping[str, str] | None = None,
                   key: str | None = "name") -> pd.DataFrame:
    """Keep the ``columns`` (canonical key -> official header) of a label table, renamed to the keys.

    Headers match ignoring case and whitespace, which absorbs the official quirks (IDRiD's
    trailing space in ``'Risk of macular edema '``). Rows that are entirely empty (the trailing
    blank rows of the IDRiD sheets) are dropped; unnamed empty columns are simply not selected.
    String cells are stripped. ``optional`` columns are kept when present. The index (the
    readers set it to the file's line or sheet's row numbers) is kept, so later errors can name
    the line. A table without data rows raises. ``key`` names the column that identifies an
    image; its repeats go through :func:`drop_repeated_rows` (None: no such column).
    """
    by_key = {_normalise(column): column for column in frame.columns}
    selected: dict[str, object] = {}
    for canonical, official in columns.items():
        if _normalise(official) not in by_key:
            found = [str(c) for c in frame.columns if not str(c).startswith("Unnamed")]
            raise ManifestError(f"{dataset}: {what} {path} lacks column {official!r} (found {found})")
        selected[canonical] = by_key[_normalise(official)]
    for canonical, official in (optional or {}).items():
        if _normalise(official) in by_key:
            selected[canonical] = by_key[_normalise(official)]
    table = frame[list(selected.values())].copy()
    table.columns = list(selected)
    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].astype("string").str.strip().replace("", pd.NA)
    table = table.dropna(how="all")
    if table.empty:
        raise ManifestError(f"{dataset}: {what} {path} has a header but no rows")
    if key is None:
        return table
    headers = {name: str(selected[name]).strip() for name in table.columns}
    return drop_repeated_rows(table, key, dataset=dataset, what=what, path=path, headers=headers)


def _place(table: pd.DataFrame, label: object) -> str:
    """'line 7' / 'row 7' for a row whose index is a line (row) number, else 'entry 7'."""
    return f"{table.index.name or 'entry'} {label}"


def drop_repeated_rows(table: pd.DataFrame, key: str, *, dataset: str, what: str, path: Path,
                       headers: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Handle images listed more than once in one label file (compared by stem, ignoring case).

    Repeats with identical values are harmless copies: all but the first are dropped with a
    warning naming the lines. Repeats that disagree cannot be resolved here: raise a
    :class:`ManifestError` listing each row's line and values (``headers`` maps columns to the
    names shown, e.g. the official header). Rows without a key are left to the caller.
    """
    names = table[key].dropna()
    stems = names.map(lambda name: stem_of(str(name)).lower())
    repeated = stems[stems.duplicated(keep=False)]
    if repeated.empty:
        return table
    headers = headers or {}
    others = [column for column in table.columns if column != key]
    identical, conflicting = [], []
    for _, group in repeated.groupby(repeated, sort=False):
        rows = table.loc[group.index]
        places = ", ".join(_place(table, label) for label in group.index)
        name = str(rows[key].iloc[0])
        if len(rows[others].astype("string").fillna("").drop_duplicates()) == 1:
            identical.append((f"{name!r} ({places})", group.index[1:]))
        else:
            values = "; ".join(
                f"{_place(table, label)}: " + ", ".join(f"{headers.get(c, c)}={row[c]!r}" for c in others)
                for label, row in rows.iterrows())
            conflicting.append(f"{name!r} ({values})")
    if conflicting:
        raise ManifestError(f"{dataset}: {what} {path} lists {len(conflicting)} image(s) more than once with "
                            f"different values: {' | '.join(conflicting[:5])}; keep one row per image")
    warnings.warn(f"{dataset}: {what} {path} lists {len(identical)} image(s) more than once with identical "
                  f"values; the repeats are ignored: {', '.join(text for text, _ in identical[:5])}", stacklevel=3)
    return table.drop(index=[label for _, labels in identical for label in labels])


def read_csv_table(path: Path, columns: Mapping[str, str], *, dataset: str, what: str,
                   optional: Mapping[str, str] | None = None, sep: str = ",",
                   key: str | None = "name") -> pd.DataFrame:
    """Read a label CSV (BOM and Windows line endings tolerated, every cell as text) and
    :func:`select_columns` from it. The index is the line number of each row in the file."""
    require_file(path, dataset, what)
    if path.stat().st_size == 0:
        raise ManifestError(f"{dataset}: {what} {path} is empty (0 bytes); download it again")
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, encoding="utf-8-sig", skip_blank_lines=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ManifestError(f"{dataset}: cannot parse {what} {path}: {error}") from error
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="line")  # line 1 is the header
    return select_columns(frame, columns, dataset=dataset, what=what, path=path, optional=optional, key=key)


def _cell(value: object) -> object:
    """An xlrd cell value: "" -> NA, integral floats (xlrd's only number type) -> int, so a grade
    reads ``3`` in tables and messages, as the sheet shows it."""
    if value == "":
        return pd.NA
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _file_kind(path: Path) -> str:
    """What a file that should be a workbook looks like, from its first bytes: a web page saved
    in its place (a login or error page), a zip or .xlsx renamed .xls, text, or other bytes."""
    start = path.read_bytes()[:512]
    if not start:
        return "an empty file (0 bytes)"
    text = start.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "an HTML/XML page (a web page saved instead of the workbook?)"
    if start.startswith(b"PK\x03\x04"):
        return "a zip archive (an .xlsx workbook or a zipped download renamed .xls?)"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in start):
        return f"text starting {start[:40].decode('ascii')!r}"
    return f"binary data starting {start[:8].hex(' ')}"


def read_xls_table(path: Path, columns: Mapping[str, str], *, dataset: str, what: str) -> pd.DataFrame:
    """Read the first sheet of an Excel 97-2003 ``.xls`` workbook (first row = header) with xlrd.

    xlrd is called directly because pandas deprecates its xlrd engine. The index is each row's
    number in the sheet, as Excel shows it.
    """
    import xlrd  # only the Messidor source needs it

    require_file(path, dataset, what)
    try:
        with xlrd.open_workbook(str(path), on_demand=True) as book:
            sheet = book.sheet_by_index(0)
            values = [sheet.row_values(i) for i in range(sheet.nrows)]
    except (xlrd.XLRDError, xlrd.compdoc.CompDocError, zipfile.BadZipFile) as error:  # a broken zip: xlrd sniffs zips
        raise ManifestError(f"{dataset}: cannot read {what} {path} as an .xls workbook: found {_file_kind(path)}; "
                            f"expected an Excel 97-2003 workbook (a file starting with the OLE2 signature "
                            f"D0 CF 11 E0) ({error})") from error
    if not values:
        raise ManifestError(f"{dataset}: {what} {path} is empty")
    header = [str(value) for value in values[0]]
    rows = [[_cell(value) for value in row] for row in values[1:]]
    frame = pd.DataFrame(rows, columns=header, dtype=object,
                         index=pd.RangeIndex(2, len(rows) + 2, name="row"))  # row 1 is the header
    return select_columns(frame, columns, dataset=dataset, what=what, path=path)


def grade_column(values: pd.Series, *, low: int, high: int, dataset: str, column: str, path: Path,
                 names: pd.Series, allow_missing: bool = False) -> pd.Series:
    """Parse a grade column to nullable integers in ``low..high``; raise naming bad rows.

    Numbers stored as floats (``2.0`` from .xls sheets) are accepted when integral. Missing
    values raise unless ``allow_missing``. Bad rows are named by image name, value and, when the
    index holds them (tables from :func:`read_csv_table` / :func:`read_xls_table`), line number.
    """
    numbers = pd.to_numeric(values, errors="coerce")
    missing = values.isna()
    bad = (~missing & (numbers.isna() | (numbers % 1 != 0) | (numbers < low) | (numbers > high)))
    if not allow_missing:
        bad |= missing
    if bad.any():
        where = values.index.name in ("line", "row")
        examples = [f"{name}: {value!r}" + (f" ({values.index.name} {label})" if where else "")
                    for label, name, value in zip(values.index[bad][:5], names[bad][:5], values[bad][:5])]
        raise ManifestError(f"{dataset}: column {column!r} of {path} must hold integers {low}..{high}"
                            f"{'' if allow_missing else ' (no blanks)'}; bad rows: {examples}")
    return numbers.astype("Int64")


def stem_of(name: str) -> str:
    """File stem of a listed image name; names without an image suffix are returned as they are."""
    path = Path(name)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else name


def index_by_stem(folder: Path, dataset: str, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Map lower-case file stem -> path for the files in ``folder`` with one of ``suffixes``.

    Look-ups ignore case and extension (Messidor-2 lists ``IM000013.jpg`` for ``IM000013.JPG``).
    OS junk (``.DS_Store``, ``._IDRiD_01.jpg``, ``Thumbs.db``) is skipped. Two files with the same
    stem (``a.png`` and ``a.jpg``) are ambiguous and raise.
    """
    allowed = {suffix.lower() for suffix in suffixes}
    index: dict[str, Path] = {}
    for path in folder_files(folder):
        if path.suffix.lower() not in allowed:
            continue
        key = path.stem.lower()
        if key in index:
            raise ManifestError(f"{dataset}: two files share the name {path.stem!r} in {folder}: "
                                f"{index[key].name}, {path.name}")
        index[key] = path.resolve()
    return index


def find_image(index: Mapping[str, Path], name: str, folder: Path, *, dataset: str, listed_in: Path) -> Path:
    """The file for a listed image ``name`` (stem match, case-insensitive), or raise naming it."""
    path = index.get(stem_of(name).lower())
    if path is None:
        raise ManifestError(f"{dataset}: image listed in {listed_in} but missing on disk: {folder / name}")
    return path


def kaggle_name(name: str, *, dataset: str, where: Path) -> tuple[str, str]:
    """Split a Kaggle-2015 image name ``<patient>_<left|right>`` into (patient, eye)."""
    match = _KAGGLE_NAME.match(stem_of(name))
    if match is None:
        raise ManifestError(f"{dataset}: image name {name!r} in {where} is not of the form "
                            "'<patient number>_<left|right>'")
    return match.group(1), match.group(2)


def lesion_fields(masks: Mapping[str, Path | None], presence: Mapping[str, int] | None = None) -> dict[str, object]:
    """``mask_<L>`` and ``lesion_<L>`` entries for all of :data:`LESIONS`.

    Lesions in ``masks`` are annotated by the dataset: a path, or None for "annotated but
    absent" (no mask file). Their presence is ``presence[L]`` when given, else 1 where a mask
    file exists. Lesions not in ``masks`` are not annotated: both entries are NA.
    """
    unknown = set(masks) - set(LESIONS)
    if unknown:
        raise ValueError(f"lesion_fields: unknown lesions {sorted(unknown)}; expected some of {LESIONS}")
    row: dict[str, object] = {}
    for lesion in LESIONS:
        if lesion in masks:
            path = masks[lesion]
            row[f"mask_{lesion}"] = pd.NA if path is None else str(path)
            row[f"lesion_{lesion}"] = presence[lesion] if presence is not None else int(path is not None)
        else:
            row[f"mask_{lesion}"] = pd.NA
            row[f"lesion_{lesion}"] = pd.NA
    return row


def presence_from_masks(masks: Mapping[str, Path | None], rule: str, *, dataset: str) -> dict[str, int]:
    """Image-level presence per annotated lesion: 1 where the mask, binarised by ``rule``, has a pixel.

    Needed where a mask file exists for every image even when it is empty (DDR) or may hold only
    excluded pixels (Retinal-Lesions value 127). Reads each mask once; an unreadable mask (zero
    bytes, truncated) raises naming the dataset and the file.
    """
    try:
        return {lesion: int(path is not None and bool(read_mask(path, rule).any())) for lesion, path in masks.items()}
    except ManifestError as error:
        raise ManifestError(f"{dataset}: {error}") from error


def check_mask_files(paths: Iterable[Path | None], *, dataset: str) -> None:
    """Raise naming the dataset and file when a mask file is empty or its header is not an image.

    Cheap (reads only the header), for sources that do not decode their masks while loading
    (IDRiD), so a broken download fails at load time instead of in the middle of training.
    """
    for path in paths:
        if path is None:
            continue
        if path.stat().st_size == 0:
            raise ManifestError(f"{dataset}: mask file {path} is empty (0 bytes); copy it again from the download")
        try:
            with Image.open(path):
                pass
        except Exception as error:  # PIL raises several unrelated types for corrupt files
            raise ManifestError(f"{dataset}: mask file {path} is not a readable image: {error}") from error


def image_problem(path: Path, black_level: int = 10) -> str | None:
    """Why an image is unusable ("unreadable: ..." or "black"), or None when it is fine.

    Cheap: JPEGs are decoded at 1/8 scale (PIL draft mode) in greyscale; an image is black when
    no pixel exceeds ``black_level``.
    """
    try:
        with Image.open(path) as handle:
            handle.draft("L", (max(1, handle.width // 8), max(1, handle.height // 8)))
            grey = np.asarray(handle.convert("L"))
    except Exception as error:  # PIL raises several unrelated types for corrupt files
        return f"unreadable: {error}"
    return "black" if int(grey.max()) <= black_level else None


def image_problems(paths: Iterable[Path], black_level: int = 10) -> list[str | None]:
    """:func:`image_problem` for many images, decoded in threads (PIL releases the GIL while decoding)."""
    workers = min(8, usable_cores())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda path: image_problem(path, black_level), paths))
