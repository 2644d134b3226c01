"""SynthFundus generator: determinism, masks, labels against geometry, prior, domains, LR pairs."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.synthetic import (DOMAINS, FEASIBLE_CELLS, IDRID_PRIOR, LESION_SIZES, generate, make_lr,
                                       resolve_prior, sample_labels, sample_scenes, scene_labels, write_dataset)

ALL_DOMAINS = list(DOMAINS)


def one_cell(dr: int, dme: int) -> np.ndarray:
    prior = np.zeros((5, 3))
    prior[dr, dme] = 1.0
    return prior


@pytest.fixture(scope="module")
def mixed():
    """16 images: 8 proliferative (all lesion kinds), 8 from the balanced prior, all domains."""
    pdr = generate(8, 128, seed=21, domain=ALL_DOMAINS, prior=one_cell(4, 2) + one_cell(4, 1))
    balanced = generate(8, 128, seed=22, domain=ALL_DOMAINS, prior="balanced")
    images = np.concatenate([pdr.images, balanced.images])
    masks = np.concatenate([pdr.masks, balanced.masks])
    labels = pd.concat([pdr.labels, balanced.labels], ignore_index=True)
    return images, masks, labels


def test_same_seed_same_bytes_different_seed_different_images():
    first = generate(3, 96, seed=5, domain=ALL_DOMAINS)
    again = generate(3, 96, seed=5, domain=ALL_DOMAINS)
    other = generate(3, 96, seed=6, domain=ALL_DOMAINS)
    assert first.images.dtype == np.uint8 and first.images.shape == (3, 96, 96, 3)
    assert first.masks.dtype == bool and first.masks.shape == (3, len(LESIONS), 96, 96)
    assert first.images.tobytes() == again.images.tobytes()
    assert np.array_equal(first.masks, again.masks)
    assert first.labels.equals(again.labels)
    assert all(not np.array_equal(a, b) for a, b in zip(first.images, other.images))


def test_images_do_not_depend_on_chunking():
    whole = generate(4, 96, seed=3)
    parts = [generate(2, 96, seed=3, start=0), generate(2, 96, seed=3, start=2)]
    assert whole.images.tobytes() == np.concatenate([p.images for p in parts]).tobytes()
    assert whole.labels["image_id"].tolist() == ["synth_000000", "synth_000001", "synth_000002", "synth_000003"]


def test_sample_labels_are_the_labels_of_generate():
    rendered = generate(4, 96, seed=9, domain=ALL_DOMAINS, prior="balanced")
    sampled = sample_labels(4, 96, seed=9, domain=ALL_DOMAINS, prior="balanced")
    assert sampled.equals(rendered.labels)


def test_mask_non_empty_exactly_when_lesion_present(mixed):
    _, masks, labels = mixed
    non_empty = masks.any(axis=(2, 3))
    presence = labels[[f"lesion_{lesion}" for lesion in LESIONS]].to_numpy().astype(bool)
    counts = labels[[f"count_{lesion}" for lesion in LESIONS]].to_numpy()
    assert np.array_equal(non_empty, presence)
    assert np.array_equal(presence, counts > 0)
    assert presence.any(axis=0).all(), "fixture should contain every lesion class at least once"
    assert (~presence).any(axis=0).all(), "fixture should lack every lesion class at least once"


def test_masks_and_lesions_stay_inside_the_field_of_view(mixed):
    images, masks, labels = mixed
    size = images.shape[1]
    yy, xx = np.mgrid[:size, :size]
    for image, mask, row in zip(images, masks, labels.itertuples()):
        beyond_rim = np.hypot(xx - row.fov_x, yy - row.fov_y) - row.fov_radius
        assert not mask[:, beyond_rim > 1].any()
        surround = image[(beyond_rim > 1) & ~_notch_zone(row, xx, yy)]
        if row.jpeg_quality == 0:
            assert surround.max() == 0  # black surround
        else:  # JPEG ringing reaches about one 16 px chroma block past the rim, as in real JPEG photos
            assert image[beyond_rim > 24].max() <= 2


def _notch_zone(row, xx, yy):
    """Pixels where cam_c's notch tab may extend the field (upper right, outside the circle)."""
    if row.domain != "cam_c":
        return np.zeros_like(xx, dtype=bool)
    angle = np.deg2rad(-42.0)
    cx = row.fov_x + 1.05 * row.fov_radius * np.cos(angle)
    cy = row.fov_y + 1.05 * row.fov_radius * np.sin(angle)
    return (np.abs(xx - cx) <= 0.08 * row.fov_radius + 2) & (np.abs(yy - cy) <= 0.08 * row.fov_radius + 2)


