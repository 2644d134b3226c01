"""The manifest: one table that every dataset source produces and every later step reads.

A manifest is a :class:`pandas.DataFrame` with one row per image. Real datasets and the
synthetic benchmark both end up in this shape, so datasets, splits, caches, training and
evaluation never need to know where an image came from.

Columns (absent values are ``<NA>``):

``image_id``            unique key within the manifest (sources prefix the split where the
                        official names collide, e.g. IDRiD train/test)
``image_path``          absolute path of the colour fundus photograph
``split``               "train" / "val" / "test" where the dataset defines one, else NA
``source``              dataset key ("synthetic", "idrid", "messidor", ...)
``dr_grade``            DR grade (0-4 ICDR, 0-3 Messidor), nullable integer
``dme_grade``           DME risk grade (0-2), nullable integer
``eye``                 "left" / "right"
``patient_id``          groups images that must stay in one split (patient or exam)
``domain``              camera / site / capture domain
``disc_x, disc_y``      optic-disc centre in pixels of the original image
``fovea_x, fovea_y``    fovea centre in pixels of the original image
``disc_diameter``       optic-disc diameter in pixels
``mask_<L>``            path of the binary mask of lesion L, for L in :data:`LESIONS`
``lesion_<L>``          image-level presence of lesion L: 1, 0, or NA when the dataset does not
                        annotate L (NA lesions are excluded from losses and metrics)
``mask_rule``           how to binarise the mask files of this row (see :func:`read_mask`)

Sources may add further columns (lesion counts, seeds, quality flags); later steps ignore them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

#: The eight lesion classes of L-Net/SiAN (Wei et al., ICPR 2020), in the paper's order.
LESIONS: tuple[str, ...] = ("MA", "iHE", "HaEx", "CWS", "vHE", "pHE", "NV", "FiP")

#: Full names of :data:`LESIONS`, for figure titles.
LESION_NAMES: dict[str, str] = {
    "MA": "microaneurysm",
    "iHE": "intraretinal haemorrhage",
    "HaEx": "hard exudate",
    "CWS": "cotton-wool spot",
    "vHE": "vitreous haemorrhage",
    "pHE": "preretinal haemorrhage",
    "NV": "neovascularisation",
    "FiP": "fibrous proliferation",
}

MASK_COLUMNS: tuple[str, ...] = tuple(f"mask_{lesion}" for lesion in LESIONS)
PRESENCE_COLUMNS: tuple[str, ...] = tuple(f"lesion_{lesion}" for lesion in LESIONS)

#: Mask binarisation rules: "nonzero" = any channel > 0 (IDRiD red TIFFs, DDR, synthetic);
#: "value255" = pixel value 255 only (Retinal-Lesions, where 127 marks an excluded lesion).
MASK_RULES: tuple[str, ...] = ("nonzero", "value255")

_STRING_COLUMNS = ("image_id", "image_path", "split", "source", "eye", "patient_id", "domain",
                   "mask_rule", *MASK_COLUMNS)
_INT_COLUMNS = ("dr_grade", "dme_grade", *PRESENCE_COLUMNS)
_FLOAT_COLUMNS = ("disc_x", "disc_y", "fovea_x", "fovea_y", "disc_diameter")

#: Every standard column, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id", "image_path", "split", "source", "dr_grade", "dme_grade", "eye", "patient_id",
    "domain", "disc_x", "disc_y", "fovea_x", "fovea_y", "disc_diameter", "mask_rule",
    *MASK_COLUMNS, *PRESENCE_COLUMNS,
)
SPLITS: tuple[str, ...] = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest, or a file it points to, is not what the project expects."""


def make_manifest(rows: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    """Build a manifest from row dicts (or a frame): add missing standard columns as NA,
    put them first in the standard order, coerce their dtypes, then :func:`validate_manifest`."""
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.NA
    if "mask_rule" in frame.columns:
        frame["mask_rule"] = frame["mask_rule"].fillna("nonzero")
    for column in _STRING_COLUMNS:
        frame[column] = frame[column].astype("string")
    for column in _INT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("Int64")
    for column in _FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("Float64")
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    frame = frame[list(MANIFEST_COLUMNS) + extra].reset_index(drop=True)
    return validate_manifest(frame)


def validate_manifest(manifest: pd.DataFrame, *, check_files: bool = False) -> pd.DataFrame:
    """Check the standard columns and values; raise :class:`ManifestError` listing every problem.

    With ``check_files=True`` every image and mask path must exist on disk.
    """
    problems: list[str] = []
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ManifestError(f"manifest lacks the standard columns {missing}; build it with make_manifest()")
    if manifest["image_id"].isna().any():
        problems.append("image_id has empty values")
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()].unique().tolist()
    if duplicated:
        paths = manifest.loc[manifest["image_id"] == duplicated[0], "image_path"].tolist()
        problems.append(f"image_id is not unique: {duplicated[:5]} ({duplicated[0]!r} is the id of {paths})")
    if manifest["image_path"].isna().any():
        problems.append("image_path has empty values for image_id "
                        f"{manifest.loc[manifest['image_path'].isna(), 'image_id'].tolist()[:5]}")
    bad_split = sorted(set(manifest["split"].dropna()) - set(SPLITS))
    if bad_split:
        problems.append(f"split has values {bad_split}; expected one of {SPLITS} or NA")
    bad_eye = sorted(set(manifest["eye"].dropna()) - {"left", "right"})
    if bad_eye:
        problems.append(f"eye has values {bad_eye}; expected 'left', 'right' or NA")
    bad_rule = sorted(set(manifest["mask_rule"].dropna()) - set(MASK_RULES))
    if bad_rule:
        problems.append(f"mask_rule has values {bad_rule}; expected one of {MASK_RULES}")
    for column, low, high in (("dr_grade", 0, 4), ("dme_grade", 0, 2)):
        values = manifest[column].dropna()
        if len(values) and (values.min() < low or values.max() > high):
            problems.append(f"{column} outside {low}..{high}: {sorted(set(values[(values < low) | (values > high)]))}")
    for column in PRESENCE_COLUMNS:
        bad = sorted(set(manifest[column].dropna()) - {0, 1})
        if bad:
            problems.append(f"{column} must be 0, 1 or NA, found {bad}")
    if check_files:
        for column in ("image_path", *MASK_COLUMNS):
            paths = manifest[column].dropna()
            absent = [p for p in paths if not Path(p).is_file()]
            if absent:
                problems.append(f"{len(absent)} file(s) in {column} do not exist, e.g. {absent[0]}")
    if problems:
        raise ManifestError("invalid manifest:\n  - " + "\n  - ".join(problems))
    return manifest


