"""Pixel fingerprints: copies that are not byte-identical are found, different photographs are not."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from fundus_lib.data.duplicates import (
    DEFAULT_THRESHOLD, fingerprint, fingerprints, group_of, read_fingerprint, similar_pairs,
)
from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.synthetic import write_dataset


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    """A real fundus photograph (public domain, ships with scikit-image), RGB uint8, 1411 x 1411."""
    return skimage.data.retina()


@pytest.fixture(scope="module")
def synthetic_photos(tmp_path_factory) -> list[Path]:
    """Twelve different synthetic fundus photographs (same generator, so they share anatomy)."""
    root = write_dataset(tmp_path_factory.mktemp("synth") / "set", n=12, size=192, seed=3)
    return sorted(path for path in root.glob("synth_*.png") if path.stem.count("_") == 1)


def _reencode(rgb: np.ndarray, scale: float, suffix: str, **params: int) -> np.ndarray:
    """``rgb`` resized by ``scale`` and passed through an encoder (lossy for .jpg), decoded again."""
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    flags = [value for item in params.items() for value in (getattr(cv2, item[0]), item[1])]
    ok, encoded = cv2.imencode(suffix, small[..., ::-1], flags)
    assert ok
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]


@pytest.mark.parametrize("scale, suffix, params", [
    (1.0, ".jpg", {"IMWRITE_JPEG_QUALITY": 70}),   # re-compressed
    (0.5, ".png", {}),                            # half size, lossless
    (0.3, ".jpg", {"IMWRITE_JPEG_QUALITY": 80}),  # small and re-compressed
])
def test_reencoded_and_resized_copies_of_a_real_photograph_match(retina, scale, suffix, params):
    copy = _reencode(retina, scale, suffix, **params)
    assert copy.shape != retina.shape or not np.array_equal(copy, retina)  # not the same pixels, let alone bytes
    assert float(fingerprint(retina) @ fingerprint(copy)) >= 0.95


def test_a_brighter_copy_still_matches(retina):
    brighter = np.clip(retina.astype(np.float32) * 1.15 + 8, 0, 255).astype(np.uint8)
    assert float(fingerprint(retina) @ fingerprint(brighter)) >= DEFAULT_THRESHOLD


def test_different_photographs_do_not_match(retina, synthetic_photos):
    prints = fingerprints(synthetic_photos)
    correlation = prints @ prints.T
    off_diagonal = correlation[~np.eye(len(prints), dtype=bool)]
    assert off_diagonal.max() < DEFAULT_THRESHOLD - 0.2  # a wide margin, although they share one generator
    assert similar_pairs(prints) == []
    assert np.abs(prints @ fingerprint(retina)).max() < 0.5
    # the same photograph mirrored (the other eye's geometry) is a different picture
    assert float(fingerprint(retina) @ fingerprint(retina[:, ::-1].copy())) < 0.5


def test_similar_pairs_finds_planted_copies_among_files(tmp_path, synthetic_photos):
    photo = cv2.imread(str(synthetic_photos[4]))
    copy = tmp_path / "copy.jpg"
    cv2.imwrite(str(copy), cv2.resize(photo, (150, 150), interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert copy.read_bytes() != synthetic_photos[4].read_bytes()
    pairs = similar_pairs(fingerprints([*synthetic_photos, copy]))
    assert [(i, j) for i, j, _ in pairs] == [(4, len(synthetic_photos))]
    assert pairs[0][2] >= 0.95


def test_flat_images_have_no_fingerprint_and_match_nothing():
    black = np.zeros((50, 60, 3), dtype=np.uint8)
    grey = np.full((50, 60), 128, dtype=np.uint8)
    prints = np.stack([fingerprint(black), fingerprint(grey), fingerprint(grey)])
    assert np.isnan(prints).all()
    assert similar_pairs(prints) == []


def test_unreadable_file_is_named(tmp_path):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not an image")
    with pytest.raises(ManifestError, match=r"cannot read image .*broken\.tif"):
        read_fingerprint(broken)


def test_threshold_must_be_a_correlation():
    with pytest.raises(ValueError, match="threshold"):
        similar_pairs(np.zeros((2, 4)), threshold=1.5)


def test_group_of_joins_chains_to_their_smallest_member():
    assert group_of(6, [(4, 1), (1, 3), (5, 2)]).tolist() == [0, 1, 2, 1, 1, 2]
    assert group_of(3, []).tolist() == [0, 1, 2]
