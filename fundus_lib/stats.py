"""Paired comparisons of two methods scored on the same test images over the same seeds.

Why paired
    Method A (say CANet) and method B (joint training) are trained with the same seeds and
    evaluated on the same test images. Most of the spread in a per-image score comes from the
    images themselves (an image with a faint microaneurysm is hard for every model), and most of
    the spread across seeds comes from shared data order and initialisation. Taking the difference
    A - B image by image and seed by seed cancels what the two methods share, so the interval on
    the difference is much narrower than two separate error bars would suggest — comparing two
    ``mean ± standard error`` bars ignores this and wastes the design.

Why an interval, not a "two-standard-error rule" on two runs
    Two runs give one difference and no estimate of how much that difference would move with
    another seed or another test set; the standard errors printed next to each run describe each
    method alone, not their difference. An interval for the *difference* states the size of the
    effect and how uncertain it is, in the metric's own units. The verdict sentences here are
    generated from the interval alone: "no difference shown" when it includes 0, the direction
    and size otherwise — never "significantly better".

What each method assumes
    :func:`paired_bootstrap` resamples test images (with replacement, the *same* resampled images
    for A and B) and, independently, seeds (seed s of A stays paired with seed s of B). Seeds and
    images are crossed — every seed is scored on every image — and resampling both factors
    (Owen 2007) makes the interval reflect both sources of variation: a new test set drawn from
    the same population, and new training runs. It assumes the test images are exchangeable
    draws from that population, and with very few seeds (2-3) the seed part of the spread is
    estimated roughly. Any metric works — a mean over images (accuracy from 0/1 correctness, a
    per-image Dice) takes a vectorised fast path; metrics that are not means over images
    (quadratic kappa, AUC, F1) are recomputed on each resample.

    :func:`paired_t_interval` takes one difference per seed (the metric of A minus that of B on
    the whole test set) and uses Student's t with n - 1 degrees of freedom. It treats the test set
    as fixed: the interval speaks about retraining on these images, not about new images. It
    assumes the per-seed differences are roughly normal and needs at least two seeds.

References
    - B. Efron and R. J. Tibshirani (1993). *An Introduction to the Bootstrap*. Chapman & Hall.
    - A. B. Owen (2007). The pigeonhole bootstrap. *Annals of Applied Statistics* 1(2), 386-411.
    - X. Bouthillier et al. (2021). Accounting for variance in machine learning benchmarks.
      *Proceedings of Machine Learning and Systems (MLSys)* 3.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

#: ``metric(y_true, y_pred_or_score) -> float``, e.g. ``sklearn.metrics.roc_auc_score``.
Metric = Callable[[np.ndarray, np.ndarray], float]

#: Most resample-by-image-count entries held in memory at once by the vectorised path.
_CHUNK_ENTRIES = 2**22


@dataclass(frozen=True)
class Comparison:
    """The paired comparison of method ``a`` with method ``b`` on one metric.

    ``effect`` is the mean over seeds of metric(A) - metric(B) on the full test set; ``low`` and
    ``high`` bound its ``level`` interval. Fields that a method does not produce are ``None``:
    ``p_value`` and ``effect_size`` (Cohen's d_z) come from the paired t-interval,
    ``n_resamples`` / ``n_degenerate`` from the bootstrap.
    """

    a: str
    b: str
    metric: str
    effect: float
    low: float
    high: float
    level: float
    method: Literal["bootstrap", "paired t"]
    n_seeds: int
    n_images: int | None = None
    mean_a: float | None = None
    mean_b: float | None = None
    se: float | None = None
    p_value: float | None = None
    effect_size: float | None = None
    n_resamples: int | None = None
    n_degenerate: int = 0

    @property
    def shows_difference(self) -> bool:
        """True when the interval excludes 0 (an interval touching 0 includes it)."""
        return self.low > 0 or self.high < 0

    def verdict(self, digits: int = 3) -> str:
        """One plain-English sentence read off the interval, e.g. "CANet scores 0.031 higher
        joint accuracy than joint training (95 % CI 0.004 to 0.058; paired bootstrap over 100 test
        images x 3 seeds)"; prefixed "No difference shown: " when the interval includes 0."""
        size = _fmt(abs(self.effect), digits)
        if float(size) == 0:
            claim = f"{self.a} and {self.b} score the same {self.metric} to {digits} decimals"
        else:
            direction = "higher" if self.effect > 0 else "lower"
            claim = f"{self.a} scores {size} {direction} {self.metric} than {self.b}"
        interval = f"{self.level * 100:g} % CI {_fmt(self.low, digits)} to {_fmt(self.high, digits)}"
        if not self.shows_difference:
            interval += " includes 0"
        prefix = "" if self.shows_difference else "No difference shown: "
        return f"{prefix}{claim} ({interval}; {self._basis()})"

    def _basis(self) -> str:
        """How the interval was obtained, in words, for :meth:`verdict`."""
        seeds = f"{self.n_seeds} seed{'s' if self.n_seeds != 1 else ''}"
        if self.method == "paired t":
            held = f", test set of {self.n_images} images held fixed" if self.n_images else ""
            return f"paired t-interval over {seeds}{held}"
        basis = f"paired bootstrap over {self.n_images} test images x {seeds}"
        if self.n_degenerate:
            basis += f"; {self.n_degenerate} of {self.n_resamples} resamples skipped (metric undefined)"
        return basis

    def as_row(self) -> dict[str, Any]:
        """The fields and the verdict as a flat dict: one row of :func:`compare_table`."""
        return {**dataclasses.asdict(self), "verdict": self.verdict()}


def compare_table(comparisons: Iterable[Comparison]) -> pd.DataFrame:
    """A tidy DataFrame with one row per comparison (columns: the :class:`Comparison` fields and
    ``verdict``), ready to print or save next to a notebook's results."""
    columns = [field.name for field in dataclasses.fields(Comparison)] + ["verdict"]
    return pd.DataFrame([c.as_row() for c in comparisons], columns=columns)


# ------------------------------------------------------------------ paired t-interval over seeds

def paired_t_interval(
    differences: Sequence[float] | np.ndarray,
    *,
    names: tuple[str, str] = ("A", "B"),
    metric_name: str = "score",
    level: float = 0.95,
    n_images: int | None = None,
) -> Comparison:
    """Student-t interval for the mean of per-seed paired differences metric(A) - metric(B).

    Each difference is one seed's metric of A minus that of B on the same test images (see
    :func:`seed_metrics`). Returns the mean difference, its standard error, the ``level`` interval
    from ``scipy.stats.t`` with n - 1 degrees of freedom, the two-sided p-value of "mean
    difference = 0" and Cohen's d_z = mean / sd of the differences. The test set is treated as
    fixed; ``n_images`` only labels the verdict.
    """
    _check_level(level)
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"differences must be 1-D, one paired difference per seed; got shape {d.shape}")
    _check_finite(d, "differences")
    if d.size < 2:
        raise ValueError(
            f"differences has {d.size} value(s); a paired t-interval needs at least 2 seeds, because "
            "one seed gives no spread to estimate the standard error from. With one seed, use "
            "paired_bootstrap over the test images instead.")
    sd = d.std(ddof=1)
    if sd == 0:
        raise ValueError(
            f"differences are all equal to {d[0]:g}: no spread across seeds, so the t-interval is "
            "undefined. The seeds may not change anything; use paired_bootstrap over the test images.")
    df, mean, se = d.size - 1, d.mean(), sd / np.sqrt(d.size)
    low, high = sps.t.interval(level, df, loc=mean, scale=se)
    return Comparison(
        a=names[0], b=names[1], metric=metric_name, effect=float(mean), low=float(low), high=float(high),
        level=level, method="paired t", n_seeds=int(d.size), n_images=n_images, se=float(se),
        p_value=float(2 * sps.t.sf(abs(mean / se), df)), effect_size=float(mean / sd))