def test_dme_grade_agrees_with_exudate_masks_and_stored_geometry():
    batch = generate(12, 160, seed=4, prior=one_cell(2, 1) + one_cell(2, 2) + one_cell(3, 0))
    size = 160
    yy, xx = np.mgrid[:size, :size]
    seen = set()
    for mask, row in zip(batch.masks, batch.labels.itertuples()):
        exudate = mask[LESIONS.index("HaEx")]
        if row.dme_grade == 0:
            assert not exudate.any() and np.isnan(row.haex_fovea_dd)
            continue
        nearest = np.hypot(xx - row.fovea_x, yy - row.fovea_y)[exudate].min()
        largest = 1.35 * LESION_SIZES["HaEx"][1] * row.fov_radius  # polygon radius can reach 1.35 x size
        if row.dme_grade == 2:
            assert row.haex_fovea_dd <= 1.0
            assert nearest <= row.disc_diameter + 0.75  # the exudate's centre pixel is in the mask
        else:
            assert row.haex_fovea_dd > 1.0
            assert nearest > row.disc_diameter - largest - 1.0
        seen.add(row.dme_grade)
    assert seen == {1, 2}


def test_stored_disc_and_fovea_match_the_picture():
    batch = generate(6, 192, seed=8, prior=one_cell(0, 0))
    size = 192
    yy, xx = np.mgrid[:size, :size]
    for image, row in zip(batch.images, batch.labels.itertuples()):
        red = image[..., 0].astype(float)
        green = image[..., 1].astype(float)
        fov = np.hypot(xx - row.fov_x, yy - row.fov_y) < 0.9 * row.fov_radius
        disc = np.hypot(xx - row.disc_x, yy - row.disc_y) < 0.3 * row.disc_diameter
        fovea = np.hypot(xx - row.fovea_x, yy - row.fovea_y) < 0.2 * row.disc_diameter
        ring = (np.hypot(xx - row.fovea_x, yy - row.fovea_y) > 1.2 * row.disc_diameter) & fov
        assert green[disc].mean() > green[fov].mean() + 40  # bright yellowish disc
        assert red[fovea].mean() < red[ring].mean()  # darker fovea
        assert (row.disc_x > row.fovea_x) == (row.eye == "right")  # disc on the nasal side
        spacing = np.hypot(row.disc_x - row.fovea_x, row.disc_y - row.fovea_y) / row.disc_diameter
        assert 2.2 <= spacing <= 2.7
        assert 6.0 <= 2 * row.fov_radius / row.disc_diameter <= 7.1


def test_class_prior_is_honoured_on_2000_draws():
    labels = sample_labels(2000, 256, seed=1)
    observed = np.zeros((5, 3))
    np.add.at(observed, (labels["dr_grade"].to_numpy(), labels["dme_grade"].to_numpy()), 1)
    drawn = resolve_prior("idrid") > 0  # feasible cells IDRiD has images in (it has no DR 0 with DME)
    assert observed[~drawn].sum() == 0
    assert stats.chisquare(observed[drawn], resolve_prior("idrid")[drawn] * 2000).pvalue > 1e-3
    assert labels["eye"].value_counts().min() > 900
    assert (labels["referable"] == (labels["dr_grade"] >= 2)).all()