#: PIL modes whose pixel values are intensities that :func:`~fundus_lib.preprocess.to_rgb_uint8`
#: reads directly (8-bit grey/RGB/RGBA, 16- and 32-bit grey, float grey). Every other mode stores
#: something else per pixel (palette indices, CMYK inks, YCbCr, bilevel) and is converted by PIL.
_INTENSITY_MODES = frozenset({"L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

#: Photographs smaller than this (pixels, shorter side) or more elongated than this (longer /
#: shorter side) are refused by :func:`check_photo_shape`: resizing them gives a flat or smeared
#: input that trains silently on nothing. Fundus photographs are >= 512 px and at most ~1.8:1.
MIN_IMAGE_SIDE = 16
MAX_ASPECT = 4.0


def _load_array(path: str | Path, what: str) -> np.ndarray:
    """The pixels of an image file as a viewer shows them, or a :class:`ManifestError` naming the
    missing/unreadable file.

    The EXIF orientation is applied (a photo stored sideways with an orientation tag comes back
    upright). Palette, CMYK, YCbCr, LAB, HSV, bilevel and grey+alpha files are converted to RGB by
    PIL: their stored numbers are not intensities (a palette PNG holds colour indices, a CMYK
    JPEG ink amounts), so reading them as pixels would silently give wrong colours.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as handle:
            picture = ImageOps.exif_transpose(handle)
            if picture.mode not in _INTENSITY_MODES:
                picture = picture.convert("RGB")
            return np.asarray(picture)
    except Exception as error:  # PIL raises several unrelated types for corrupt files
        raise ManifestError(f"cannot read {what} {path}: {error}") from error


def read_image(path: str | Path) -> np.ndarray:
    """Read a colour fundus photograph as an (H, W, 3) uint8 RGB array.

    Greyscale images are repeated to three channels, an alpha channel is dropped, and 16-bit
    images are scaled to 8 bits by their own maximum (:func:`fundus_lib.preprocess.to_rgb_uint8`).
    Palette and CMYK files give the RGB colours they encode, and the EXIF orientation is applied
    (see :func:`_load_array`). Raises :class:`ManifestError` naming the file when it is missing,
    unreadable (zero bytes, truncated, not an image) or of an unusable kind.
    """
    from fundus_lib.preprocess import to_rgb_uint8

    array = _load_array(path, "image")
    try:
        return to_rgb_uint8(array)
    except ValueError as error:
        raise ManifestError(f"image {path}: {error}") from error


def check_photo_shape(image: np.ndarray, path: str | Path) -> np.ndarray:
    """Return ``image`` when its size can be a fundus photograph, else raise :class:`ManifestError`
    naming ``path``: a side below :data:`MIN_IMAGE_SIDE` (a 1x1 placeholder becomes one flat grey
    input after resizing) or an aspect ratio above :data:`MAX_ASPECT` (a strip, stretched beyond
    recognition). Called by :class:`~fundus_lib.data.datasets.FundusDataset` and the cache."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ManifestError(f"image {path} is {height}x{width} pixels; a fundus photograph needs at least "
                            f"{MIN_IMAGE_SIDE} pixels per side (a thumbnail or placeholder?)")
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise ManifestError(f"image {path} is {height}x{width} pixels, more elongated than {MAX_ASPECT:g}:1; "
                            "a fundus photograph is close to square (crop it to the field of view)")
    return image


def read_mask(path: str | Path | None, rule: str = "nonzero", shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a lesion mask file as an (H, W) bool array.

    ``path=None`` (or NA) means "annotated but absent" and needs ``shape``; it returns all False.
    ``rule`` is one of :data:`MASK_RULES`: "nonzero" keeps pixels where any channel is > 0 (IDRiD's
    pure-red RGB TIFFs give 76 in grey, so grey == 255 would be wrong); "value255" keeps only 255
    (Retinal-Lesions marks excluded lesions with 127). Palette, CMYK and bilevel mask files are
    read by the colours they encode, like images (:func:`_load_array`).
    """
    if path is None or path is pd.NA or (isinstance(path, float) and np.isnan(path)):
        if shape is None:
            raise ManifestError("read_mask(None) needs the image shape to return an empty mask")
        return np.zeros(shape, dtype=bool)
    if rule not in MASK_RULES:
        raise ManifestError(f"mask rule {rule!r} unknown; expected one of {MASK_RULES}")
    path = Path(path)
    array = _load_array(path, "mask")
    if array.ndim == 3:
        array = array[..., :3].max(axis=2)
    if rule == "value255":
        return array == 255
    # Lossy copies (a popular IDRiD mirror ships .jpg masks) need a threshold, not "> 0".
    lossy = path.suffix.lower() in (".jpg", ".jpeg")
    return array > 127 if lossy else array > 0
