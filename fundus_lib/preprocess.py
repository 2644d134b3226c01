"""Fundus-photograph preprocessing: field of view, crop, contrast enhancement, quality scores.

Every function accepts an RGB, RGBA or greyscale array in uint8, uint16 (or int32, as PIL reads
16-bit PNGs) or float in [0, 1], converts it with :func:`to_rgb_uint8`, and returns a uint8 RGB
array unless its docstring says otherwise.

* :func:`detect_fov` finds the circular field of view (FOV), also when the circle is cut flat at
  the top and bottom (wide camera sensors) and on dark or over-exposed photographs.
* :func:`crop_to_fov` (:func:`fov_crop_box` gives its box), :func:`square_resize` and
  :func:`resize_keep_aspect` bring images to a common geometry.
* :func:`graham` is the local-average-colour subtraction that won Kaggle 2015 (B. Graham's
  competition report): ``4*img - 4*GaussianBlur(img, sigma=r/30) + 128`` with everything outside
  0.9 r set to 128. CLPI (Yang et al., T-Cyb 2022, Sec. IV-B) preprocesses with it.
* :func:`median_background` is the variant of the CLPI authors' inference code: the local average
  is a median filter of aperture 103 px at 1024 px, and the mask radius is 0.45 of the side.
* :func:`clahe_green` equalises the green channel, where lesions and vessels have most contrast.
* :func:`quality_scores` gives sharpness and exposure figures for filtering and for teaching.
* :func:`preprocess` chains these for the cache builder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np


class FundusNotFoundError(ValueError):
    """The image shows no field of view: no bright disc on a darker background was found."""


@dataclass(frozen=True, eq=False)
class FOV:
    """The circular field of view of a fundus photograph, in pixel coordinates of that image.

    ``centre_x``/``centre_y`` are in pixel-centre coordinates (pixel (0, 0) is centred at 0.0),
    ``radius`` in pixels. The circle may extend beyond the image. ``top``/``bottom`` are the first
    and last rows of the FOV when the circle is cut flat there (by a black band or by the frame),
    else ``None``. ``mask`` (bool, H x W) is the disc intersected with the rows between the cuts;
    a small notch in the rim (a camera marker) stays inside the mask.
    """

    centre_x: float
    centre_y: float
    radius: float
    mask: np.ndarray = field(repr=False)
    top: int | None = None
    bottom: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the image this FOV belongs to."""
        return self.mask.shape

    def moved(self, offset_x: float, offset_y: float, scale: float, shape: tuple[int, int]) -> "FOV":
        """The same FOV in an image made by cropping this one at (``offset_x``, ``offset_y``)
        (negative offsets pad) and then scaling by ``scale`` to ``shape`` = (height, width)."""
        def to_new(coordinate: float, offset: float) -> float:
            return (coordinate - offset + 0.5) * scale - 0.5

        # a cut row's outer edge is half a pixel beyond its centre; keep the rows fully inside
        top = None if self.top is None else int(np.ceil(to_new(self.top - 0.5, offset_y)))
        bottom = None if self.bottom is None else int(np.floor(to_new(self.bottom + 0.5, offset_y)))
        return make_fov(to_new(self.centre_x, offset_x), to_new(self.centre_y, offset_y),
                        self.radius * scale, shape, top=top, bottom=bottom)


def make_fov(centre_x: float, centre_y: float, radius: float, shape: tuple[int, int], *,
             top: int | None = None, bottom: int | None = None) -> FOV:
    """Build a :class:`FOV` (and its mask) from a known circle, e.g. for a synthetic image."""
    if radius <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    height, width = shape
    rows, cols = np.ogrid[:height, :width]
    mask = (cols - centre_x) ** 2 + (rows - centre_y) ** 2 <= radius ** 2
    if top is not None:
        top = int(np.clip(top, 0, height - 1))
        mask[:top] = False
    if bottom is not None:
        bottom = int(np.clip(bottom, 0, height - 1))
        mask[bottom + 1:] = False
    return FOV(float(centre_x), float(centre_y), float(radius), mask, top, bottom)


