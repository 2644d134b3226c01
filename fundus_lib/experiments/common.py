"""What every paper's experiments share: seeded runs, tidy results, summaries, paired verdicts.

A paper table is a set of *configurations* (rows such as "CANet", "joint training") each trained
and scored over the same *seeds* on the same test images. Every experiment function in this
package returns its results as a **tidy frame** — one row per configuration x seed x metric,
columns ``config``, ``seed``, ``metric``, ``value`` — because that one shape serves every later
step: :func:`summary` prints ``mean ± sd`` per row of the paper's table, :func:`wide` gives one
column per configuration for plots, :func:`paired` turns two configurations into a paired
t-interval over seeds (the comparison the course reports, see :mod:`fundus_lib.stats`), and
:func:`by_config` is what a notebook hands to :func:`fundus_lib.nbtools.record`.
:func:`map_seeds` trains the seeds of a table side by side in worker processes (``seed_workers``).

The trivial baseline every trained grader must beat is the majority class of the *training*
split (:func:`majority_predictions`): it scores quadratic kappa 0 and the accuracy of the most
frequent grade, the floor a model that learned nothing reaches.
"""
from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from fundus_lib.config import RunConfig
from fundus_lib.metrics import accuracy, quadratic_weighted_kappa
from fundus_lib.stats import paired_t_interval, seed_verdict

#: The columns of a tidy results frame, in order.
COLUMNS: tuple[str, ...] = ("config", "seed", "metric", "value")

#: One training run: seed -> {metric name: value}.
Run = Callable[[int], Mapping[str, float]]


def seeds_for(cfg: RunConfig) -> list[int]:
    """The seeds of a run: ``cfg.seed``, ``cfg.seed + 1``, ... (``cfg.repeats`` of them; one when the
    notebook declares no ``repeats``). Every configuration of a table uses the same list, which is
    what makes the comparisons paired."""
    repeats = cfg.values.get("repeats") or 1
    return [int(cfg.seed) + i for i in range(int(repeats))]


T = TypeVar("T")


def seed_workers(cfg: RunConfig) -> int:
    """``cfg.seed_workers`` (processes that train the seeds side by side), 1 when the notebook declares none."""
    return int(cfg.values.get("seed_workers") or 1)


