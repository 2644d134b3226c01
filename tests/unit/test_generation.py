"""ELLG lesion generation: extraction (Eq. 4), Reinhard colour transfer, shifts, blending (Eq. 5),
label mixing (Eq. 6), grades recomputed from masks, provenance."""
import numpy as np
import pytest

from fundus_lib import generation as gen
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.synthetic import generate


def _smooth_image(seed: int, base: tuple[float, float, float], shape=(48, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 0.08, (shape[0] // 8, shape[1] // 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(np.asarray(base) + noise, 0.05, 0.95)


def test_lesion_mask_normalises_then_thresholds():
    saliency = np.array([[2.0, 4.0], [6.0, 10.0]])  # normalised: 0, 0.25, 0.5, 1
    assert gen.lesion_mask(saliency, 0.4).tolist() == [[False, False], [True, True]]
    assert gen.lesion_mask(saliency, 0.5).tolist() == [[False, False], [False, True]]  # strictly greater
    assert not gen.lesion_mask(np.full((3, 3), 7.0), 0.5).any()
    with pytest.raises(ValueError, match="tau"):
        gen.lesion_mask(saliency, 1.5)


def test_extract_patches_gives_one_patch_per_connected_region():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[3, 3] = True  # diagonal neighbour: same region (8-connectivity)
    mask[7:9, 6:9] = True
    patches = gen.extract_patches(mask)
    assert len(patches) == 2 and sorted(p.sum() for p in patches) == [5, 6]
    assert np.array_equal(np.logical_or.reduce(patches), mask)


def test_lalphabeta_round_trip():
    image = _smooth_image(0, (0.6, 0.35, 0.2))
    assert np.allclose(gen.lalphabeta_to_rgb(gen.rgb_to_lalphabeta(image)), image, atol=1e-6)


def test_reinhard_output_statistics_match_the_target():
    source = _smooth_image(1, (0.7, 0.4, 0.2))
    target = _smooth_image(2, (0.45, 0.3, 0.25))
    fov = np.zeros(source.shape[:2], bool)
    fov[4:44, 4:44] = True
    out = gen.reinhard_transfer(source, target, fov, fov)
    lab_out, lab_target = gen.rgb_to_lalphabeta(out)[fov], gen.rgb_to_lalphabeta(target)[fov]
    assert np.allclose(lab_out.mean(0), lab_target.mean(0), atol=2e-3)
    assert np.allclose(lab_out.std(0), lab_target.std(0), rtol=2e-2)
    assert not np.allclose(gen.rgb_to_lalphabeta(source)[fov].mean(0), lab_target.mean(0), atol=2e-2)


def test_shift_moves_and_zero_fills():
    a = np.arange(16.0).reshape(4, 4)
    assert gen.shift(a, 1, -1).tolist() == [[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]]
    assert np.array_equal(gen.shift(a, 0, 0), a)


def test_place_patches_avoids_overlap_and_respects_the_allowed_region():
    rng = np.random.default_rng(0)
    patches = []
    for y in (2, 5, 8):
        p = np.zeros((30, 30), bool)
        p[y:y + 3, 2:5] = True
        patches.append(p)
    allowed = np.zeros((30, 30), bool)
    allowed[5:25, 5:25] = True
    placements = gen.place_patches(patches, rng, allowed=allowed)
    moved = [gen.shift(p, w.dy, w.dx) for p, w in zip(patches, placements)]
    assert all(not w.overlaps and not w.dropped and 1 <= w.tries <= gen.MAX_TRIES for w in placements)
    assert sum(m.sum() for m in moved) == np.logical_or.reduce(moved).sum()  # no pixel shared
    assert all(allowed[m].all() for m in moved)


def test_place_patches_keeps_the_last_try_when_no_free_place_exists():
    big = np.zeros((10, 10), bool)
    big[:8, :8] = True  # two 8x8 patches cannot both fit in 10x10 without overlapping
    placements = gen.place_patches([big, big.copy()], np.random.default_rng(0), max_tries=20)
    assert not placements[0].overlaps and placements[1].overlaps and placements[1].tries == 20
    nowhere = gen.place_patches([big], np.random.default_rng(0), allowed=np.zeros((10, 10), bool), max_tries=5)
    assert nowhere[0].dropped


def test_blend_is_eq5():
    target = np.full((4, 4, 3), 0.2)
    lesion = np.zeros((4, 4, 3))
    lesion[1, 1] = 0.8
    region = np.zeros((4, 4), bool)
    region[1, 1] = True
    out = gen.blend(target, lesion, region, 0.75)
    assert np.allclose(out[1, 1], 0.75 * 0.8 + 0.25 * 0.2)
    assert np.allclose(np.delete(out.reshape(16, 3), 5, axis=0), 0.2)


def test_mix_label_is_eq6():
    assert gen.mix_label(3, 0, 0.7) == 2                     # 2.1 -> grade 2 with (0.5, 1.5, 2.5, 3.5)
    assert gen.mix_label(4, 0, 0.5) == 2                     # 2.0
    assert gen.mix_label(1, 0, 0.4) == 0                     # 0.4
    assert gen.mix_label(3, 0, 0.7, thresholds=(0.2, 0.4, 0.6, 0.8)) == 4
    with pytest.raises(ValueError, match="r must"):
        gen.mix_label(3, 0, 1.2)


@pytest.fixture(scope="module")
def synthetic():
    return generate(16, size=128, seed=3)


def _grading(row) -> dict:
    return {"fovea": (row.fovea_x, row.fovea_y), "disc": (row.disc_x, row.disc_y), "disc_diameter": row.disc_diameter,
            "severe_ihe_per_quadrant": int(row.severe_ihe_per_quadrant)}


def test_grade_from_masks_reproduces_the_generator_grades(synthetic):
    recomputed = [gen.grade_from_masks(m, **_grading(row)) for m, row in zip(synthetic.masks,
                                                                              synthetic.labels.itertuples())]
    agreement = np.mean(np.array(recomputed) == synthetic.labels["dr_grade"].to_numpy())
    assert agreement >= 0.8, f"grades from masks agree with the generator on {agreement:.0%} only"
    row = next(synthetic.labels.itertuples())
    assert gen.grade_from_masks(np.zeros((len(LESIONS), 128, 128), bool), **_grading(row)) == 0


def test_generate_one_keeps_provenance_and_lets_the_true_masks_travel(synthetic):
    labels = synthetic.labels
    source = int(np.flatnonzero(labels["dr_grade"] >= 2)[0])
    target = int(np.flatnonzero(labels["dr_grade"] == 0)[0])
    images = synthetic.images.astype(np.float64) / 255
    saliency = synthetic.masks[source].any(axis=0).astype(float)  # a perfect saliency map
    fov = images.max(axis=-1) > 0.05
    row = labels.iloc[target]
    out = gen.generate_one(images[source], images[target], saliency, source_id="s", target_id="t",
                           source_label=int(labels.dr_grade[source]), target_label=0, rng=np.random.default_rng(0),
                           source_fov=fov[source], target_fov=fov[target], source_masks=synthetic.masks[source],
                           target_masks=synthetic.masks[target], grading=_grading(row))
    assert gen.TAU_RANGE[0] <= out.tau <= gen.TAU_RANGE[1] and gen.R_RANGE[0] <= out.r <= gen.R_RANGE[1]
    assert out.label == gen.mix_label(out.source_label, 0, out.r)
    assert out.n_patches > 0 and out.lesion_region.any()
    assert np.array_equal(out.image[~out.lesion_region], images[target][~out.lesion_region])
    assert (out.masks >= synthetic.masks[target]).all()            # the target's own lesions stay
    assert out.masks.sum() > synthetic.masks[target].sum()          # pasted lesions arrive with their masks
    assert out.masks.any(axis=0)[~out.lesion_region].sum() == synthetic.masks[target].any(axis=0)[~out.lesion_region].sum()
    assert out.true_grade is not None and out.true_grade >= 1
    prov = out.provenance()
    assert {"source", "target", "r", "tau", "mixed_label", "true_grade"} <= set(prov) and prov["source"] == "s"


def test_generate_one_rejects_mismatched_images():
    with pytest.raises(ValueError, match="same shape"):
        gen.generate_one(np.zeros((8, 8, 3)), np.zeros((9, 9, 3)), np.zeros((8, 8)), source_id="a", target_id="b",
                         source_label=2, target_label=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="float RGB"):
        gen.reinhard_transfer(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3)))


def test_choose_pairs_uses_correctly_classified_images_only():
    labels = np.array([0, 0, 1, 2, 3, 0, 4])
    predicted = np.array([0, 1, 1, 2, 2, 0, 4])  # image 1 (grade 0) and 4 (grade 3) are wrong
    pairs = gen.choose_pairs(predicted, labels, 50, np.random.default_rng(0))
    assert len(pairs) == 50
    assert {s for s, _ in pairs} <= {2, 3, 6} and {t for _, t in pairs} <= {0, 5}
    assert gen.choose_pairs(predicted, labels, 5, np.random.default_rng(0), target_grades=(3,)) == []
    with pytest.raises(ValueError, match="same length"):
        gen.choose_pairs(predicted[:3], labels, 5, np.random.default_rng(0))
