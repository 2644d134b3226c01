"""fundus_lib.stats: the paired t-interval against scipy and a hand computation, the paired bootstrap
on planted and null differences (coverage, pairing, seed resampling, fast path = metric path), kappa
and AUC through scikit-learn, degenerate resamples, bad inputs, and the verdict sentences."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

from fundus_lib import stats

quadratic_kappa = partial(cohen_kappa_score, weights="quadratic")


def _paired_scores(rng: np.random.Generator, effect: float, n_seeds: int = 3, n_images: int = 100,
                   image_sd: float = 1.0, noise_sd: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-image scores of A and B sharing a strong per-image difficulty; A is ``effect`` higher."""
    difficulty = rng.normal(0, image_sd, n_images)
    b = difficulty + rng.normal(0, noise_sd, (n_seeds, n_images))
    a = difficulty + effect + rng.normal(0, noise_sd, (n_seeds, n_images))
    return a, b


# ------------------------------------------------------------------ paired t-interval

def test_paired_t_matches_hand_computation_and_scipy():
    a = np.array([0.71, 0.74, 0.69, 0.75, 0.72])
    b = np.array([0.70, 0.72, 0.69, 0.71, 0.69])
    d = a - b  # 0.01, 0.02, 0.00, 0.04, 0.03
    c = stats.paired_t_interval(d, names=("CANet", "joint"), metric_name="kappa", n_images=100)
    # by hand: mean 0.02, sd sqrt(0.001 / 4) = 0.0158114, se = sd / sqrt(5) = 0.00707107
    assert c.effect == pytest.approx(0.02)
    assert c.se == pytest.approx(0.00707107, rel=1e-5)
    assert c.effect_size == pytest.approx(0.02 / 0.0158114, rel=1e-5)
    half = 2.776445 * 0.00707107  # t quantile 0.975 with 4 degrees of freedom, from a table
    assert (c.low, c.high) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-7)
    assert (c.low, c.high) == pytest.approx(sps.t.interval(0.95, 4, loc=d.mean(), scale=sps.sem(d)))
    assert c.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert (c.method, c.n_seeds, c.level) == ("paired t", 5, 0.95)


def test_paired_t_level_changes_the_quantile():
    d = [0.01, 0.02, 0.00, 0.04, 0.03]
    wide, narrow = stats.paired_t_interval(d, level=0.99), stats.paired_t_interval(d, level=0.80)
    assert (wide.low, wide.high) == pytest.approx(sps.t.interval(0.99, 4, loc=0.02, scale=sps.sem(d)))
    assert narrow.high - narrow.low < wide.high - wide.low


@pytest.mark.parametrize("differences", ([0.03], []))
def test_paired_t_refuses_fewer_than_two_seeds(differences):
    with pytest.raises(ValueError, match=r"at least 2 seeds.*one seed gives no spread.*paired_bootstrap"):
        stats.paired_t_interval(differences)


@pytest.mark.parametrize("differences, message", [
    ([0.02, 0.02, 0.02], r"all equal to 0.02: no spread"),
    ([0.01, np.nan, 0.03], r"differences contains 1 NaN or infinite value\(s\), the first at \(index 1\)"),
    ([[0.01, 0.02]], r"differences must be 1-D"),
])
def test_paired_t_bad_differences(differences, message):
    with pytest.raises(ValueError, match=message):
        stats.paired_t_interval(differences)


# ------------------------------------------------------------------ paired bootstrap: mean over images

def test_bootstrap_finds_a_planted_difference():
    a, b = _paired_scores(np.random.default_rng(0), effect=0.05)
    c = stats.paired_bootstrap(a, b, seed=1)
    assert c.effect == pytest.approx(a.mean() - b.mean())
    assert (c.mean_a, c.mean_b) == pytest.approx((a.mean(), b.mean()))
    assert c.low <= 0.05 <= c.high and c.low > 0
    assert c.shows_difference
    assert (c.method, c.n_seeds, c.n_images, c.n_resamples, c.n_degenerate) == ("bootstrap", 3, 100, 2000, 0)


def test_bootstrap_on_identically_distributed_methods_covers_zero():
    a, b = _paired_scores(np.random.default_rng(2), effect=0.0)
    c = stats.paired_bootstrap(a, b, seed=3)
    assert c.low < 0 < c.high
    assert not c.shows_difference
    assert c.verdict().startswith("No difference shown: ")


def test_bootstrap_is_reproducible_from_its_seed():
    a, b = _paired_scores(np.random.default_rng(4), effect=0.02)
    first, again, other = (stats.paired_bootstrap(a, b, n_resamples=500, seed=s) for s in (7, 7, 8))
    assert (first.low, first.high) == (again.low, again.high)
    assert (first.low, first.high) != (other.low, other.high)


