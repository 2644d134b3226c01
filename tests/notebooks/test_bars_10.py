"""Learning bars of notebook 10 (individual vs joint training), read from the committed quick run.

Both trained schemes — individual training (a DR and a DME network) and joint training (one
backbone, two heads) — must beat the majority class of the training split on quadratic kappa (DR
and DME, by KAPPA_MARGIN) and on accuracy (joint accuracy, DR and DME accuracy, by
ACCURACY_MARGIN), for every seed. The quick task is the five DR grades at lesion difficulty 0.8.
No training here: the values are the per-seed ones the notebook recorded.
"""
import pytest

from tests.notebooks.conftest import ACCURACY_MARGIN, KAPPA_MARGIN, quick_results

STEM = "10_baseline_cnn_grading"
MAJORITY = "majority class"
TRAINED = ("individual training", "joint training")


@pytest.fixture(scope="module")
def results() -> dict:
    return quick_results(STEM)


def failures(results: dict, metric: str, margin: float) -> list[str]:
    by_config = results[f"test_{metric}"]
    floor = by_config[MAJORITY]
    problems = []
    for config in TRAINED:
        values = by_config[config]
        assert len(values) == len(floor), f"{config}: {len(values)} seeds, the majority class has {len(floor)}"
        problems += [f"{config} seed #{i}: {metric} {value:.3f} < {base:.3f} + {margin}"
                     for i, (value, base) in enumerate(zip(values, floor)) if value < base + margin]
    return problems


def test_quick_grades_five_dr_classes_with_several_seeds(results):
    assert results["n_dr_classes"] == 5, "the quick task is the five ICDR grades (issue 9)"
    assert results["repeats"] >= 3, "the paired interval over seeds needs at least three seeds"
    assert all(len(results["test_joint_acc"][config]) == results["repeats"] for config in TRAINED)


@pytest.mark.parametrize("metric", ["dr_kappa", "dme_kappa"])
def test_every_trained_grader_beats_the_majority_class_on_kappa_for_every_seed(results, metric):
    problems = failures(results, metric, KAPPA_MARGIN)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("metric", ["joint_acc", "dr_acc", "dme_acc"])
def test_every_trained_grader_beats_the_majority_class_on_accuracy_for_every_seed(results, metric):
    problems = failures(results, metric, ACCURACY_MARGIN)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("metric", ["joint_acc", "dr_kappa", "dme_kappa"])
def test_joint_vs_individual_is_reported_as_a_paired_interval(results, metric):
    comparison = results[f"joint_minus_individual_{metric}"]
    assert len(comparison["per_seed"]) == results["repeats"]
    assert comparison["low"] <= comparison["mean"] <= comparison["high"]
