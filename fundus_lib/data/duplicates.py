"""Near-duplicate photographs found by their pixels, not their bytes.

A copy of a fundus photograph that was re-saved (TIFF -> PNG/JPEG), resized or re-compressed has
different bytes, so a file hash misses it. Here every image gets a small **pixel fingerprint**:

1. read it in grey with OpenCV and shrink it to ``SIDE x SIDE`` pixels (area averaging, so the
   original resolution and compression noise hardly matter);
2. keep only the field of view (pixels brighter than a fifth of the image's 99th percentile),
   eroded by one pixel, so the black surround and the rim of the circle do not make every fundus
   photograph look alike;
3. subtract a Gaussian-smoothed copy computed *inside* the field of view (normalised convolution):
   what is left is the structure - vessels, disc, lesions - without the illumination, exposure and
   vignetting that differ between captures and between copies;
4. centre and scale the result to unit length.

Two fingerprints are compared by their dot product (a correlation in [-1, 1]): copies of one
photograph score close to 1 (re-encoded and half-size copies of ``skimage.data.retina()`` score
above 0.95, see the tests), different photographs close to 0. :func:`similar_pairs` lists the
pairs at or above a threshold, :func:`group_of` turns pairs into groups. An image without
structure (a flat or black frame) has no fingerprint (NaN) and matches nothing.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from fundus_lib.data.manifest import ManifestError
from fundus_lib.utils import usable_cores

#: Side of the square thumbnail a fingerprint is computed on (SIDE**2 numbers per image).
SIDE = 64
#: Correlation at or above which two images count as copies of one photograph.
DEFAULT_THRESHOLD = 0.85
_SIGMA = SIDE / 16  # smoothing scale removed by step 3: structures smaller than ~SIDE/8 remain
_FOV_LEVEL = 0.2    # field of view: brighter than this share of the 99th-percentile grey level


def fingerprint(image: np.ndarray) -> np.ndarray:
    """The unit-length pixel fingerprint (``SIDE * SIDE`` float32) of a grey or RGB uint8 image,
    or all-NaN when the image has no structure inside its field of view."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey.astype(np.float32), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    fov = (small > _FOV_LEVEL * np.percentile(small, 99)).astype(np.float32)
    fov = cv2.erode(fov, np.ones((3, 3), np.uint8))
    weight = cv2.GaussianBlur(fov, (0, 0), _SIGMA)
    smooth = cv2.GaussianBlur(small * fov, (0, 0), _SIGMA) / np.maximum(weight, 1e-6)
    detail = (small - smooth) * fov
    inside = fov > 0
    if inside.sum() < 2:
        return np.full(SIDE * SIDE, np.nan, dtype=np.float32)
    detail[inside] -= detail[inside].mean()
    norm = float(np.linalg.norm(detail))
    if norm < 1e-3 * inside.sum() ** 0.5:  # flat: less than 1/1000 of a grey level per pixel
        return np.full(SIDE * SIDE, np.nan, dtype=np.float32)
    return (detail / norm).ravel()


def read_fingerprint(path: str | Path) -> np.ndarray:
    """:func:`fingerprint` of the image file ``path``; raise :class:`ManifestError` naming an unreadable file."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ManifestError(f"cannot read image {path} to compare its pixels (missing, empty or not an image)")
    return fingerprint(grey)


def fingerprints(paths: Iterable[str | Path]) -> np.ndarray:
    """Fingerprints of many image files, one row each (decoded in threads: OpenCV releases the GIL)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        rows = list(pool.map(read_fingerprint, paths))
    return np.stack(rows) if rows else np.empty((0, SIDE * SIDE), dtype=np.float32)


def similar_pairs(prints: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int, float]]:
    """``(i, j, correlation)`` for every pair ``i < j`` of rows whose correlation is >= ``threshold``.

    Rows that are NaN (images without structure) match nothing. The full correlation matrix is
    computed at once: 1,200 images need a 1,200 x 1,200 matrix, well under a second.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    valid = ~np.isnan(prints).any(axis=1)
    rows = np.flatnonzero(valid)
    correlation = prints[rows] @ prints[rows].T
    first, second = np.nonzero(np.triu(correlation >= threshold, k=1))
    return [(int(rows[i]), int(rows[j]), float(correlation[i, j])) for i, j in zip(first, second)]


def group_of(n: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """For ``n`` items linked by ``pairs`` of indices, each item's group: the smallest index
    connected to it (directly or through other items). Items in no pair are their own group."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for i, j in pairs:
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64)