@pytest.mark.parametrize("severe", [1, 10, 21])
def test_every_target_cell_is_reached_exactly(severe):
    for dr, dme in zip(*np.nonzero(FEASIBLE_CELLS)):
        scenes = sample_scenes(12, 128, seed=int(dr * 3 + dme), prior=one_cell(dr, dme), domain=ALL_DOMAINS,
                               severe_ihe_per_quadrant=severe)
        grades = {(row["dr_grade"], row["dme_grade"]) for row in map(scene_labels, scenes)}
        assert grades == {(dr, dme)}
        assert all(scene.target == (dr, dme) for scene in scenes)


def test_idrid_prior_is_canet_table_iii():
    assert IDRID_PRIOR.sum() == 516
    assert IDRID_PRIOR[2].tolist() == [36, 24, 140] and IDRID_PRIOR[4].tolist() == [4, 2, 33]


def _fov_colour(images: np.ndarray) -> np.ndarray:
    """Per-image mean RGB over the field of view (pixels brighter than the black surround)."""
    return np.stack([image[image.max(axis=2) > 20].mean(axis=0) for image in images])


def test_camera_domains_differ_in_colour_statistics():
    colours = {name: _fov_colour(generate(6, 96, seed=2, domain=name).images) for name in ("cam_a", "cam_b", "cam_c")}
    for first, second in (("cam_a", "cam_b"), ("cam_a", "cam_c"), ("cam_b", "cam_c")):
        pvalues = stats.ttest_ind(colours[first], colours[second], equal_var=False).pvalue
        assert pvalues.min() < 1e-3, (first, second, pvalues)


