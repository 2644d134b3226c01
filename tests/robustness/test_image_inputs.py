"""Image files a user may meet, read through the public entry points (FundusDataset, build_cache).

Every case builds its file in ``tmp_path`` and either expects a ManifestError / CacheError that
names the file, or the documented pixels: palette and CMYK files give the colours they encode
(reference: PIL's own ``convert("RGB")``), EXIF orientation is applied, greyscale is repeated
to three channels, alpha is dropped, 16-bit is scaled by its maximum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data as skdata

from fundus_lib.data.cache import CacheError, build_cache
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.manifest import ManifestError, make_manifest
from fundus_lib.preprocess import fov_crop_box

SHAPE = (48, 64)  # (height, width) of the test pictures


def colours(shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """A smooth RGB picture with distinct values per channel (so swapped or inverted channels show)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return np.stack([rows * 4 % 256, cols * 3 % 256, (rows + cols) * 2 % 256], axis=-1).astype(np.uint8)


def manifest_of(path: Path, mask: Path | None = None):
    row = {"image_id": "case", "image_path": str(path), "dr_grade": 1, "source": "test"}
    if mask is not None:
        row.update(mask_MA=str(mask), lesion_MA=1)
    return make_manifest([row])


def loaded(path: Path) -> np.ndarray:
    """The picture FundusDataset gives for ``path``, back as (H, W, 3) uint8."""
    image = FundusDataset(manifest_of(path), tasks=("dr",), normalize=False)[0]["image"]
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------- files that must be refused, by name

def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated_png(path: Path) -> None:
    Image.fromarray(colours()).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_jpeg(path: Path) -> None:
    Image.fromarray(colours()).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def text_renamed(path: Path) -> None:
    path.write_text("image_id,dr_grade\nIDRiD_001,2\n")


def one_pixel(path: Path) -> None:
    Image.new("RGB", (1, 1), (120, 60, 30)).save(path)


def extreme_aspect(path: Path) -> None:
    Image.fromarray(colours((20, 400))).save(path)