def map_seeds(fn: Callable[[int], T], seeds: Sequence[int], workers: int = 1) -> list[T]:
    """``[fn(seed) for seed in seeds]``, computed in up to ``workers`` processes side by side.

    Why: the networks of a CPU profile are small, and two of them trained side by side on one core
    each finish sooner than one after the other on two cores (PyTorch splits a small convolution
    badly between threads). Each worker is a *spawned* interpreter (nothing of this one is
    inherited, so ``fn`` must pickle: a module-level function or a ``functools.partial`` of one, with
    picklable arguments, and so must its results) whose PyTorch uses ``cpu_count // workers``
    threads. Every run seeds itself, so the results equal a sequential run's; they come back in the
    order of ``seeds``, and an error in a worker is raised here. The workers are started once and
    reused by later calls. ``workers`` <= 1, or one seed: in this process, one seed after the other.
    """
    seeds = [int(seed) for seed in seeds]
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"seed_workers must be a positive int, got {workers!r}")
    workers = min(workers, len(seeds))
    if workers <= 1:
        return [fn(seed) for seed in seeds]
    pool = _worker_pool(workers, max(1, (os.cpu_count() or 1) // workers))
    try:
        return list(pool.map(fn, seeds))
    except BrokenProcessPool:  # a worker died (e.g. out of memory): the next call starts a fresh pool
        _worker_pool.cache_clear()
        raise


@functools.lru_cache(maxsize=None)
def _worker_pool(workers: int, threads: int) -> ProcessPoolExecutor:
    """One pool per size, kept for the session: spawning interpreters and importing PyTorch takes seconds."""
    return ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(threads,))


def _start_worker(threads: int) -> None:
    """A worker's PyTorch threads; Ctrl-C (or a kernel shutting down) is the notebook's to handle, not the workers'."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


def tidy(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """A tidy frame from records holding at least ``config``, ``seed``, ``metric`` and ``value``
    (extra keys become extra columns after those four). Values must be finite numbers."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"tidy(): every row needs the keys {list(COLUMNS)}; missing {missing}")
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = frame[~np.isfinite(values.to_numpy(dtype=float))]
    if not bad.empty:
        first = bad.iloc[0]
        raise ValueError(f"tidy(): metric {first['metric']!r} of config {first['config']!r} seed {first['seed']} "
                         f"is {first['value']!r}; expected a finite number")
    frame["value"] = values.astype(float)
    frame["seed"] = frame["seed"].astype(int)
    extra = [c for c in frame.columns if c not in COLUMNS]
    return frame[list(COLUMNS) + extra].reset_index(drop=True)


def run_seeds(run: Run, *, config: str, seeds: Sequence[int]) -> pd.DataFrame:
    """Call ``run(seed)`` for every seed and collect its metrics under the name ``config``."""
    if not seeds:
        raise ValueError(f"run_seeds({config!r}): seeds is empty; give at least one seed")
    rows = []
    for seed in seeds:
        metrics = run(int(seed))
        if not isinstance(metrics, Mapping) or not metrics:
            raise TypeError(f"run_seeds({config!r}): the run for seed {seed} returned {type(metrics).__name__}; "
                            "expected a non-empty {metric name: value} mapping")
        rows += [{"config": config, "seed": int(seed), "metric": name, "value": value} for name, value in metrics.items()]
    return tidy(rows)


def run_grid(runs: Mapping[str, Run], seeds: Sequence[int]) -> pd.DataFrame:
    """Every configuration of ``runs`` ({name: run}) over the same ``seeds``: one tidy frame."""
    if not runs:
        raise ValueError("run_grid(): no configurations given")
    return pd.concat([run_seeds(run, config=name, seeds=seeds) for name, run in runs.items()], ignore_index=True)


def _check_metric(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = frame[frame["metric"] == metric]
    if rows.empty:
        raise KeyError(f"metric {metric!r} is not in the results; recorded metrics: {sorted(frame['metric'].unique())}")
    return rows


def wide(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric as a seed x configuration table (configurations in the order they were run)."""
    rows = _check_metric(frame, metric)
    order = list(dict.fromkeys(rows["config"]))
    return rows.pivot_table(index="seed", columns="config", values="value", aggfunc="mean")[order]


def summary(frame: pd.DataFrame, metrics: Sequence[str] | None = None, digits: int = 3) -> pd.DataFrame:
    """Configuration x metric table of ``mean ± sd`` over seeds (sd with n - 1; just the mean for
    one seed), plus a ``seeds`` column: the table a paper prints, measured here."""
    metrics = list(dict.fromkeys(frame["metric"])) if metrics is None else list(metrics)
    order = list(dict.fromkeys(frame["config"]))
    table = pd.DataFrame(index=pd.Index(order, name="config"))
    for metric in metrics:
        grouped = _check_metric(frame, metric).groupby("config", sort=False)["value"]
        mean, sd, n = grouped.mean(), grouped.std(ddof=1), grouped.count()
        table[metric] = [_mean_sd(mean.get(c), sd.get(c), n.get(c, 0), digits) for c in order]
    table["seeds"] = frame.groupby("config", sort=False)["seed"].nunique().reindex(order).to_numpy()
    return table


def _mean_sd(mean: float | None, sd: float | None, n: int, digits: int) -> str:
    if not n:
        return "—"
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def differences(frame: pd.DataFrame, metric: str, a: str, b: str) -> pd.Series:
    """Per-seed paired differences metric(a) - metric(b) over the seeds both configurations ran."""
    table = wide(frame, metric)
    for name in (a, b):
        if name not in table.columns:
            raise KeyError(f"configuration {name!r} has no {metric!r} results; configurations: {list(table.columns)}")
    return (table[a] - table[b]).dropna()


def paired(frame: pd.DataFrame, metric: str, a: str, b: str, *, metric_name: str | None = None,
           n_images: int | None = None) -> str:
    """The verdict sentence for ``a`` vs ``b`` on ``metric``: a 95 % paired t-interval over seeds when
    the seeds allow one, else a sentence saying why not (see :func:`fundus_lib.stats.seed_verdict`)."""
    d = differences(frame, metric, a, b)
    return seed_verdict(d.to_numpy(), names=(a, b), metric_name=metric_name or metric, n_images=n_images)


def paired_table(frame: pd.DataFrame, metric: str, pairs: Sequence[tuple[str, str]], *,
                 level: float = 0.95, n_images: int | None = None) -> pd.DataFrame:
    """One row per (a, b) pair: mean difference a - b over seeds, its ``level`` interval (NaN when the
    seeds allow none: one seed, or the same difference on every seed) and the verdict sentence."""
    rows = []
    for a, b in pairs:
        d = differences(frame, metric, a, b).to_numpy()
        low = high = float("nan")
        if d.size >= 2 and np.ptp(d) > 0:
            interval = paired_t_interval(d, names=(a, b), metric_name=metric, level=level, n_images=n_images)
            low, high = interval.low, interval.high
        rows.append({"a": a, "b": b, "metric": metric, "difference": float(d.mean()), "low": low, "high": high,
                     "seeds": int(d.size),
                     "verdict": seed_verdict(d, names=(a, b), metric_name=metric, level=level, n_images=n_images)})
    return pd.DataFrame(rows)


def by_config(frame: pd.DataFrame, metric: str | None = None) -> dict[str, Any]:
    """Results as plain dicts for :func:`fundus_lib.nbtools.record`: ``{config: {metric: [value per
    seed]}}``, or ``{config: [value per seed]}`` for one ``metric`` (seeds in ascending order)."""
    if metric is not None:
        table = wide(frame, metric)
        return {c: [float(v) for v in table[c].dropna()] for c in table.columns}
    return {config: {m: [float(v) for v in rows.sort_values("seed")["value"]]
                     for m, rows in group.groupby("metric", sort=False)}
            for config, group in frame.groupby("config", sort=False)}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def paper_vs_ours(paper: pd.DataFrame, ours: pd.DataFrame, *, paper_label: str, data_label: str,
                  digits: int = 3) -> pd.DataFrame:
    """A paper's table beside the measured one, every column labelled with where it comes from.

    ``paper`` is indexed by configuration with one column per metric (the paper's numbers, in the
    paper's units); ``ours`` is a tidy frame. Columns come in pairs, ``<metric> · paper
    (<paper_label>)`` and ``<metric> · ours (<data_label>)``; a configuration one side lacks shows
    "—". The measured numbers are on ``data_label``: never a reproduction of the paper's table
    unless that is the paper's dataset and protocol.
    """
    metrics = [m for m in paper.columns if m in set(ours["metric"])]
    if not metrics:
        raise ValueError(f"paper_vs_ours(): no metric in common; paper has {list(paper.columns)}, "
                         f"ours has {sorted(set(ours['metric']))}")
    measured = summary(ours, metrics, digits)
    configs = list(dict.fromkeys(list(paper.index) + list(measured.index)))
    table = pd.DataFrame(index=pd.Index(configs, name="config"))
    for metric in metrics:
        table[f"{metric} · paper ({paper_label})"] = [
            "—" if c not in paper.index or pd.isna(paper.at[c, metric]) else f"{paper.at[c, metric]:g}" for c in configs]
        table[f"{metric} · ours ({data_label})"] = [measured.at[c, metric] if c in measured.index else "—"
                                                    for c in configs]
    return table


def majority_class(train_labels: Sequence[int] | np.ndarray) -> int:
    """The most frequent label of the training split (the smallest label on ties)."""
    labels = np.asarray(train_labels)
    if labels.size == 0:
        raise ValueError("majority_class(): the training labels are empty")
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])


def majority_predictions(train_labels: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """``n`` predictions of the training split's majority class: the trivial baseline."""
    return np.full(int(n), majority_class(train_labels), dtype=np.int64)


def majority_scores(train_labels: Sequence[int] | np.ndarray, test_labels: Sequence[int] | np.ndarray,
                    n_classes: int | None = None) -> dict[str, float]:
    """Accuracy and quadratic kappa of the majority-class baseline on the test labels (kappa is 0
    whenever the test labels vary: a constant prediction agrees no better than chance)."""
    test = np.asarray(test_labels)
    predicted = majority_predictions(train_labels, test.size)
    kappa = quadratic_weighted_kappa(test, predicted, n_classes)
    return {"accuracy": accuracy(test, predicted), "kappa": 0.0 if np.isnan(kappa) else kappa}


__all__ = ["COLUMNS", "Run", "seeds_for", "tidy", "run_seeds", "run_grid", "wide", "summary", "differences",
           "paired", "paired_table", "by_config", "count_parameters", "paper_vs_ours", "majority_class",
           "majority_predictions", "majority_scores"]