def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time():
    rng, truth, covered = np.random.default_rng(5), 0.05, 0
    for k in range(200):  # crossed seeds x images: seed, image and seed-by-image parts of A - B
        difficulty, seed_shift = rng.normal(0, 1, 100), rng.normal(0, 0.3, (5, 1))
        b = difficulty + seed_shift + rng.normal(0, 0.2, (5, 100))
        a = b + truth + rng.normal(0, 0.02, (5, 1)) + rng.normal(0, 0.1, 100) + rng.normal(0, 0.1, (5, 100))
        c = stats.paired_bootstrap(a, b, n_resamples=1000, seed=k)
        covered += c.low <= truth <= c.high
    assert 0.88 <= covered / 200 <= 0.99


def test_pairing_makes_the_interval_much_narrower_than_unpaired():
    rng = np.random.default_rng(6)
    a, b = _paired_scores(rng, effect=0.05, n_seeds=1, n_images=200)
    assert np.corrcoef(a[0], b[0])[0, 1] > 0.95
    paired = stats.paired_bootstrap(a, b, seed=0)
    # unpaired: A's and B's images resampled independently, as if scored on different test sets
    idx_a, idx_b = rng.integers(0, 200, (2000, 200)), rng.integers(0, 200, (2000, 200))
    unpaired = np.quantile(a[0][idx_a].mean(axis=1) - b[0][idx_b].mean(axis=1), [0.025, 0.975])
    assert paired.high - paired.low < 0.2 * (unpaired[1] - unpaired[0])


def test_bootstrap_resamples_seeds_not_only_images():
    # the difference varies only between seeds: resampling images alone would give a zero-width interval
    a = np.array([[0.0] * 50, [0.2] * 50, [0.4] * 50])
    c = stats.paired_bootstrap(a, np.zeros_like(a), seed=0)
    assert c.effect == pytest.approx(0.2)
    assert c.high - c.low > 0.2


def test_vectorised_path_equals_the_metric_path_on_the_mean():
    a, b = _paired_scores(np.random.default_rng(8), effect=0.03, n_seeds=2, n_images=40)
    fast = stats.paired_bootstrap(a, b, n_resamples=300, seed=9)
    slow = stats.paired_bootstrap(a, b, metric=lambda y, s: float(np.mean(s)), y_true=np.zeros(40),
                                  n_resamples=300, seed=9)
    fields = ("effect", "low", "high", "se")
    assert [getattr(slow, f) for f in fields] == pytest.approx([getattr(fast, f) for f in fields])
    assert slow.metric == "metric" and fast.metric == "mean score"


# ------------------------------------------------------------------ paired bootstrap: kappa and AUC

def test_bootstrap_quadratic_kappa_through_scikit_learn():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 5, 120)
    a, b = (np.where(rng.random((2, 120)) < p_wrong, rng.integers(0, 5, (2, 120)), y) for p_wrong in (0.2, 0.6))
    c = stats.paired_bootstrap(a, b, metric=quadratic_kappa, y_true=y, metric_name="quadratic kappa",
                               names=("CANet", "joint training"), n_resamples=200, seed=0)
    kappa_a = [cohen_kappa_score(y, p, weights="quadratic") for p in a]
    kappa_b = [cohen_kappa_score(y, p, weights="quadratic") for p in b]
    assert (c.mean_a, c.mean_b) == pytest.approx((np.mean(kappa_a), np.mean(kappa_b)))
    assert c.effect == pytest.approx(np.mean(kappa_a) - np.mean(kappa_b))
    assert 0 < c.low < c.effect < c.high
    expected = f"CANet scores {c.effect:.3f} higher quadratic kappa than joint training (95 % CI {c.low:.3f} to"
    assert c.verdict().startswith(expected)


def test_bootstrap_auc_through_scikit_learn_and_seed_metrics():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 150)
    a = y + rng.normal(0, 0.6, (2, 150))
    b = y + rng.normal(0, 1.5, (2, 150))
    c = stats.paired_bootstrap(a, b, metric=roc_auc_score, y_true=y, n_resamples=150, seed=0)
    per_seed = stats.seed_metrics(y, a, roc_auc_score) - stats.seed_metrics(y, b, roc_auc_score)
    assert per_seed == pytest.approx([roc_auc_score(y, a[s]) - roc_auc_score(y, b[s]) for s in range(2)])
    assert c.effect == pytest.approx(per_seed.mean())
    assert c.metric == "roc_auc_score" and c.low > 0


def test_metric_path_pairs_the_images_of_a_and_b():
    # A corrects 10 of B's 40 errors and changes nothing else: on any resample of the same images A is
    # at least as accurate as B, so the paired interval stays above 0 (unpaired draws would not)
    rng = np.random.default_rng(16)
    y = rng.integers(0, 3, 100)
    b = np.where(np.arange(100) < 40, (y + 1) % 3, y)[None, :]
    a = np.where(np.arange(100) < 10, y, b[0])[None, :]
    c = stats.paired_bootstrap(a, b, metric=accuracy_score, y_true=y, n_resamples=200, seed=0)
    assert c.effect == pytest.approx(0.1)
    assert c.low > 0.03