REFUSED: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "zero_bytes": ("empty.png", zero_bytes, r"cannot read image .*empty\.png"),
    "truncated_png": ("cut.png", truncated_png, r"cannot read image .*cut\.png.*(?i:truncated)"),
    "truncated_jpeg": ("cut.jpg", truncated_jpeg, r"cannot read image .*cut\.jpg.*(?i:truncated)"),
    "text_renamed": ("labels.png", text_renamed, r"cannot read image .*labels\.png.*cannot identify"),
    "one_pixel": ("dot.png", one_pixel, r"image .*dot\.png is 1x1 pixels; .*at least 16 pixels"),
    "extreme_aspect": ("strip.png", extreme_aspect, r"image .*strip\.png is 20x400 pixels, more elongated than 4:1"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_image_is_refused_naming_the_file(case, tmp_path):
    name, write, message = REFUSED[case]
    write(tmp_path / name)
    with pytest.raises(ManifestError, match=message):
        loaded(tmp_path / name)
    with pytest.raises(CacheError, match=rf"cannot cache image 'case' \(.*{name.replace('.', '[.]')}\)"):
        build_cache(manifest_of(tmp_path / name), tmp_path / "cache", 32, progress=False)


# ---------------------------------------------------------------- files decoded to documented pixels

def write_and_expect(case: str, path: Path) -> np.ndarray:
    """Write the file of ``case`` at ``path``; return the (H, W, 3) uint8 pixels it must give."""
    rgb = colours()
    if case == "rgb_png":
        Image.fromarray(rgb).save(path)
        return rgb
    if case == "greyscale":
        Image.fromarray(rgb[..., 0]).save(path)
        return np.repeat(rgb[..., :1], 3, axis=2)
    if case == "grey_alpha":
        Image.fromarray(rgb[..., 0]).convert("LA").save(path)
        return np.repeat(rgb[..., :1], 3, axis=2)
    if case == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(SHAPE, 7, np.uint8)])).save(path)
        return rgb
    if case == "grey_16bit":
        grey = (np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) * 9).astype(np.uint16)  # max 27639
        Image.fromarray(grey).save(path)
        assert Image.open(path).mode == "I;16"
        return np.repeat((grey / grey.max() * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if case == "rgb_48bit":
        deep = rgb.astype(np.uint16) * 257
        cv2.imwrite(str(path), deep[..., ::-1])  # OpenCV writes 16 bits per channel, BGR order
        return rgb
    if case == "palette":
        palette = Image.fromarray(rgb).quantize(colors=64)
        palette.save(path)
        assert Image.open(path).mode == "P"
        return np.asarray(palette.convert("RGB"))
    if case in ("cmyk_jpeg", "cmyk_tiff"):
        Image.fromarray(rgb).convert("CMYK").save(path)
        with Image.open(path) as handle:
            assert handle.mode == "CMYK"
            return np.asarray(handle.convert("RGB"))
    if case == "bilevel":
        Image.fromarray(rgb[..., 0] > 100).convert("1").save(path)
        return np.repeat(np.where(rgb[..., :1] > 100, 255, 0).astype(np.uint8), 3, axis=2)
    if case == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: stored sideways, shown rotated 90 degrees clockwise
        Image.fromarray(rgb).save(path, quality=100, exif=exif)
        with Image.open(path) as handle:
            upright = np.asarray(ImageOps.exif_transpose(handle).convert("RGB"))
        assert upright.shape == (SHAPE[1], SHAPE[0], 3)
        return upright
    if case == "black":
        Image.new("RGB", SHAPE[::-1]).save(path)
        return np.zeros((*SHAPE, 3), np.uint8)
    if case == "white":
        Image.new("RGB", SHAPE[::-1], (255, 255, 255)).save(path)
        return np.full((*SHAPE, 3), 255, np.uint8)
    if case == "non_fundus":
        astronaut = skdata.astronaut()[::8, ::8]
        Image.fromarray(astronaut).save(path)
        return astronaut
    raise AssertionError(case)


DECODED = {"rgb_png": "png", "greyscale": "png", "grey_alpha": "png", "rgba": "png", "grey_16bit": "png",
           "rgb_48bit": "png", "palette": "png", "cmyk_jpeg": "jpg", "cmyk_tiff": "tif", "bilevel": "png",
           "exif_rotated": "jpg", "black": "png", "white": "png", "non_fundus": "png"}


@pytest.mark.parametrize("case", list(DECODED))
def test_image_kind_gives_the_documented_pixels(case, tmp_path):
    path = tmp_path / f"{case}.{DECODED[case]}"
    expected = write_and_expect(case, path)
    got = loaded(path)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float round trip only


def test_palette_mask_is_read_by_colour_not_by_index(tmp_path):
    """A palette mask whose lesion colour has palette index 0 (and background index 1)."""
    image = tmp_path / "photo.png"
    Image.fromarray(colours()).save(image)
    lesion = np.zeros(SHAPE, bool)
    lesion[10:20, 5:25] = True
    mask = Image.fromarray(np.where(lesion, 0, 1).astype(np.uint8), mode="P")
    mask.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    mask.save(tmp_path / "mask.png")
    sample = FundusDataset(manifest_of(image, tmp_path / "mask.png"), tasks=("masks",))[0]
    assert np.array_equal(sample["masks"][0].numpy().astype(bool), lesion)


# ---------------------------------------------------------------- content that is no fundus photograph

@pytest.mark.parametrize("case", ["black", "white", "non_fundus"])
def test_field_of_view_crop_refuses_pictures_without_a_fundus(case, tmp_path):
    path = tmp_path / f"{case}.png"
    write_and_expect(case, path)
    with pytest.raises(CacheError, match=rf"cannot cache image 'case' \(.*{case}\.png\): .*(field of view|contrast|"
                                         r"bright region|circle|disc)"):
        build_cache(manifest_of(path), tmp_path / "cache", 32, crop_box=fov_crop_box, progress=False)


def test_field_of_view_crop_accepts_a_real_fundus_photograph(tmp_path):
    path = tmp_path / "retina.jpg"
    Image.fromarray(skdata.retina()[::2, ::2]).save(path)
    cached = build_cache(manifest_of(path), tmp_path / "cache", 32, crop_box=fov_crop_box, progress=False)
    assert Image.open(cached.loc[0, "image_path"]).size == (32, 32)
