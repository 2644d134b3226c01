"""Learning bars of notebook 15 (DeepMT-DR), read from the committed quick run (results/<stem>/quick.json)."""
import pytest

from tests.notebooks.conftest import ACCURACY_MARGIN, KAPPA_MARGIN, quick_results

STEM = "15_deepmt_dr_multitask_low_resolution"
GRADING_ROWS = ("LR directly", "bicubic", "SR, stages 1-2", "DeepMT-DR", "no lesion input", "no attention link",
                "no task feedback", "HR (upper bound)")
#: Every paired comparison the notebook reports for grading: the input ladder and each link removed.
GRADING_PAIRS = ("bicubic − LR directly", "SR, stages 1-2 − bicubic", "DeepMT-DR − SR, stages 1-2",
                 "DeepMT-DR − LR directly", "HR (upper bound) − DeepMT-DR", "DeepMT-DR − no lesion input",
                 "DeepMT-DR − no attention link", "DeepMT-DR − no task feedback")


@pytest.fixture(scope="module")
def results():
    return quick_results(STEM)


@pytest.mark.parametrize("metric", ["sr_psnr", "sr_ssim"])
def test_sr_beats_bicubic_on_every_seed(results, metric):
    sr, bicubic = results[metric]["SR net (stage 1)"], results[metric]["bicubic"]
    assert len(sr) == len(bicubic) >= 2
    assert all(s > b for s, b in zip(sr, bicubic)), f"{metric}: SR {sr} vs bicubic {bicubic}"


@pytest.mark.parametrize("config", ["SR input", "HR input", "LR input, U-Net trained on LR"])
def test_segmentation_aupr_beats_the_pixel_prevalence_for_every_lesion_and_seed(results, config):
    aupr, prevalence = results["seg_aupr"][config], results["seg_aupr"]["pixel prevalence"]
    assert set(aupr) == set(prevalence) == {"aupr_MA", "aupr_HE", "aupr_EX", "aupr_SE"}
    for lesion, values in aupr.items():
        assert all(v > p for v, p in zip(values, prevalence[lesion])), \
            f"{config} {lesion}: AUPR {values} vs prevalence {prevalence[lesion]}"


@pytest.mark.parametrize("row", GRADING_ROWS)
def test_every_grader_beats_the_majority_class_on_every_seed(results, row):
    grading = results["grading"]
    majority = grading["majority class"]
    for metric, margin in (("kappa", KAPPA_MARGIN), ("accuracy", ACCURACY_MARGIN)):
        values, floor = grading[row][metric], majority[metric]
        assert len(values) == len(floor) >= 2
        assert all(v >= f + margin for v, f in zip(values, floor)), f"{row} {metric}: {values} vs majority {floor}"


def test_every_comparison_is_reported_as_a_paired_difference_with_its_interval(results):
    for pair in GRADING_PAIRS:
        difference, low, high = results["grading_paired"][pair]
        assert low <= difference <= high, pair
    assert {"SR net (stage 1) − bicubic · psnr", "SR net (stage 1) − bicubic · ssim"} <= set(results["sr_paired"])
    assert any(key.startswith("SR input − LR input") for key in results["seg_paired"])
    assert any(key.startswith("HR input − SR input") for key in results["seg_paired"])
