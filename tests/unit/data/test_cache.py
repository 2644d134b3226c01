"""build_cache: same pixels as a direct resize, no rewrites, atomic files, parameter checks, hooks."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_lib.data.cache import CacheError, build_cache, describe_callable
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.manifest import LESIONS, ManifestError
from tests.unit.data.test_datasets import expected_masks, write_dataset


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - image


def add(image: np.ndarray, value: int) -> np.ndarray:
    return image + np.uint8(value)


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32)


def pad_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """A 60 x 60 box reaching 10 px above and 6 px left of a 40 x 48 image."""
    return (-10, -6, 60, 60)


def file_times(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.png")}


@pytest.fixture()
def source(tmp_path: Path):
    folder = tmp_path / "src"
    folder.mkdir()
    return write_dataset(folder, n=3)


def samples(manifest, **kwargs):
    dataset = FundusDataset(manifest, tasks=("masks", "hr_image", "dr"), normalize=False, **kwargs)
    return [dataset[i] for i in range(len(dataset))]


def test_cached_manifest_gives_the_pixels_of_a_direct_resize(source, tmp_path):
    cached = build_cache(source, tmp_path / "cache", 24, progress=False)
    assert all(Path(p).parent == tmp_path / "cache" / "images" for p in cached["image_path"])
    assert (cached["mask_rule"] == "nonzero").all()
    assert cached["mask_iHE"].isna().all() and cached["mask_MA"].notna().all()
    assert cached.drop(columns=["image_path", "mask_rule", *[f"mask_{l}" for l in LESIONS]]).equals(
        source.drop(columns=["image_path", "mask_rule", *[f"mask_{l}" for l in LESIONS]]))
    for got, want in zip(samples(cached), samples(source, image_size=24)):
        assert got["hr_image"].shape == (3, 24, 24)
        assert torch.equal(got["hr_image"], want["hr_image"])
        assert torch.equal(got["masks"], want["masks"]) and got["masks"].sum() > 0
        assert torch.equal(got["dr"], want["dr"])


def test_image_without_any_mask_file(source, tmp_path):
    source.loc[0, ["mask_MA", "mask_HaEx"]] = None
    source.loc[0, ["lesion_MA", "lesion_HaEx"]] = 0
    cached = build_cache(source, tmp_path / "cache", 24, progress=False)
    assert cached.loc[0, [f"mask_{l}" for l in LESIONS]].isna().all()
    assert not FundusDataset(cached, tasks=("masks",))[0]["masks"].any()


def test_second_call_rewrites_nothing_and_returns_the_same_manifest(source, tmp_path):
    first = build_cache(source, tmp_path / "cache", 24, progress=False)
    before = file_times(tmp_path / "cache")
    assert len(before) == 3 * 3  # image + MA + HaEx per image
    second = build_cache(source, tmp_path / "cache", 24, progress=False)
    assert file_times(tmp_path / "cache") == before
    assert second.equals(first)


def test_changed_source_image_is_recached_alone(source, tmp_path):
    build_cache(source, tmp_path / "cache", 24, progress=False)
    before = file_times(tmp_path / "cache")
    changed = Path(source.loc[1, "image_path"])
    Image.fromarray(np.full((40, 48, 3), 7, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    cached = build_cache(source, tmp_path / "cache", 24, progress=False)
    after = file_times(tmp_path / "cache")
    rewritten = {p for p in before if after[p] != before[p]}
    assert rewritten == {cached.loc[1, "image_path"], cached.loc[1, "mask_MA"], cached.loc[1, "mask_HaEx"]}
    assert np.all(np.asarray(Image.open(cached.loc[1, "image_path"])) == 7)


def test_other_parameters_raise_unless_rebuild(source, tmp_path):
    build_cache(source, tmp_path / "cache", 24, progress=False)
    with pytest.raises(CacheError, match="rebuild=True"):
        build_cache(source, tmp_path / "cache", 16, progress=False)
    with pytest.raises(CacheError, match="rebuild=True"):
        build_cache(source, tmp_path / "cache", 24, preprocess=invert, progress=False)
    rebuilt = build_cache(source, tmp_path / "cache", 16, rebuild=True, progress=False)
    assert Image.open(rebuilt.loc[0, "image_path"]).size == (16, 16)
    assert all(Image.open(p).size == (16, 16) for p in (tmp_path / "cache").rglob("*.png"))


def test_interrupted_write_leaves_no_partial_file(source, tmp_path, monkeypatch):
    real_save = Image.Image.save
    calls = {"n": 0}

    def failing_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second image's PNG: write half a file, then die
            fp.write(b"\x89PNG\r\n\x1a\n truncated")  # the open temporary file
            raise KeyboardInterrupt("power cut")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        build_cache(source, tmp_path / "cache", 24, progress=False)
    monkeypatch.setattr(Image.Image, "save", real_save)
    written = sorted((tmp_path / "cache").rglob("*.png"))
    assert len(written) == 3  # the first image and its two masks, complete
    for path in written:
        with Image.open(path) as handle:
            handle.load()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    cached = build_cache(source, tmp_path / "cache", 24, progress=False)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 9
    assert all(torch.equal(a["hr_image"], b["hr_image"])
               for a, b in zip(samples(cached), samples(source, image_size=24)))


def test_preprocess_runs_on_the_resized_image(source, tmp_path):
    cached = build_cache(source, tmp_path / "cache", 24, preprocess=invert, progress=False)
    for got, want in zip(samples(cached), samples(source, image_size=24)):
        assert torch.allclose(got["hr_image"], 1 - want["hr_image"])
        assert torch.equal(got["masks"], want["masks"])


def test_hooks_need_a_stable_identity():
    assert describe_callable(invert, "preprocess").endswith("test_cache.invert")
    assert describe_callable(functools.partial(add, value=3), "p") != describe_callable(
        functools.partial(add, value=4), "p")
    with pytest.raises(CacheError, match="module-level"):
        describe_callable(lambda image: image, "preprocess")


def test_bad_preprocess_output_is_reported(source, tmp_path):
    with pytest.raises(CacheError, match="uint8"):
        build_cache(source, tmp_path / "cache", 24, preprocess=to_float,
                    progress=False)


def test_crop_box_moves_masks_and_pads_with_black(source, tmp_path):
    cached = build_cache(source, tmp_path / "cache", 60, crop_box=pad_box, progress=False)
    original = np.asarray(Image.open(source.loc[0, "image_path"]))
    image = np.asarray(Image.open(cached.loc[0, "image_path"]))
    assert image.shape == (60, 60, 3)
    assert np.array_equal(image[10:50, 6:54], original)
    assert not image[:10].any() and not image[50:].any() and not image[:, :6].any()
    masks = FundusDataset(cached, tasks=("masks",))[0]["masks"]
    assert torch.equal(masks[:, 10:50, 6:54], expected_masks(0)) and masks.sum() == expected_masks(0).sum()


def test_worker_processes_write_the_same_files(source, tmp_path):
    serial = build_cache(source, tmp_path / "serial", 24, progress=False)
    parallel = build_cache(source, tmp_path / "parallel", 24, workers=2, progress=False)
    for a, b in zip(serial["image_path"], parallel["image_path"]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_refuses_foreign_folder_and_missing_sources(source, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CacheError, match="not empty"):
        build_cache(source, foreign, 24, progress=False)
    source.loc[2, "image_path"] = str(tmp_path / "gone.png")
    with pytest.raises(ManifestError, match="gone.png"):
        build_cache(source, tmp_path / "cache", 24, progress=False)
