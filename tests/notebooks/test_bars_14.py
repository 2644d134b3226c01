"""Learning bars of notebook 14 (ELLG), read from the committed quick run (results/<stem>/quick.json).

- The o_O baseline, and the models after the ELLG rounds and the control rounds, beat the majority
  class of the training split on quadratic kappa (by KAPPA_MARGIN) and accuracy (by ACCURACY_MARGIN)
  for every seed.
- GMSM and Grad-CAM++ are scored against the true lesion masks (pointing game and AUC) with 95 %
  intervals, next to a random-map baseline; at least one of them is clearly above it (the interval
  of its paired difference from the random map lies above 0).
- ELLG vs the baseline is reported as a paired kappa difference with a 95 % interval, whatever it shows.
"""
import pytest

from tests.notebooks.conftest import ACCURACY_MARGIN, KAPPA_MARGIN, quick_results

STEM = "14_ellg_lesion_learning_and_generation"
SALIENCY = {"GMSM": "saliency_GMSM", "Grad-CAM++": "saliency_Grad-CAM++"}


@pytest.fixture(scope="module")
def results() -> dict:
    return quick_results(STEM)


def test_the_baseline_beats_the_majority_class_on_every_seed(results):
    kappa, accuracy = results["baseline_kappa_by_seed"], results["baseline_accuracy_by_seed"]
    assert len(kappa) == len(accuracy) >= 2, "the bars need at least two seeds"
    assert all(k >= results["majority_kappa"] + KAPPA_MARGIN for k in kappa), (kappa, results["majority_kappa"])
    assert all(a >= results["majority_accuracy"] + ACCURACY_MARGIN for a in accuracy), \
        (accuracy, results["majority_accuracy"])


def test_the_models_after_the_rounds_beat_the_majority_class_on_every_seed(results):
    for metric, floor, margin in (("kappa", results["majority_kappa"], KAPPA_MARGIN),
                                  ("accuracy", results["majority_accuracy"], ACCURACY_MARGIN)):
        table = results[f"rounds_{metric}_by_seed"]
        assert {"ELLG", "o_O + original-only rounds"} <= set(table), sorted(table)
        failures = [f"{name}: {v:.3f} < {floor:.3f} + {margin}" for name, values in table.items()
                    for v in values if v < floor + margin]
        assert not failures, "\n".join(failures)


@pytest.mark.parametrize("metric", ["pointing_game", "auc"])
def test_gmsm_and_gradcampp_are_scored_with_intervals_beside_a_random_map(results, metric):
    for name, prefix in SALIENCY.items():
        entry = results[f"{prefix}_{metric}"]
        assert entry["low"] <= entry["mean"] <= entry["high"], (name, entry)
        assert entry["diff_low"] <= entry["diff_high"] and 0 <= entry["random"] <= 1, (name, entry)


def test_a_saliency_method_is_clearly_above_the_random_map(results):
    clear = [f"{name} {metric}" for name, prefix in SALIENCY.items() for metric in ("pointing_game", "auc")
             if results[f"{prefix}_{metric}"]["diff_low"] > 0]
    assert clear, "neither GMSM nor Grad-CAM++ is clearly above the random map on pointing game or AUC"


def test_ellg_vs_baseline_kappa_is_a_paired_difference_with_an_interval(results):
    entry = results["kappa_ellg_minus_baseline"]
    assert entry["seeds"] >= 2 and entry["low"] <= entry["difference"] <= entry["high"], entry