def _top_edge(image: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Index of the first field-of-view row in each of ``columns``."""
    return (image[:, columns].max(axis=2) > 30).argmax(axis=0)


def test_cut_domain_has_flat_top_and_bottom_edges():
    size = 256
    for name, flat in (("cam_b", True), ("cam_a", False)):
        batch = generate(2, size, seed=3, domain=name, prior=one_cell(0, 0))
        for image, row in zip(batch.images, batch.labels.itertuples()):
            columns = np.arange(int(row.fov_x - 0.4 * row.fov_radius), int(row.fov_x + 0.4 * row.fov_radius))
            top, bottom = _top_edge(image, columns), _top_edge(image[::-1], columns)
            spread = max(np.ptp(top), np.ptp(bottom))
            assert spread <= 2 if flat else spread >= 6  # a circle drops 0.08 R over +-0.4 R


def _sharpness(image: np.ndarray, fov: np.ndarray) -> float:
    """Mean horizontal green gradient over mean green inside ``fov`` (exposure cancels out)."""
    green = image[..., 1].astype(float)
    return float(np.abs(np.diff(green, axis=1))[fov[:, 1:]].mean() / green[fov].mean())


def test_low_quality_defects_show_on_paired_images():
    """cam_a and low_quality share optics, so one seed gives the same eyes; only capture differs."""
    good = generate(10, 192, seed=12, domain="cam_a")  # 10 images: enough to hold each defect alone
    poor = generate(10, 192, seed=12, domain="low_quality")
    assert good.labels["quality_ok"].all() and not poor.labels["quality_ok"].any()
    assert good.labels["dr_grade"].equals(poor.labels["dr_grade"])
    flags = poor.labels
    checked = set()
    for i in range(10):
        g, p = good.images[i].astype(float), poor.images[i].astype(float)
        fov = cv2.erode((good.images[i].max(axis=2) > 20).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        if flags.quality_underexposed[i]:  # green: the channel that does not saturate
            assert p[fov, 1].mean() < 0.8 * g[fov, 1].mean()
            checked.add("under")
        if flags.quality_overexposed[i]:
            assert p[fov, 1].mean() > 1.15 * g[fov, 1].mean()
            checked.add("over")
        if flags.quality_blur[i] and not flags.quality_noise[i]:
            assert _sharpness(poor.images[i], fov) < 0.8 * _sharpness(good.images[i], fov)
            checked.add("blur")
        if flags.quality_noise[i] and not flags.quality_blur[i]:
            assert _sharpness(poor.images[i], fov) > 1.3 * _sharpness(good.images[i], fov)
            checked.add("noise")
    assert checked == {"under", "over", "blur", "noise"}


def test_difficulty_shrinks_lesions_and_lowers_contrast():
    """Same seed, same layout; difficulty 1 draws haemorrhages smaller and fainter."""
    easy = generate(4, 256, seed=6, prior=one_cell(3, 0))
    hard = generate(4, 256, seed=6, prior=one_cell(3, 0), difficulty=1.0)
    channel = LESIONS.index("iHE")
    assert easy.labels["count_iHE"].equals(hard.labels["count_iHE"])
    assert hard.masks[:, channel].sum() < 0.7 * easy.masks[:, channel].sum()

    def contrast(batch) -> float:
        """Mean drop of green inside the haemorrhage masks below each image's median green."""
        drops = []
        for image, mask in zip(batch.images, batch.masks[:, channel]):
            green = image[..., 1].astype(float)
            drops.append(np.median(green[image.max(axis=2) > 20]) - green[mask].mean())
        return float(np.mean(drops))

    assert contrast(hard) < 0.7 * contrast(easy)


def test_make_lr_bicubic_pairs():
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8)[None, :, None], (64, 1, 3))  # (64, 128, 3)
    low = make_lr(ramp, scale=4)
    assert low.shape == (16, 32, 3) and low.dtype == np.uint8
    # bicubic preserves a linear ramp away from the borders: LR pixel j covers HR pixels 4j..4j+3
    assert np.abs(low[8, 2:-2, 0].astype(float) - (np.arange(2, 30) * 8 + 3)).max() <= 1
    constant = np.full((32, 32, 3), 77, np.uint8)
    assert (make_lr(constant, 4, blur=1.5) == 77).all()
    noisy = make_lr(constant, 4, noise=5.0, seed=1)
    assert noisy.std() > 2 and np.array_equal(noisy, make_lr(constant, 4, noise=5.0, seed=1))
    assert not np.array_equal(noisy, make_lr(constant, 4, noise=5.0, seed=2))
    with pytest.raises(ValueError, match="multiple of scale"):
        make_lr(np.zeros((30, 32, 3), np.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        make_lr(np.zeros((32, 32), np.uint8), 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(domain="fundus_cam"), "domain must name"),
    (dict(domain=[]), "domain must name"),
    (dict(prior="messidor"), "prior must be one of"),
    (dict(prior=np.ones((5, 3))), "cannot produce"),
    (dict(prior=np.ones((4, 3))), "shape"),
    (dict(difficulty=1.5), "difficulty"),
    (dict(seed=-1), "seed"),
    (dict(size=16), "size"),
    (dict(severe_ihe_per_quadrant=0), "severe_ihe_per_quadrant"),
])
def test_bad_arguments_raise(kwargs, message):
    arguments = dict(n=1, size=64, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(**arguments)


def test_write_dataset_is_atomic_and_refuses_to_overwrite(tmp_path):
    root = write_dataset(tmp_path / "set", 2, 64, seed=0)
    first = sorted(p.name for p in root.iterdir())
    assert "labels.csv" in first and "generator.json" in first and "synth_000001.png" in first
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(root, 2, 64, seed=1)
    write_dataset(root, 3, 64, seed=1, overwrite=True)
    assert "synth_000002.png" in {p.name for p in root.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folders left
    with pytest.raises(ValueError, match="n >= 1"):
        write_dataset(tmp_path / "empty", 0, 64)
    with pytest.raises(ValueError, match="workers"):
        write_dataset(tmp_path / "empty", 1, 64, workers=0)
    assert not (tmp_path / "empty").exists()


def test_write_dataset_bytes_do_not_depend_on_workers(tmp_path):
    one = write_dataset(tmp_path / "one", 4, 64, seed=5, prior="balanced")
    two = write_dataset(tmp_path / "two", 4, 64, seed=5, prior="balanced", workers=2)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in names)