def seed_verdict(differences: Sequence[float] | np.ndarray, *, names: tuple[str, str] = ("A", "B"),
                 metric_name: str = "score", level: float = 0.95, n_images: int | None = None) -> str:
    """The verdict sentence of :func:`paired_t_interval` when the seeds allow one, else a plain
    sentence saying why there is no interval (one seed; the same difference on every seed).

    For notebooks, whose small profiles can give either case: they print what the runs support
    instead of stopping.
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim == 1 and d.size == 1:
        return (f"one seed: {names[0]} minus {names[1]} is {d[0]:+.3f} {metric_name}, and one seed gives no "
                "interval (run more seeds)")
    if d.ndim == 1 and d.size > 1 and np.isfinite(d).all() and np.ptp(d) == 0:
        return (f"{names[0]} minus {names[1]} is {d[0]:+.3f} {metric_name} on every one of {d.size} seeds: "
                "no spread across seeds, so no t-interval")
    return paired_t_interval(d, names=names, metric_name=metric_name, level=level, n_images=n_images).verdict()


def seed_metrics(y_true: Sequence[Any] | np.ndarray, predictions: np.ndarray, metric: Metric,
                 name: str = "predictions") -> np.ndarray:
    """``metric(y_true, predictions[s])`` for every seed s: an array of shape (n_seeds,).

    ``predictions`` is shaped (n_seeds, n_images, ...). Differences of two such arrays over the
    same seeds feed :func:`paired_t_interval`. ``name`` labels ``predictions`` in error messages.
    """
    predictions = _as_seed_matrix(predictions, name, min_ndim=2)
    y_true = _check_labels(y_true, predictions.shape[1])
    values = np.array([metric(y_true, p) for p in predictions], dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"metric is undefined (gave {values[bad[0]]}) on the full test set for {name} "
                         f"seed {bad[0]}; check that y_true holds every class the metric needs")
    return values


# ------------------------------------------------------------------ paired bootstrap over images x seeds

def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    metric: Metric | None = None,
    y_true: Sequence[Any] | np.ndarray | None = None,
    names: tuple[str, str] = ("A", "B"),
    metric_name: str | None = None,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    max_degenerate: float = 0.1,
) -> Comparison:
    """Percentile interval for metric(A) - metric(B) by resampling test images and seeds.

    Without ``metric``, ``a`` and ``b`` are per-image scores (0/1 correctness, per-image Dice...)
    shaped (n_seeds, n_images) and the metric is their mean over images: every resample is computed
    at once with NumPy. With ``metric`` and ``y_true`` (n_images labels shared by all seeds), ``a``
    and ``b`` are predictions or scores shaped (n_seeds, n_images, ...) and ``metric(y_true, pred)``
    is recomputed on each resample — for kappa, AUC, F1 and other metrics that are not means over
    images.

    Each resample draws n_images image indices with replacement (the same ones for A and B) and
    n_seeds seed indices with replacement (seed s of A stays paired with seed s of B), and takes
    the mean over the drawn seeds of metric(A) - metric(B) on the drawn images. Resamples on which
    the metric is undefined (NaN or ValueError, e.g. AUC on a one-class resample) are skipped and
    counted in ``n_degenerate``; more than ``max_degenerate`` of ``n_resamples`` raises ValueError.
    """
    _check_level(level)
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer (1000 or more is advisable); "
                         f"got {n_resamples!r}")
    if not 0 <= max_degenerate < 1:
        raise ValueError(f"max_degenerate must be a fraction in [0, 1); got {max_degenerate!r}")
    if (metric is None) != (y_true is None):
        raise ValueError("metric and y_true go together: give both for a metric such as kappa or AUC, "
                         "or neither to compare per-image scores by their mean")
    a = _as_seed_matrix(a, "a", min_ndim=2 if metric is not None else None)
    b = _as_seed_matrix(b, "b", min_ndim=2 if metric is not None else None)
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape (n_seeds, n_images{', ...' if metric else ''}): seed s of a "
            f"paired with seed s of b, the same test images in the same order; got a {a.shape} and b {b.shape}")
    n_seeds, n_images = a.shape[:2]
    rng = np.random.default_rng(seed)
    if metric is None:
        mean_a, mean_b = float(a.mean()), float(b.mean())
        draws, n_degenerate = _mean_resamples(a - b, rng, n_resamples), 0
        metric_name = metric_name or "mean score"
    else:
        y_true = _check_labels(y_true, n_images)
        per_seed_a, per_seed_b = seed_metrics(y_true, a, metric, "a"), seed_metrics(y_true, b, metric, "b")
        mean_a, mean_b = float(per_seed_a.mean()), float(per_seed_b.mean())
        draws = _metric_resamples(a, b, y_true, metric, rng, n_resamples)
        n_degenerate = int(np.isnan(draws).sum())
        _check_degenerate(n_degenerate, n_resamples, max_degenerate)
        draws = draws[~np.isnan(draws)]
        label = getattr(metric, "__name__", "metric")
        metric_name = metric_name or ("metric" if label.startswith("<") else label)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Comparison(
        a=names[0], b=names[1], metric=metric_name, effect=mean_a - mean_b, low=float(low), high=float(high),
        level=level, method="bootstrap", n_seeds=n_seeds, n_images=n_images, mean_a=mean_a, mean_b=mean_b,
        se=float(draws.std(ddof=1)) if draws.size > 1 else None, n_resamples=n_resamples,
        n_degenerate=n_degenerate)


def _resample_indices(rng: np.random.Generator, n_resamples: int, n_seeds: int,
                      n_images: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Seed and image indices drawn with replacement, in chunks of shapes (r, n_seeds) and
    (r, n_images) so that memory stays bounded for large test sets. Both bootstrap paths draw
    through here, so the same ``seed`` gives them the same resamples."""
    chunk = max(1, _CHUNK_ENTRIES // n_images)
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        yield rng.integers(0, n_seeds, (r, n_seeds)), rng.integers(0, n_images, (r, n_images))


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of 0..n-1 occurs in each row of ``indices``: shape (rows, n)."""
    rows = indices.shape[0]
    offsets = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(offsets, minlength=rows * n).reshape(rows, n)


def _mean_resamples(d: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Bootstrap draws of the mean of ``d`` (n_seeds, n_images) with seeds and images resampled:
    with c_s and w_i the times seed s and image i are drawn, a draw is sum c_s d_si w_i / (S N)."""
    n_seeds, n_images = d.shape
    draws = [((_counts(seeds, n_seeds) @ d) * _counts(images, n_images)).sum(axis=1) / (n_seeds * n_images)
             for seeds, images in _resample_indices(rng, n_resamples, n_seeds, n_images)]
    return np.concatenate(draws)


def _metric_resamples(a: np.ndarray, b: np.ndarray, y_true: np.ndarray, metric: Metric,
                      rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Bootstrap draws of mean-over-seeds metric(A) - metric(B), one metric call per distinct drawn
    seed and method; NaN marks a resample on which the metric is undefined."""
    n_seeds, n_images = a.shape[:2]
    draws = []
    with warnings.catch_warnings():  # undefined-metric warnings: such resamples are counted instead
        warnings.simplefilter("ignore")
        for seeds, images in _resample_indices(rng, n_resamples, n_seeds, n_images):
            for seed_row, image_row in zip(seeds, images):
                drawn, times = np.unique(seed_row, return_counts=True)
                y = y_true[image_row]
                try:
                    diff = [metric(y, a[s, image_row]) - metric(y, b[s, image_row]) for s in drawn]
                except ValueError:
                    diff = [np.nan]
                draws.append(np.dot(times, diff) / n_seeds if np.all(np.isfinite(diff)) else np.nan)
    return np.asarray(draws, dtype=float)


# ------------------------------------------------------------------ input checks

def _check_level(level: float) -> None:
    """The interval's coverage must be a probability strictly between 0 and 1 (0.95, not 95)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be strictly between 0 and 1, e.g. 0.95; got {level!r}")


def _check_finite(x: np.ndarray, name: str) -> None:
    """Reject NaN / inf in a numeric array, naming how many and where the first one is."""
    if not np.issubdtype(x.dtype, np.number):
        return
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        where = ", ".join(f"{axis} {i}" for axis, i in zip(("seed", "image", "class"), bad[0])) \
            if x.ndim > 1 else f"index {bad[0][0]}"
        raise ValueError(f"{name} contains {len(bad)} NaN or infinite value(s), the first at ({where}); "
                         "a missing score cannot be compared — drop or re-score that image for every seed")


def _as_seed_matrix(x: Any, name: str, min_ndim: int | None) -> np.ndarray:
    """``x`` as an array shaped (n_seeds, n_images) — or (n_seeds, n_images, ...) when ``min_ndim``
    is given — checked for emptiness and non-finite values."""
    x = np.asarray(x)
    if min_ndim is None and np.issubdtype(x.dtype, np.number):
        x = x.astype(float)
    ok_ndim = x.ndim == 2 if min_ndim is None else x.ndim >= min_ndim
    if not ok_ndim or 0 in x.shape:
        shape = "(n_seeds, n_images)" if min_ndim is None else "(n_seeds, n_images, ...)"
        hint = f"; with one seed pass {name}[None, :]" if x.ndim == 1 else ""
        raise ValueError(f"{name} must have shape {shape}, one row per seed and one column per test image, "
                         f"non-empty; got shape {x.shape}{hint}")
    if min_ndim is None and not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must hold numeric per-image scores; got dtype {x.dtype}")
    _check_finite(x, name)
    return x


def _check_labels(y_true: Any, n_images: int) -> np.ndarray:
    """``y_true`` as a 1-D array with one label per test image."""
    y_true = np.asarray(y_true)
    if y_true.ndim != 1 or len(y_true) != n_images:
        raise ValueError(f"y_true must be 1-D with one label per test image (n_images = {n_images}, "
                         f"axis 1 of the predictions); got shape {y_true.shape}")
    _check_finite(y_true, "y_true")
    return y_true


def _check_degenerate(n_degenerate: int, n_resamples: int, max_degenerate: float) -> None:
    """Refuse an interval built from too few resamples on which the metric is defined."""
    if n_degenerate > max_degenerate * n_resamples:
        raise ValueError(
            f"{n_degenerate} of {n_resamples} resamples are degenerate (the metric is undefined on them, "
            f"e.g. AUC on a resample with one class), more than max_degenerate = {max_degenerate:g}; the "
            "test set is too small or too unbalanced for this metric — use more test images, a metric "
            "defined on every resample, or raise max_degenerate knowingly")


def _fmt(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals, without a minus sign on a value that rounds to zero."""
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text
