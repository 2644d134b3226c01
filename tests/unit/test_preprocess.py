"""Tests of fundus_lib.preprocess on skimage.data.retina() and on drawn circles of known geometry."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.data

from fundus_lib.preprocess import (
    ENHANCEMENTS,
    FundusNotFoundError,
    clahe_green,
    clpi_median_kernel,
    crop_to_fov,
    detect_fov,
    fov_crop_box,
    graham,
    graham_radius,
    make_fov,
    median_background,
    preprocess,
    quality_scores,
    resize_keep_aspect,
    square_resize,
    to_rgb_uint8,
)

# skimage.data.retina() (1411 x 1411), measured once by hand from row/column profiles of the max
# channel: the half-maximum edge is at columns 9.3 / 1398.6 (row 705) and rows 6.9 / 1398.7
# (column 705), so centre (704.0, 702.8), horizontal radius 694.7, vertical 695.9.
RETINA_CENTRE = (704.0, 703.0)
RETINA_RADIUS = 695.0
TOLERANCE = 0.02  # of the radius


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return skimage.data.retina()


@pytest.fixture(scope="module")
def retina512(retina) -> np.ndarray:
    return cv2.resize(retina, (512, 512), interpolation=cv2.INTER_AREA)


def draw_fundus(shape=(600, 800), centre=(401.3, 297.6), radius=260.0, cut=None, gain=1.0, seed=0,
                dents=False):
    """A fundus-like RGB uint8 image whose FOV is exactly the disc of ``centre``/``radius``.

    Vignetting, a bright optic disc, dark vessel-like lines reaching the rim and noise; ``cut``
    blackens the rows farther than ``cut * radius`` from the centre (flat top and bottom);
    ``gain`` scales the fundus (dark < 1 < over-exposed, saturating); ``dents`` blackens a
    rectangular notch at the upper right rim and a round dark lesion on the left rim. The
    background is near-black noise.
    """
    rng = np.random.default_rng(seed)
    height, width = shape
    rows, cols = np.mgrid[:height, :width].astype(np.float64)
    cx, cy = centre
    d = np.hypot(cols - cx, rows - cy) / radius
    shade = 1.0 - 0.45 * d ** 2
    shade += 0.6 * np.exp(-((cols - (cx - 0.55 * radius)) ** 2 + (rows - cy) ** 2) / (0.08 * radius) ** 2)
    vessels = np.abs(np.sin((rows - cy) / radius * 5.0 + (cols - cx) / radius * 1.3)) < 0.06
    shade = shade * np.where(vessels, 0.7, 1.0)
    colour = np.array([190.0, 95.0, 45.0])
    fundus = gain * shade[..., None] * colour + rng.normal(0, 3, (height, width, 3))
    inside = d <= 1.0
    if cut is not None:
        inside &= np.abs(rows - cy) <= cut * radius
    if dents:
        notch_x, notch_y = cx + 0.6 * radius, cy - 0.8 * radius
        inside &= ~((np.abs(cols - notch_x) < 0.15 * radius) & (rows < notch_y + 0.25 * radius))
        inside &= np.hypot(cols - (cx - radius), rows - cy) > 0.2 * radius
    background = np.abs(rng.normal(0, 1.5, (height, width, 3)))
    return np.clip(np.where(inside[..., None], fundus, background), 0, 255).round().astype(np.uint8)


def assert_geometry(fov, centre, radius, tolerance=0.01):
    assert abs(fov.centre_x - centre[0]) <= tolerance * radius
    assert abs(fov.centre_y - centre[1]) <= tolerance * radius
    assert abs(fov.radius - radius) <= tolerance * radius


# --------------------------------------------------------------------------- detect_fov

def test_retina_fov_matches_hand_measurement(retina):
    fov = detect_fov(retina)
    assert_geometry(fov, RETINA_CENTRE, RETINA_RADIUS, TOLERANCE)
    assert fov.top is None and fov.bottom is None
    assert fov.mask.shape == retina.shape[:2] and fov.mask.dtype == bool
    # the mask holds the fundus and excludes the black corners
    bright = retina.max(axis=2) > 60
    assert (bright & fov.mask).sum() / bright.sum() > 0.995
    assert not fov.mask[:60, :60].any() and not fov.mask[-60:, -60:].any()


@pytest.mark.parametrize("case, kwargs, top, bottom", [
    ("full circle", {}, None, None),
    ("flat cut top and bottom", dict(shape=(700, 800), centre=(400.0, 350.0), radius=300.0, cut=0.8), 110, 590),
    ("cut by the frame", dict(shape=(500, 800), centre=(399.5, 249.5), radius=300.0), 0, 499),
    ("dark", dict(gain=0.12), None, None),
    ("dark and cut", dict(shape=(700, 800), centre=(400.0, 350.0), radius=300.0, cut=0.6, gain=0.15), 170, 530),
    ("over-exposed", dict(gain=2.5), None, None),
])
def test_detects_drawn_circles(case, kwargs, top, bottom):
    image = draw_fundus(**kwargs)
    fov = detect_fov(image)
    centre = kwargs.get("centre", (401.3, 297.6))
    radius = kwargs.get("radius", 260.0)
    assert_geometry(fov, centre, radius)
    for found, expected in ((fov.top, top), (fov.bottom, bottom)):
        if expected is None:
            assert found is None, case
        else:
            assert found is not None and abs(found - expected) <= 2, (case, found, expected)
    truth = make_fov(*centre, radius, image.shape[:2], top=top, bottom=bottom).mask
    assert (truth & fov.mask).sum() / (truth | fov.mask).sum() > 0.98


def test_notch_and_rim_lesion_do_not_bias_the_circle():
    image = draw_fundus(dents=True)
    assert_geometry(detect_fov(image), (401.3, 297.6), 260.0, tolerance=0.004)


def test_flips_move_the_centre_accordingly(retina512):
    fov = detect_fov(retina512)
    height, width = retina512.shape[:2]
    horizontal = detect_fov(retina512[:, ::-1])
    vertical = detect_fov(retina512[::-1])
    assert horizontal.centre_x == pytest.approx(width - 1 - fov.centre_x, abs=0.5)
    assert horizontal.centre_y == pytest.approx(fov.centre_y, abs=0.5)
    assert vertical.centre_y == pytest.approx(height - 1 - fov.centre_y, abs=0.5)
    assert vertical.centre_x == pytest.approx(fov.centre_x, abs=0.5)
    assert horizontal.radius == pytest.approx(fov.radius, abs=0.5)
    assert vertical.radius == pytest.approx(fov.radius, abs=0.5)
    cut = draw_fundus(shape=(700, 800), centre=(400.0, 360.0), radius=300.0, cut=0.7)
    upright, flipped = detect_fov(cut), detect_fov(cut[::-1])
    assert flipped.centre_y == pytest.approx(699 - upright.centre_y, abs=0.5)
    assert (flipped.top, flipped.bottom) == (699 - upright.bottom, 699 - upright.top)


def test_other_input_formats_give_the_rgb_uint8_result(retina512):
    fov = detect_fov(retina512)
    alpha = np.full(retina512.shape[:2] + (1,), 255, np.uint8)
    variants = {
        "rgba": np.concatenate([retina512, alpha], axis=2),
        "uint16": retina512.astype(np.uint16) * 257,
        "float": retina512.astype(np.float64) / 255.0,
    }
    for name, variant in variants.items():
        np.testing.assert_array_equal(to_rgb_uint8(variant), retina512, err_msg=name)
        other = detect_fov(variant)
        assert (other.centre_x, other.centre_y, other.radius) == (fov.centre_x, fov.centre_y, fov.radius), name
        np.testing.assert_array_equal(graham(variant, fov=fov), graham(retina512, fov=fov), err_msg=name)
    grey = retina512[..., 1]
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    for variant in (grey, grey[..., None]):
        other, reference = detect_fov(variant), detect_fov(grey_rgb)
        assert (other.centre_x, other.centre_y, other.radius) == (reference.centre_x, reference.centre_y, reference.radius)
    # a single channel still finds the same circle
    assert_geometry(detect_fov(grey), (fov.centre_x, fov.centre_y), fov.radius)


@pytest.mark.parametrize("name, image", [
    ("all black", np.zeros((300, 400, 3), np.uint8)),
    ("uniform grey", np.full((300, 400, 3), 128, np.uint8)),
    ("uniform noise", np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)),
    ("horizontal ramp", np.repeat(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], 300, 0).repeat(3, 2)),
    ("tiny spot", cv2.circle(np.zeros((300, 400, 3), np.uint8), (200, 150), 4, (200, 100, 50), -1)),
    ("bright square", cv2.rectangle(np.zeros((300, 400, 3), np.uint8), (100, 50), (300, 250), (200, 100, 50), -1)),
])
def test_no_fundus_raises(name, image):
    with pytest.raises(FundusNotFoundError):
        detect_fov(image)


def test_bad_inputs_raise_value_errors():
    assert issubclass(FundusNotFoundError, ValueError)
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        to_rgb_uint8(np.zeros((4, 4), np.int8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_uint8(np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="numpy"):
        to_rgb_uint8([[0, 1]])


def test_graham_radius_estimate():
    image = draw_fundus(centre=(399.5, 299.5), radius=260.0)
    assert graham_radius(image) == pytest.approx(260.0, rel=0.01)
    assert graham_radius(skimage.data.retina()) == pytest.approx(RETINA_RADIUS, rel=TOLERANCE)


# --------------------------------------------------------------------------- enhancement

def test_graham_matches_reference_and_masks_outside(retina512):
    fov = detect_fov(retina512)
    out = graham(retina512, fov=fov)
    assert out.dtype == np.uint8 and out.shape == retina512.shape
    sigma = fov.radius / 30
    blur = ndi.gaussian_filter(retina512.astype(np.float64), (sigma, sigma, 0), mode="mirror", truncate=4.0)
    reference = np.clip(np.rint(4.0 * retina512 - 4.0 * blur + 128), 0, 255)
    keep = make_fov(fov.centre_x, fov.centre_y, 0.9 * fov.radius, fov.shape).mask
    assert np.abs(reference[keep] - out[keep]).max() <= 1
    assert (out[~keep] == 128).all()
    inner = make_fov(fov.centre_x, fov.centre_y, 0.8 * fov.radius, fov.shape).mask
    np.testing.assert_allclose(out[inner].mean(axis=0), 128, atol=3)
    # without a FOV: detected; with only a radius: centred circle (Graham's convention)
    np.testing.assert_array_equal(graham(retina512), out)
    centred = graham(retina512, radius=200.0)
    kept = make_fov(255.5, 255.5, 0.9 * 200.0, fov.shape).mask
    assert (centred[~kept] == 128).all()
    assert (centred[kept] != 128).any(axis=1).mean() > 0.5


def test_graham_respects_flat_cuts():
    image = draw_fundus(shape=(700, 800), centre=(400.0, 350.0), radius=300.0, cut=0.8)
    fov = detect_fov(image)
    out = graham(image, fov=fov)
    margin = int(np.ceil(0.1 * fov.radius))  # cuts are pulled in like the rim (mask_fraction 0.9)
    assert (out[: fov.top + margin] == 128).all() and (out[fov.bottom + 1 - margin:] == 128).all()
    inside = out[fov.top + margin + 1: fov.bottom - margin, 300:500].astype(float)
    rows = inside.mean(axis=(1, 2))
    assert rows[:3].mean() - np.median(rows) < 10  # no bright band left along the cut


def test_median_background_matches_scipy_reference():
    image = draw_fundus(shape=(128, 128), centre=(63.5, 63.5), radius=62.0)
    kernel = 13
    out = median_background(image, kernel)
    median = ndi.median_filter(image, size=(kernel, kernel, 1), mode="nearest").astype(np.float64)
    reference = np.clip(4.0 * image - 4.0 * median + 128, 0, 255)
    keep = make_fov(63.5, 63.5, 0.45 * 128, (128, 128)).mask
    np.testing.assert_array_equal(out[keep], reference[keep])
    assert (out[~keep] == 128).all()
    assert clpi_median_kernel(1024) == 103
    assert all(clpi_median_kernel(side) % 2 == 1 for side in (100, 255, 512, 513, 2000))
    with pytest.raises(ValueError, match="odd"):
        median_background(image, 12)


def test_clahe_changes_only_green_and_raises_its_contrast(retina512):
    fov = detect_fov(retina512)
    out = clahe_green(retina512)
    np.testing.assert_array_equal(out[..., [0, 2]], retina512[..., [0, 2]])
    before = retina512[..., 1][fov.mask].std()
    after = out[..., 1][fov.mask].std()
    assert after > 1.2 * before
    assert clahe_green(retina512, clip=4.0)[..., 1][fov.mask].std() > after
    with pytest.raises(ValueError, match="tiles"):
        clahe_green(retina512, tiles=0)


# --------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("kwargs", [{}, dict(shape=(500, 800), centre=(399.5, 249.5), radius=300.0)])
@pytest.mark.parametrize("pad", [0.0, 0.1])
def test_crop_is_square_centred_and_keeps_the_fov(kwargs, pad):
    image = draw_fundus(**kwargs)
    fov = detect_fov(image)
    crop = crop_to_fov(image, fov, pad=pad)
    side = int(np.ceil(2 * fov.radius * (1 + pad)))
    assert crop.shape == (side, side, 3) and crop.dtype == np.uint8
    inside = image.copy()
    inside[~fov.mask] = 0
    # every FOV pixel is in the crop: the crop's content is the FOV's plus only background
    assert crop.astype(np.int64).sum() >= inside.astype(np.int64).sum()
    assert crop.astype(np.int64).sum() <= image.astype(np.int64).sum()
    again = detect_fov(crop)
    assert_geometry(again, ((side - 1) / 2, (side - 1) / 2), fov.radius)
    masked = crop_to_fov(image, fov, pad=pad, mask_outside=True)
    assert masked.astype(np.int64).sum() == inside.astype(np.int64).sum()


def test_fov_crop_box_is_the_crop_of_crop_to_fov():
    image = draw_fundus(shape=(500, 800), centre=(399.5, 249.5), radius=300.0)
    top, left, height, width = fov_crop_box(image, pad=0.05)
    margin = max(height, width)
    padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)))
    window = padded[margin + top:margin + top + height, margin + left:margin + left + width]
    np.testing.assert_array_equal(window, crop_to_fov(image, pad=0.05))


def test_fov_moved_agrees_with_detection_after_crop_and_resize():
    image = draw_fundus(shape=(700, 800), centre=(400.0, 350.0), radius=300.0, cut=0.8)
    fov = detect_fov(image)
    out = preprocess(image, steps=("crop",), size=256)
    side = int(np.ceil(2 * fov.radius))
    x0, y0 = round(fov.centre_x - (side - 1) / 2), round(fov.centre_y - (side - 1) / 2)
    moved = fov.moved(x0, y0, 256 / side, (256, 256))
    found = detect_fov(out)
    assert_geometry(found, (moved.centre_x, moved.centre_y), moved.radius)
    assert abs(found.top - moved.top) <= 2 and abs(found.bottom - moved.bottom) <= 2


def test_resizes_keep_aspect_and_pad():
    image = draw_fundus(shape=(300, 400))
    assert resize_keep_aspect(image, 200).shape == (150, 200, 3)
    assert resize_keep_aspect(image, 600, side="shorter").shape == (600, 800, 3)
    square = square_resize(image, 200)
    assert square.shape == (200, 200, 3)
    assert square[:20].max() < 10 and square[-20:].max() < 10  # the black padding rows
    np.testing.assert_allclose(square[25:175].mean(), cv2.resize(image, (200, 150), interpolation=cv2.INTER_AREA).mean(), rtol=0.01)
    with pytest.raises(ValueError, match="side"):
        resize_keep_aspect(image, 200, side="width")


# --------------------------------------------------------------------------- quality and pipeline

def test_quality_scores_rank_sharpness_and_exposure():
    image = draw_fundus()
    fov = make_fov(401.3, 297.6, 260.0, image.shape[:2])
    scores = quality_scores(image, fov)
    assert set(scores) == {"sharpness", "mean_intensity", "underexposed_fraction", "overexposed_fraction", "fov_fraction"}
    assert scores["fov_fraction"] == pytest.approx(np.pi * 260.0 ** 2 / (600 * 800), rel=0.01)
    blurred = quality_scores(cv2.GaussianBlur(image, (0, 0), 3), fov)
    assert blurred["sharpness"] < 0.5 * scores["sharpness"]
    dark = quality_scores(draw_fundus(gain=0.12), fov)
    bright = quality_scores(draw_fundus(gain=2.5), fov)
    assert dark["underexposed_fraction"] > 0.9 > scores["underexposed_fraction"] + 0.8
    assert bright["overexposed_fraction"] > 0.9 > scores["overexposed_fraction"] + 0.8
    assert dark["mean_intensity"] < scores["mean_intensity"] < bright["mean_intensity"]


def test_preprocess_pipeline(retina512):
    out = preprocess(retina512, steps=("crop", "graham"), size=256)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    # the FOV fills the square (radius ~128 px): Graham's mask at 0.9 r, with 2 % slack
    outside = ~make_fov(127.5, 127.5, 0.92 * 128, (256, 256)).mask
    inside = make_fov(127.5, 127.5, 0.88 * 128, (256, 256)).mask
    assert (out[outside] == 128).all()
    assert (out[inside] != 128).any(axis=1).mean() > 0.5
    np.testing.assert_array_equal(preprocess(retina512, steps=("crop",), size=None), crop_to_fov(retina512))
    np.testing.assert_array_equal(preprocess(retina512, steps=("graham",), size=None), graham(retina512))
    for steps in [("clahe",), ("median",), ("crop", "median", "clahe")]:
        assert preprocess(retina512, steps=steps, size=128).shape == (128, 128, 3)
    assert set(ENHANCEMENTS) == {"graham", "median", "clahe"}
    for bad, message in [(("graham", "crop"), "first"), (("blur",), "unknown"), (("clahe", "clahe"), "repeat")]:
        with pytest.raises(ValueError, match=message):
            preprocess(retina512, steps=bad)
