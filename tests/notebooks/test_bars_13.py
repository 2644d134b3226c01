"""Learning bars of notebook 13 (L-Net / SiAN), read from the committed quick run (results/<stem>/quick.json).

The main L-Net (``variants[0]``: SiAN's side branch) must reach a mean pixel F1 of PIXEL_F1_BAR over
the lesions present in the test split with no lesion at 0, on every seed, and its image-level F1
must beat both trivial baselines for every lesion shown by at least MIN_TEST_IMAGES test images;
every other L-Net row (variants, losses) must clearly beat the trivial maps on pixel F1; every
trained DR grader must beat the majority class by KAPPA_MARGIN and ACCURACY_MARGIN on every seed.
"""
import pytest

from tests.notebooks.conftest import ACCURACY_MARGIN, KAPPA_MARGIN, quick_results

STEM = "13_lnet_sian_lesion_segmentation"
#: L-Net bars (issue 9): mean pixel F1 over the lesions present in the test split, and the test
#: images a lesion needs before its image-level F1 must beat both trivial baselines.
PIXEL_F1_BAR = 0.4
MIN_TEST_IMAGES = 20
#: "Clearly beats the trivial maps": mean pixel F1 at least this far above the all-positive map's
#: (the all-negative map scores 0).
ROW_MARGIN = 0.1
#: The rows the learning goals promise in the quick profile (the goals leave -32s, -16s, -4s, -2s,
#: weighted cross-entropy, focal loss and Table 7 to the gpu and full profiles).
PROMISED = {"variants": {"8s"}, "losses": {"dice", "dual"}, "graders": {"plain", "Lesion-Concat", "SiAN"}}


@pytest.fixture(scope="module")
def results():
    return quick_results(STEM)


def _mean(values):
    return sum(values) / len(values)


def test_main_lnet_pixel_f1_clears_the_bar_on_every_seed_and_no_lesion_is_at_zero(results):
    pixel = results["main_lnet_pixel_f1"]  # {lesion: [F1 per seed]}, lesions present in the test split
    assert pixel, "no lesion recorded"
    n_seeds = len(next(iter(pixel.values())))
    assert n_seeds >= 2
    for seed in range(n_seeds):
        assert _mean([values[seed] for values in pixel.values()]) >= PIXEL_F1_BAR, (seed, pixel)
    assert all(min(values) > 0 for values in pixel.values()), pixel


def test_main_lnet_image_f1_beats_both_trivial_baselines_for_common_lesions(results):
    image, counts = results["main_lnet_image_f1"], results["test_images_with_lesion"]
    positive, negative = results["all_positive_image_f1"], results["all_negative_image_f1"]
    common = [lesion for lesion, n in counts.items() if n >= MIN_TEST_IMAGES]
    assert common, counts
    for lesion in common:
        for value in image[lesion]:
            assert value > positive[lesion] and value > negative[lesion], \
                f"{lesion}: image F1 {value} vs all-positive {positive[lesion]}, all-negative {negative[lesion]}"


def test_every_lnet_row_clearly_beats_the_trivial_maps_on_every_seed(results):
    floor = _mean(list(results["all_positive_pixel_f1"].values())) + ROW_MARGIN
    for table in ("variant_pixel_f1", "loss_pixel_f1"):
        for row, values in results[table].items():
            assert len(values) >= 2 and min(values) >= floor, f"{table} {row}: {values} vs floor {floor:.3f}"


def test_every_grader_beats_the_majority_class_on_every_seed(results):
    kappa, accuracy = results["grader_kappa"], results["grader_accuracy"]
    graders = [name for name in kappa if name != "majority"]
    assert PROMISED["graders"] <= set(graders), graders
    for name in graders:
        for metric, table, margin in (("kappa", kappa, KAPPA_MARGIN), ("accuracy", accuracy, ACCURACY_MARGIN)):
            values, floor = table[name], table["majority"]
            assert len(values) == len(floor) >= 2
            assert all(v >= f + margin for v, f in zip(values, floor)), f"{name} {metric}: {values} vs majority {floor}"


def test_every_promised_row_runs_in_quick(results):
    rows = results["rows_run"]
    for table, promised in PROMISED.items():
        assert promised <= set(rows[table]), f"{table}: promised {sorted(promised)}, ran {rows[table]}"


def test_comparisons_are_reported_as_paired_intervals(results):
    main = results["main_lnet"].removeprefix("L-Net-")
    keys = ["dual_minus_dice_pixel_f1"] + [f"{main}_minus_{v}_pixel_f1" for v in PROMISED["variants"] - {main}]
    for key in keys:
        difference, low, high = results[key]
        assert low <= difference <= high, (key, results[key])
