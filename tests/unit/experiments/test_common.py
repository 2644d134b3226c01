"""The shared experiment helpers: tidy frames, summaries, paired verdicts, the majority baseline."""
import numpy as np
import pandas as pd
import pytest
import torch.nn as nn
from sklearn.metrics import accuracy_score, cohen_kappa_score

from fundus_lib.config import resolve
from fundus_lib.experiments import common
from fundus_lib.stats import paired_t_interval


def grid() -> pd.DataFrame:
    scores = {"A": {0: 0.70, 1: 0.74, 2: 0.71}, "B": {0: 0.60, 1: 0.66, 2: 0.62}}
    return common.run_grid({name: (lambda seed, s=s: {"kappa": s[seed], "accuracy": s[seed] / 2})
                            for name, s in scores.items()}, seeds=[0, 1, 2])


def test_run_grid_is_tidy_one_row_per_config_seed_metric():
    frame = grid()
    assert list(frame.columns) == list(common.COLUMNS)
    assert len(frame) == 2 * 3 * 2
    assert frame.query("config == 'B' and seed == 1 and metric == 'kappa'")["value"].item() == pytest.approx(0.66)


def test_summary_prints_mean_and_sample_sd():
    table = common.summary(grid(), ["kappa"])
    values = np.array([0.70, 0.74, 0.71])
    assert table.at["A", "kappa"] == f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
    assert table.at["A", "seeds"] == 3


def test_one_seed_summary_is_the_value_alone():
    frame = common.run_seeds(lambda seed: {"kappa": 0.5}, config="A", seeds=[4])
    assert common.summary(frame).at["A", "kappa"] == "0.500"


def test_paired_uses_per_seed_differences_and_the_t_interval():
    frame = grid()
    d = np.array([0.10, 0.08, 0.09])
    expected = paired_t_interval(d, names=("A", "B"), metric_name="kappa")
    row = common.paired_table(frame, "kappa", [("A", "B")]).iloc[0]
    assert row["difference"] == pytest.approx(d.mean())
    assert (row["low"], row["high"]) == pytest.approx((expected.low, expected.high))
    assert common.paired(frame, "kappa", "A", "B") == expected.verdict()


def test_paired_table_has_no_interval_for_one_seed():
    frame = pd.concat([common.run_seeds(lambda s: {"kappa": 0.5}, config=c, seeds=[0]) for c in "AB"])
    row = common.paired_table(frame, "kappa", [("A", "B")]).iloc[0]
    assert np.isnan(row["low"]) and "one seed" in row["verdict"]


def test_by_config_gives_values_per_seed():
    assert common.by_config(grid(), "kappa") == {"A": [0.70, 0.74, 0.71], "B": [0.60, 0.66, 0.62]}
    assert common.by_config(grid())["B"]["accuracy"] == pytest.approx([0.30, 0.33, 0.31])


def test_bad_results_are_named():
    with pytest.raises(ValueError, match="'kappa' of config 'A' seed 0"):
        common.run_seeds(lambda seed: {"kappa": float("nan")}, config="A", seeds=[0])
    with pytest.raises(TypeError, match="seed 0 returned"):
        common.run_seeds(lambda seed: None, config="A", seeds=[0])
    with pytest.raises(KeyError, match="'auc' is not in the results"):
        common.wide(grid(), "auc")
    with pytest.raises(KeyError, match="'C' has no 'kappa'"):
        common.paired(grid(), "kappa", "A", "C")


def test_majority_baseline_matches_sklearn():
    train, test = np.array([0, 0, 1, 2, 0, 3]), np.array([0, 1, 2, 4, 0, 0, 3])
    predicted = common.majority_predictions(train, test.size)
    assert (predicted == 0).all()
    scores = common.majority_scores(train, test)
    assert scores["accuracy"] == pytest.approx(accuracy_score(test, predicted))
    assert scores["kappa"] == pytest.approx(cohen_kappa_score(test, predicted, weights="quadratic")) == 0.0


def test_paper_vs_ours_labels_both_sources():
    paper = pd.DataFrame({"kappa": [0.75, 0.70]}, index=["A", "Paper-only"])
    table = common.paper_vs_ours(paper, grid(), paper_label="Messidor", data_label="synthetic benchmark")
    assert list(table.columns) == ["kappa · paper (Messidor)", "kappa · ours (synthetic benchmark)"]
    assert table.at["Paper-only", "kappa · ours (synthetic benchmark)"] == "—"
    assert table.at["B", "kappa · paper (Messidor)"] == "—"


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    assert common.count_parameters(model) == 8 + 3
    assert common.count_parameters(model, trainable_only=True) == 8 + 3 - 6


def test_seeds_follow_seed_and_repeats():
    cfg = resolve({"profile": "quick", "seed": 5, "repeats": 3}, notebook="11_canet_cross_disease_attention")
    assert common.seeds_for(cfg) == [5, 6, 7]


def test_map_seeds_runs_side_by_side_in_seed_order_and_raises_a_workers_error():
    from functools import partial

    power = partial(pow, 2)  # builtins pickle: a spawned worker can run them
    assert common.map_seeds(power, [3, 1, 2], workers=2) == [8, 2, 4] == common.map_seeds(power, [3, 1, 2])
    with pytest.raises(ZeroDivisionError):
        common.map_seeds(partial(divmod, 1), [1, 0], workers=2)
    with pytest.raises(ValueError, match="seed_workers"):
        common.map_seeds(power, [0], workers=0)
