"""Learning bars of notebook 11 (CANet), read from the committed quick run (no training here).

Every trained grader — CANet and every row of the ablation (Tables IV and V, the λ sweep, the
authors' gate) — must beat the majority class of the training split on quadratic kappa (DR and
DME, by KAPPA_MARGIN) and on joint accuracy (by ACCURACY_MARGIN), for every seed.
"""
import pytest

from tests.notebooks.conftest import ACCURACY_MARGIN, KAPPA_MARGIN, quick_results

STEM = "11_canet_cross_disease_attention"
MAJORITY = "majority class"
#: The rows the notebook's learning goals promise in the quick profile (the λ sweep: at least two values).
#: (The two complex joint baselines are trained in smoke, gpu and full; the goals say so.)
PROMISED = ("Joint training", "CANet (d-S only)",
            "CANet (d-S; d-D DR⇒DME)", "CANet (d-S; d-D DR⇐DME)", "CANet (final, λ=0.25)",
            "CANet (final, λ=0.25), authors' gate σ(2·MLP)", "Multi-task net (Chen et al.)", "MTMR-Net (Liu et al.)")


@pytest.fixture(scope="module")
def results() -> dict:
    return quick_results(STEM)


def trained_rows(results: dict, metric: str) -> dict:
    return {row: values for row, values in results[f"{metric}_by_row"].items() if row != MAJORITY}


def test_every_promised_row_ran_with_at_least_two_seeds(results):
    rows = results["joint_acc_by_row"]
    missing = [row for row in PROMISED if row not in rows]
    assert not missing, f"rows promised by the learning goals but not run in quick: {missing}"
    assert sum(row.startswith("CANet (λ=") for row in rows) >= 2, "the λ sweep ran fewer than two other values"
    assert all(len(values) >= 2 for values in rows.values()), "every row needs at least two seeds"


@pytest.mark.parametrize("metric", ["dr_kappa", "dme_kappa"])
def test_every_row_beats_the_majority_class_on_kappa_for_every_seed(results, metric):
    floor = results[f"{metric}_by_row"][MAJORITY]
    failures = [f"{row} seed #{i}: {value:.3f} < {base:.3f} + {KAPPA_MARGIN}"
                for row, values in trained_rows(results, metric).items()
                for i, (value, base) in enumerate(zip(values, floor)) if value < base + KAPPA_MARGIN]
    assert not failures, "\n".join(failures)


def test_every_row_beats_the_majority_class_on_joint_accuracy_for_every_seed(results):
    floor = results["joint_acc_by_row"][MAJORITY]
    failures = [f"{row} seed #{i}: {value:.3f} < {base:.3f} + {ACCURACY_MARGIN}"
                for row, values in trained_rows(results, "joint_acc").items()
                for i, (value, base) in enumerate(zip(values, floor)) if value < base + ACCURACY_MARGIN]
    assert not failures, "\n".join(failures)


def test_the_pitfall_is_measured_with_the_authors_fifty_candidates(results):
    bound = results["luckiest_draw_points"]
    authors = [value for name, value in bound.items() if "every 20th of 1000" in name]
    assert authors and authors[0] > 0, "the binomial bound for the authors' 50 candidates is missing"
    assert all(value >= 0 for value in results["test_selection_optimism_points"].values())