# ------------------------------------------------------------------ degenerate resamples

def _rare_positive() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eight test images with one positive: about (7/8)^8 = 34 % of resamples lack it (AUC undefined)."""
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    rng = np.random.default_rng(12)
    return y, y + rng.normal(0, 0.5, (1, 8)), y + rng.normal(0, 0.5, (1, 8))


def test_degenerate_resamples_are_skipped_counted_and_reported():
    y, a, b = _rare_positive()
    c = stats.paired_bootstrap(a, b, metric=roc_auc_score, y_true=y, n_resamples=400, seed=0,
                               max_degenerate=0.5)
    assert c.n_degenerate / 400 == pytest.approx((7 / 8) ** 8, abs=0.07)  # about 3 binomial sd
    assert np.isfinite([c.low, c.high]).all()
    assert f"; {c.n_degenerate} of 400 resamples skipped (metric undefined))" in c.verdict()


def test_degenerate_resamples_do_not_enter_the_interval():
    def mean_if_both_classes(y: np.ndarray, s: np.ndarray) -> float:
        return float(s.mean()) if len(np.unique(y)) == 2 else float("nan")

    y, _, b = _rare_positive()
    c = stats.paired_bootstrap(b + 1, b, metric=mean_if_both_classes, y_true=y, n_resamples=200, seed=0,
                               max_degenerate=0.5)
    assert c.n_degenerate > 0
    assert (c.low, c.high) == pytest.approx((1.0, 1.0))  # every defined resample differs by exactly 1


def test_too_many_degenerate_resamples_raise():
    y, a, b = _rare_positive()
    with pytest.raises(ValueError, match=r"of 100 resamples are degenerate .* more than max_degenerate = 0.1"):
        stats.paired_bootstrap(a, b, metric=roc_auc_score, y_true=y, n_resamples=100, seed=0)


@pytest.mark.filterwarnings("ignore:Only one class is present")
def test_metric_undefined_on_the_full_test_set_is_an_error_not_a_degenerate_resample():
    y = np.zeros(10, dtype=int)
    a = np.random.default_rng(13).random((2, 10))
    with pytest.raises(ValueError, match=r"undefined .* on the full test set for a seed 0"):
        stats.paired_bootstrap(a, a.copy(), metric=roc_auc_score, y_true=y, n_resamples=10)


# ------------------------------------------------------------------ bad inputs

GOOD = np.zeros((2, 5))


@pytest.mark.parametrize("kwargs, message", [
    (dict(a=np.zeros((2, 5)), b=np.zeros((3, 5))),
     r"a and b must have the same shape \(n_seeds, n_images\).*got a \(2, 5\) and b \(3, 5\)"),
    (dict(a=np.zeros(5), b=np.zeros(5)),
     r"a must have shape \(n_seeds, n_images\).*got shape \(5,\); with one seed pass a\[None, :\]"),
    (dict(a=GOOD, b=np.zeros((2, 5, 3))), r"b must have shape \(n_seeds, n_images\).*got shape \(2, 5, 3\)"),
    (dict(a=np.zeros((2, 0)), b=np.zeros((2, 0))), r"a must have shape .*non-empty; got shape \(2, 0\)"),
    (dict(a=np.array([[0.1, 0.2, np.nan], [np.nan, 0.3, 0.4]]), b=np.zeros((2, 3))),
     r"a contains 2 NaN or infinite value\(s\), the first at \(seed 0, image 2\)"),
    (dict(a=GOOD, b=np.full((2, 5), np.inf)), r"b contains 10 NaN or infinite"),
    (dict(a=GOOD, b=GOOD, metric=roc_auc_score, y_true=np.zeros(4)),
     r"y_true must be 1-D with one label per test image \(n_images = 5.*got shape \(4,\)"),
    (dict(a=GOOD, b=GOOD, metric=roc_auc_score, y_true=np.array([0, 1, np.nan, 1, 0])),
     r"y_true contains 1 NaN .* \(index 2\)"),
    (dict(a=GOOD, b=GOOD, metric=roc_auc_score), r"metric and y_true go together"),
    (dict(a=GOOD, b=GOOD, y_true=np.zeros(5)), r"metric and y_true go together"),
    (dict(a=GOOD, b=GOOD, level=95), r"level must be strictly between 0 and 1.*got 95"),
    (dict(a=GOOD, b=GOOD, n_resamples=0), r"n_resamples must be a positive integer.*got 0"),
    (dict(a=GOOD, b=GOOD, max_degenerate=1.0), r"max_degenerate must be a fraction in \[0, 1\)"),
    (dict(a=np.array([["x", "y"]]), b=np.array([["x", "y"]])), r"a must hold numeric per-image scores"),
])
def test_bootstrap_bad_inputs_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stats.paired_bootstrap(**kwargs)


def test_metric_path_accepts_class_probabilities_with_a_trailing_axis():
    rng = np.random.default_rng(14)
    y = np.tile([0, 1, 2], 20)
    probs = rng.dirichlet(np.ones(3), (2, 60))
    auc = partial(roc_auc_score, multi_class="ovr")
    c = stats.paired_bootstrap(probs, probs[::-1], metric=auc, y_true=y, n_resamples=50, metric_name="AUC")
    assert c.n_images == 60 and c.effect == pytest.approx(0.0)


# ------------------------------------------------------------------ verdicts and tables

def _comparison(effect: float, low: float, high: float, **kw) -> stats.Comparison:
    fields = dict(a="CANet", b="joint training", metric="joint accuracy", effect=effect, low=low, high=high,
                  level=0.95, method="bootstrap", n_seeds=3, n_images=100, n_resamples=2000)
    return stats.Comparison(**{**fields, **kw})


@pytest.mark.parametrize("comparison, sentence", [
    (_comparison(0.031, 0.004, 0.058),
     "CANet scores 0.031 higher joint accuracy than joint training "
     "(95 % CI 0.004 to 0.058; paired bootstrap over 100 test images x 3 seeds)"),
    (_comparison(-0.031, -0.058, -0.004),
     "CANet scores 0.031 lower joint accuracy than joint training "
     "(95 % CI -0.058 to -0.004; paired bootstrap over 100 test images x 3 seeds)"),
    (_comparison(0.015, -0.02, 0.05),
     "No difference shown: CANet scores 0.015 higher joint accuracy than joint training "
     "(95 % CI -0.020 to 0.050 includes 0; paired bootstrap over 100 test images x 3 seeds)"),
    (_comparison(0.01, 0.0, 0.02, n_seeds=1),
     "No difference shown: CANet scores 0.010 higher joint accuracy than joint training "
     "(95 % CI 0.000 to 0.020 includes 0; paired bootstrap over 100 test images x 1 seed)"),
    (_comparison(-0.0001, -0.0004, 0.0003, level=0.9),
     "No difference shown: CANet and joint training score the same joint accuracy to 3 decimals "
     "(90 % CI 0.000 to 0.000 includes 0; paired bootstrap over 100 test images x 3 seeds)"),
    (_comparison(0.02, 0.003, 0.037, method="paired t", n_seeds=5),
     "CANet scores 0.020 higher joint accuracy than joint training "
     "(95 % CI 0.003 to 0.037; paired t-interval over 5 seeds, test set of 100 images held fixed)"),
])
def test_verdict_sentences(comparison, sentence):
    assert comparison.verdict() == sentence
    assert not any(word in sentence for word in ("significant", "better", "worse"))


def test_verdict_digits():
    assert "scores 0.03 higher" in _comparison(0.031, 0.004, 0.058).verdict(digits=2)


def test_compare_table_has_one_row_per_comparison():
    a, b = _paired_scores(np.random.default_rng(15), effect=0.05)
    boot = stats.paired_bootstrap(a, b, names=("dual", "Dice"), metric_name="pixel F1", n_resamples=200)
    t = stats.paired_t_interval(a.mean(axis=1) - b.mean(axis=1), names=("dual", "Dice"), metric_name="pixel F1")
    table = stats.compare_table([boot, t])
    assert list(table["method"]) == ["bootstrap", "paired t"]
    assert list(table["verdict"]) == [boot.verdict(), t.verdict()]
    assert table.loc[0, "effect"] == pytest.approx(boot.effect)
    assert table.loc[1, "p_value"] == pytest.approx(t.p_value) and np.isnan(table.loc[0, "p_value"])
    assert list(stats.compare_table([]).columns) == list(table.columns)


def test_seed_verdict_speaks_for_every_seed_count():
    from fundus_lib.stats import seed_verdict

    assert seed_verdict([0.02], names=("A", "B"), metric_name="acc").startswith("one seed: A minus B is +0.020 acc")
    same = seed_verdict([0.1, 0.1, 0.1], names=("A", "B"), metric_name="acc")
    assert "on every one of 3 seeds" in same and "no t-interval" in same
    d = np.array([0.05, -0.02, 0.01])
    assert seed_verdict(d, names=("A", "B"), metric_name="acc", n_images=10) == \
        stats.paired_t_interval(d, names=("A", "B"), metric_name="acc", n_images=10).verdict()
    with pytest.raises(ValueError, match="finite|NaN"):
        seed_verdict([0.1, float("nan")])