# ----------------------------------------------------------------------------- input conversion

def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as a contiguous (H, W, 3) uint8 RGB array.

    Follows :func:`fundus_lib.data.manifest.read_image`: greyscale (H, W) or (H, W, 1) is repeated
    to three channels, an alpha channel is dropped, 16-bit (uint16 or int32) images are scaled by
    their maximum to 0-255. Floats must lie in [0, 1] and are scaled by 255. uint8 passes unchanged.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        array = image[..., :3] if image.shape[2] == 4 else image
    elif image.ndim == 2:
        array = image[..., None]
    else:
        raise ValueError(f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype in (np.uint16, np.int32):
        if array.min() < 0:
            raise ValueError("image of dtype int32 has negative values; expected 16-bit intensities")
        array = (array.astype(np.float32) / max(float(array.max()), 1.0) * 255.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("float image must hold finite values in [0, 1]")
        array = (array * 255.0).round().astype(np.uint8)
    else:
        raise ValueError(f"image dtype {array.dtype} unsupported; expected uint8, uint16, int32 or float in [0, 1]")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------- field of view

_MEDIAN_APERTURE = 5        # noise suppression on the work-size luminance
_FLAT_FRACTION = 0.2        # a top/bottom row this share of the FOV width wider than a circle is a flat cut
_CUT_GUARD = 2              # work-size rows next to a flat cut that are not used for the circle fit
_MIN_IOU = 0.92             # IoU required between the bright region and the fitted disc (FOVs: ~0.99)
_MIN_INLIERS = 0.5          # share of rim points that must lie on the fitted circle
_MIN_RADIUS = 0.1           # the radius must be at least this share of the image's shorter half-side


def detect_fov(image: np.ndarray, *, work_size: int = 512, threshold_fraction: float = 0.2,
               min_contrast: float = 8.0) -> FOV:
    """Detect the circular field of view.

    Steps (on a copy scaled so that its longer side is at most ``work_size``): luminance = max
    over channels (robust to colour casts; the red channel dominates fundus photographs), median
    filtered; Otsu splits background from fundus and the threshold is set at
    ``threshold_fraction`` of the way from the background's median to the fundus' median (low,
    so that a dark, vignetted periphery stays inside); the largest connected component's outer
    contour gives rim points; points on the image frame and on flat top/bottom cuts are dropped;
    a least-squares circle (Kasa fit) is refined by discarding outliers (a notch, vessels
    crossing the rim) until stable. Flat cut rows are refined at full resolution.

    Raises :class:`FundusNotFoundError` when there is no bright region on a clearly darker
    background (all black, uniform or noise images) or the region is not disc-shaped. The
    detector needs some dark background along the rim: a photograph cropped inside the FOV on
    every side has no detectable circle.
    """
    if work_size < 64:
        raise ValueError(f"work_size must be >= 64, got {work_size}")
    if not 0 < threshold_fraction < 1:
        raise ValueError(f"threshold_fraction must be in (0, 1), got {threshold_fraction}")
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    luminance = _max_channel(rgb)
    scale = min(1.0, work_size / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(luminance, small_size, interpolation=cv2.INTER_AREA) if scale < 1 else luminance
    small = cv2.medianBlur(small, _MEDIAN_APERTURE)

    threshold = _fov_threshold(small, threshold_fraction, min_contrast)
    region = _largest_region(small > threshold)
    points, top_cut, bottom_cut = _rim_points(region)
    centre_x, centre_y, radius = _fit_circle_robust(points)
    _check_disc(region, centre_x, centre_y, radius, top_cut, bottom_cut)

    fx, fy = width / small_size[0], height / small_size[1]
    centre_x, centre_y = (centre_x + 0.5) * fx - 0.5, (centre_y + 0.5) * fy - 0.5
    # rim points are centres of the outermost bright pixels, half a pixel inside the edge
    radius = (radius + 0.5) * (fx + fy) / 2
    if radius < _MIN_RADIUS * min(height, width) / 2:
        raise FundusNotFoundError(f"the bright region is too small to be a field of view (radius {radius:.1f} px)")
    band = (max(0, int(centre_x - radius / 2)), min(width, int(centre_x + radius / 2) + 1))
    top = None if top_cut is None else _refine_cut(luminance, band, top_cut, fy, threshold, first=True)
    bottom = None if bottom_cut is None else _refine_cut(luminance, band, bottom_cut, fy, threshold, first=False)
    return make_fov(centre_x, centre_y, radius, (height, width), top=top, bottom=bottom)


def _max_channel(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel maximum of the three channels (``rgb.max(axis=2)`` is ~10x slower)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _fov_threshold(luminance: np.ndarray, fraction: float, min_contrast: float) -> float:
    """Luminance threshold between the dark background and the fundus (see :func:`detect_fov`)."""
    if float(luminance.max()) - float(luminance.min()) < min_contrast:
        raise FundusNotFoundError("image has no contrast: no field of view can be told from its background")
    otsu, _ = cv2.threshold(luminance, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = luminance > otsu
    background = float(np.median(luminance[~bright]))
    fundus = float(np.median(luminance[bright]))
    if fundus - background < min_contrast or background > 0.5 * fundus:
        raise FundusNotFoundError(
            f"no dark background around a bright field of view (background median {background:.0f}, "
            f"bright median {fundus:.0f} on a 0-255 scale)")
    return background + fraction * (fundus - background)


def _largest_region(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``binary`` with its holes filled (uint8 0/1)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if count < 2:
        raise FundusNotFoundError("no bright region found")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    contours, _ = cv2.findContours((labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    region = np.zeros(binary.shape, np.uint8)
    cv2.drawContours(region, [max(contours, key=len)], -1, 1, thickness=cv2.FILLED)
    return region


def _rim_points(region: np.ndarray) -> tuple[np.ndarray, int | None, int | None]:
    """Outer-contour points of ``region`` that lie on the circle, and the rows of flat cuts.

    Points on the image frame and within :data:`_CUT_GUARD` rows of a flat top or bottom cut are
    dropped. The top (bottom) is a flat cut when one of its first ``_CUT_GUARD + 1`` rows (the
    first may be a partly bright, resampled row) is wider than a circle's chord there by more than
    :data:`_FLAT_FRACTION` of the region's widest row.
    """
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    points = max(contours, key=len).reshape(-1, 2).astype(np.float64)
    height, width = region.shape
    row_width = region.sum(axis=1)
    rows = np.flatnonzero(row_width)
    first, last = int(rows[0]), int(rows[-1])
    diameter = float(row_width.max())
    depth = np.arange(1, _CUT_GUARD + 2, dtype=np.float64)  # rows from the extreme edge of the region
    limit = 2 * np.sqrt(np.clip(diameter * depth - depth ** 2, 0, None)) + _FLAT_FRACTION * diameter
    n = min(_CUT_GUARD + 1, last - first + 1)
    top = first if (row_width[first:first + n] > limit[:n]).any() else None
    bottom = last if (row_width[last - n + 1:last + 1][::-1] > limit[:n]).any() else None
    x, y = points[:, 0], points[:, 1]
    keep = (x > 0) & (x < width - 1) & (y > 0) & (y < height - 1)
    if top is not None:
        keep &= y > top + _CUT_GUARD
    if bottom is not None:
        keep &= y < bottom - _CUT_GUARD
    return points[keep], top, bottom


def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle (Kasa): solve x^2 + y^2 + D x + E y + F = 0."""
    mean = points.mean(axis=0)
    x, y = (points - mean).T
    design = np.column_stack([x, y, np.ones_like(x)])
    (d, e, f), *_ = np.linalg.lstsq(design, -(x ** 2 + y ** 2), rcond=None)
    cx, cy = -d / 2, -e / 2
    return float(cx + mean[0]), float(cy + mean[1]), float(np.sqrt(max(cx ** 2 + cy ** 2 - f, 0.0)))


def _fit_circle_robust(points: np.ndarray, iterations: int = 8) -> tuple[float, float, float]:
    """:func:`_fit_circle` refitted on inliers (residual <= max(1 px, 3 robust sigmas)) until stable."""
    if len(points) < 10:
        raise FundusNotFoundError("too few rim points to fit a circle")
    inliers = np.ones(len(points), bool)
    for _ in range(iterations):
        cx, cy, r = _fit_circle(points[inliers])
        residual = np.hypot(points[:, 0] - cx, points[:, 1] - cy) - r
        spread = 1.4826 * np.median(np.abs(residual[inliers] - np.median(residual[inliers])))
        updated = np.abs(residual) <= max(1.0, 3.0 * spread)
        if updated.sum() < 10:
            break
        if np.array_equal(updated, inliers):
            break
        inliers = updated
    if inliers.mean() < _MIN_INLIERS:
        raise FundusNotFoundError(f"the bright region's outline is not a circle ({inliers.mean():.0%} of rim points fit)")
    return _fit_circle(points[inliers])


def _check_disc(region: np.ndarray, cx: float, cy: float, r: float, top: int | None, bottom: int | None) -> None:
    """Raise unless the fitted disc (within the cuts) and the bright region overlap with IoU >= _MIN_IOU."""
    height, width = region.shape
    if not (0 <= cx < width and 0 <= cy < height):
        raise FundusNotFoundError(f"fitted circle centre ({cx:.0f}, {cy:.0f}) lies outside the image")
    disc = make_fov(cx, cy, r, region.shape, top=top, bottom=bottom).mask
    bright = region.astype(bool)
    iou = (disc & bright).sum() / max((disc | bright).sum(), 1)
    if iou < _MIN_IOU:
        raise FundusNotFoundError(f"the bright region is not disc-shaped (IoU with the fitted disc {iou:.2f})")


def _refine_cut(luminance: np.ndarray, band: tuple[int, int], work_row: int, row_scale: float,
                threshold: float, *, first: bool) -> int:
    """Full-resolution row of a flat cut: the first (``first=True``) or last row near the
    work-size cut row whose mean luminance over the central column band exceeds ``threshold``."""
    start = max(0, int(np.floor((work_row - 1) * row_scale)))
    stop = min(luminance.shape[0], int(np.ceil((work_row + 2) * row_scale)))
    profile = luminance[start:stop, band[0]:band[1]].mean(axis=1)
    bright = np.flatnonzero(profile > threshold)
    estimate = int(round((work_row + 0.5) * row_scale - 0.5))
    if bright.size == 0:
        return estimate
    return start + int(bright[0] if first else bright[-1])


def graham_radius(image: np.ndarray) -> float:
    """Graham's FOV radius estimate from the middle row: ``(row_sum > mean / 10).sum() / 2``.

    Fast, and correct for a centred, uncut circle on black; :func:`detect_fov` is the robust one.
    """
    rgb = to_rgb_uint8(image)
    row = rgb[rgb.shape[0] // 2].astype(np.float64).sum(axis=1)
    return float((row > row.mean() / 10).sum() / 2)


# ----------------------------------------------------------------------------- geometry

def _crop(rgb: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` window of ``rgb`` starting at (x0, y0); outside the image is black."""
    height, width = rgb.shape[:2]
    out = np.zeros((side, side, 3), np.uint8)
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(width, x0 + side), min(height, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    return out


def _fov_box(fov: FOV, pad: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square of side ceil(2 r (1 + pad)) centred on the FOV."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    side = int(np.ceil(2 * fov.radius * (1 + pad)))
    return int(round(fov.centre_x - (side - 1) / 2)), int(round(fov.centre_y - (side - 1) / 2)), side


def _square_box(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(x0, y0, side) that pads an image of ``shape`` to a centred square."""
    height, width = shape[:2]
    side = max(height, width)
    return -((side - width) // 2), -((side - height) // 2), side


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2 resize to (width, height): area averaging when shrinking, bicubic when enlarging."""
    shrinking = size[0] * size[1] < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _check_fov(fov: FOV, rgb: np.ndarray) -> None:
    if fov.shape != rgb.shape[:2]:
        raise ValueError(f"fov belongs to an image of shape {fov.shape}, not {rgb.shape[:2]}")


def crop_to_fov(image: np.ndarray, fov: FOV | None = None, pad: float = 0.0, *,
                mask_outside: bool = False) -> np.ndarray:
    """Crop to the square of side ``ceil(2 r (1 + pad))`` centred on the FOV circle.

    Parts of the square outside the image (flat-cut circles, circles touching the frame) are
    black, so the circle stays centred. ``mask_outside=True`` also blackens pixels outside the
    FOV mask (labels, flare). ``fov`` defaults to :func:`detect_fov`.
    """
    rgb = to_rgb_uint8(image)
    fov = detect_fov(rgb) if fov is None else fov
    _check_fov(fov, rgb)
    if mask_outside:
        rgb = np.where(fov.mask[..., None], rgb, 0).astype(np.uint8)
    return _crop(rgb, *_fov_box(fov, pad))


def fov_crop_box(image: np.ndarray, pad: float = 0.0) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the square :func:`crop_to_fov` cuts (it may extend past
    the borders). This is the ``crop_box`` hook of :func:`fundus_lib.data.cache.build_cache`,
    which crops lesion masks with the same box (use ``functools.partial`` to set ``pad``)."""
    x0, y0, side = _fov_box(detect_fov(image), pad)
    return y0, x0, side, side


def resize_keep_aspect(image: np.ndarray, size: int, *, side: str = "longer") -> np.ndarray:
    """Resize so that the ``side`` ("longer" or "shorter") side has ``size`` pixels, keeping the
    aspect ratio ("longer" bounds the output inside size x size; "shorter" covers it)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if side not in ("longer", "shorter"):
        raise ValueError(f"side must be 'longer' or 'shorter', got {side!r}")
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    scale = size / (max(height, width) if side == "longer" else min(height, width))
    return _resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))))


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Pad to a centred square with black, then resize to ``size`` x ``size``."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rgb = to_rgb_uint8(image)
    return _resize(_crop(rgb, *_square_box(rgb.shape)), (size, size))


# ----------------------------------------------------------------------------- enhancement

def _subtract_background(rgb: np.ndarray, background: np.ndarray, keep: np.ndarray, fill: int) -> np.ndarray:
    """``4 * rgb - 4 * background + 128`` rounded and saturated to uint8; ``fill`` where not ``keep``."""
    enhanced = 4.0 * rgb.astype(np.float32) - 4.0 * background.astype(np.float32) + 128.0
    enhanced = np.clip(np.rint(enhanced), 0, 255).astype(np.uint8)
    enhanced[~keep] = fill
    return enhanced


def graham(image: np.ndarray, radius: float | None = None, sigma_fraction: float = 1 / 30, *,
           fov: FOV | None = None, mask_fraction: float = 0.9, fill: int = 128) -> np.ndarray:
    """Graham's local-average subtraction: ``4*img - 4*GaussianBlur(img, sigma) + 128``.

    ``sigma = sigma_fraction * r``. The circle comes from ``fov`` (also honouring its flat cuts),
    else from ``radius`` centred in the image (Graham's convention after his rescaling), else
    from :func:`detect_fov`. Pixels outside ``mask_fraction * r`` are set to ``fill`` (128, as
    in Graham's code), hiding the bright ring the filter creates at the FOV rim. The blur is
    computed in float32 (Graham's uint8 blur adds up to +-2 levels of quantisation noise).
    Graham rescales images to a fixed radius first (300 px); :func:`preprocess` does that via
    ``size``.
    """
    if sigma_fraction <= 0:
        raise ValueError(f"sigma_fraction must be > 0, got {sigma_fraction}")
    if not 0 < mask_fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    if fov is None and radius is None:
        fov = detect_fov(rgb)
    if fov is not None:
        _check_fov(fov, rgb)
        # The blur bleeds the black surround inward at a flat cut exactly as at the rim, so a cut
        # is pulled in by the same margin as the circle; otherwise a bright band remains there.
        margin = (1.0 - mask_fraction) * fov.radius
        keep = make_fov(fov.centre_x, fov.centre_y, fov.radius * mask_fraction, fov.shape,
                        top=None if fov.top is None else int(np.ceil(fov.top + margin)),
                        bottom=None if fov.bottom is None else int(np.floor(fov.bottom - margin))).mask
        radius = fov.radius
    else:
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        keep = make_fov((width - 1) / 2, (height - 1) / 2, radius * mask_fraction, (height, width)).mask
    background = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), sigma_fraction * radius)
    return _subtract_background(rgb, background, keep, fill)


def clpi_median_kernel(side: int) -> int:
    """Median aperture of the CLPI authors' code (103 px at 1024 px), scaled to ``side`` and odd."""
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    return max(3, 2 * int(np.floor(103 / 1024 * side / 2)) + 1)


def median_background(image: np.ndarray, kernel: int | None = None, *, mask_fraction: float = 0.45,
                      fill: int = 128) -> np.ndarray:
    """CLPI's median-background subtraction: ``4*img - 4*medianBlur(img, kernel) + 128``.

    The CLPI paper (Sec. IV-B) says only "subtract the local average color" and cites Graham;
    the authors' inference code (see the CLPI spec) uses a median filter of aperture 103 at
    1024 x 1024 and keeps a centred circle of radius 0.45 x side. So this expects a square FOV
    crop (:func:`crop_to_fov` then :func:`square_resize`); ``kernel`` defaults to
    :func:`clpi_median_kernel` of the shorter side and the circle radius is ``mask_fraction`` of
    the shorter side. The fill outside the circle is not published; 128 follows Graham.
    """
    if not 0 < mask_fraction <= 0.5 * np.sqrt(2):
        raise ValueError(f"mask_fraction must be in (0, 0.707], got {mask_fraction}")
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    kernel = clpi_median_kernel(min(height, width)) if kernel is None else kernel
    if kernel < 3 or kernel % 2 == 0:
        raise ValueError(f"kernel must be an odd integer >= 3, got {kernel}")
    keep = make_fov((width - 1) / 2, (height - 1) / 2, mask_fraction * min(height, width), (height, width)).mask
    return _subtract_background(rgb, cv2.medianBlur(rgb, kernel), keep, fill)


def clahe_green(image: np.ndarray, clip: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of the green channel only,
    ``clip`` limit and ``tiles`` x ``tiles`` grid; red and blue are returned unchanged."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    rgb = to_rgb_uint8(image).copy()
    rgb[..., 1] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(np.ascontiguousarray(rgb[..., 1]))
    return rgb


# ----------------------------------------------------------------------------- quality

def quality_scores(image: np.ndarray, fov: FOV | None = None, *, dark: float = 0.1,
                   bright: float = 0.98) -> dict[str, float]:
    """Image-quality figures inside the FOV (``fov`` defaults to :func:`detect_fov`).

    ``sharpness``: variance of the 3x3 Laplacian of the grey image over the FOV eroded by 5 %
    of the radius (so the rim edge does not count); it depends on resolution, so compare images
    of equal size. ``mean_intensity``: mean grey level in [0, 1]. ``underexposed_fraction``: share
    of FOV pixels with grey level <= ``dark`` (of full scale). ``overexposed_fraction``: share
    with any channel >= ``bright``. ``fov_fraction``: FOV area / image area.
    """
    rgb = to_rgb_uint8(image)
    fov = detect_fov(rgb) if fov is None else fov
    _check_fov(fov, rgb)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    margin = max(1, int(round(0.05 * fov.radius)))
    inner = cv2.erode(fov.mask.astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)
    if not inner.any():
        raise ValueError("the field of view is too small to score")
    laplacian = cv2.Laplacian(grey, cv2.CV_32F, ksize=3)
    inside = grey[fov.mask]
    return {
        "sharpness": float(laplacian[inner].astype(np.float64).var()),
        "mean_intensity": float(inside.mean() / 255.0),
        "underexposed_fraction": float((inside <= dark * 255).mean()),
        "overexposed_fraction": float((_max_channel(rgb)[fov.mask] >= bright * 255).mean()),
        "fov_fraction": float(fov.mask.mean()),
    }


# ----------------------------------------------------------------------------- pipeline

def _graham_step(rgb: np.ndarray, fov: FOV | None) -> np.ndarray:
    return graham(rgb, fov=fov)


def _median_step(rgb: np.ndarray, fov: FOV | None) -> np.ndarray:
    return median_background(rgb)


def _clahe_step(rgb: np.ndarray, fov: FOV | None) -> np.ndarray:
    return clahe_green(rgb)


#: Enhancement steps of :func:`preprocess` (besides "crop"), each ``(rgb, fov) -> rgb``.
ENHANCEMENTS: dict[str, Callable[[np.ndarray, FOV | None], np.ndarray]] = {
    "graham": _graham_step,
    "median": _median_step,
    "clahe": _clahe_step,
}


def preprocess(image: np.ndarray, steps: Sequence[str] = ("crop", "graham"), size: int | None = 512, *,
               pad: float = 0.0) -> np.ndarray:
    """Run the preprocessing pipeline used by the image cache.

    ``steps``: optional "crop" first (:func:`crop_to_fov` with ``pad``), then any of
    :data:`ENHANCEMENTS` in the order given ("graham", "median", "clahe"). ``size``: after the
    crop (before any enhancement, so that Graham's sigma and CLPI's median aperture scale with
    the image) the image is brought to ``size`` x ``size`` by :func:`square_resize`; ``None``
    keeps the geometry. The FOV is detected once and carried through the crop and resize.
    With ``size=None`` and no "crop" the output has the input's shape, so
    ``functools.partial(preprocess, steps=("graham",), size=None)`` is a valid ``preprocess``
    hook of :func:`fundus_lib.data.cache.build_cache` (after its ``crop_box=fov_crop_box``).
    """
    steps = tuple(steps)
    unknown = [s for s in steps if s != "crop" and s not in ENHANCEMENTS]
    if unknown:
        raise ValueError(f"unknown preprocessing steps {unknown}; expected 'crop' and/or {sorted(ENHANCEMENTS)}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps must not repeat, got {steps}")
    if "crop" in steps[1:]:
        raise ValueError(f"'crop' must be the first step, got {steps}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None, got {size}")
    rgb = to_rgb_uint8(image)
    needs_fov = "crop" in steps or "graham" in steps
    fov = detect_fov(rgb) if needs_fov else None
    if "crop" in steps:
        x0, y0, side = _fov_box(fov, pad)
        rgb, fov = _crop(rgb, x0, y0, side), fov.moved(x0, y0, 1.0, (side, side))
    if size is not None:
        x0, y0, side = _square_box(rgb.shape)
        rgb = _resize(_crop(rgb, x0, y0, side), (size, size))
        fov = None if fov is None else fov.moved(x0, y0, size / side, (size, size))
    for step in steps:
        if step != "crop":
            rgb = ENHANCEMENTS[step](rgb, fov)
    return rgb
