"""Notebook 10's experiment: the baselines of CANet's Table IV, individual vs joint training.

CANet (Li et al., IEEE TMI 2020, Table IV) compares its attention modules with two baselines:

* **individual training** — two networks, each a backbone + global average pooling + one linear
  head: one for DR, one for DME. Their test predictions are paired image by image (DR from one,
  DME from the other) to score joint accuracy;
* **joint training** — one backbone, two linear heads on the same pooled feature: CANet's loss
  with :math:`\\lambda = 0` and no attention.

:func:`individual_vs_joint` trains both over the seeds it is given (same data order and
initialisation seed per seed, same test images) and returns a tidy frame (see
:mod:`fundus_lib.experiments.common`) with a third configuration, the **majority class** of the
training split, the trivial grader every trained one must beat. The DR task is the five ICDR
grades (``n_dr_classes=5``) or referable DR (``n_dr_classes=2``, CANet's Messidor binarisation).

Model selection looks at the validation split only (lowest validation loss); the test split is
scored once per trained network.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_lib import metrics
from fundus_lib.config import RunConfig
from fundus_lib.data.pipeline import make_loaders
from fundus_lib.experiments.common import count_parameters, majority_predictions, majority_scores, run_grid
from fundus_lib.models import build_model
from fundus_lib.train import fit, predict

#: Configuration names of the table (rows of CANet's Table IV, plus the trivial baseline).
INDIVIDUAL, JOINT, MAJORITY = "individual training", "joint training", "majority class"

#: Test metrics of every configuration: per task accuracy, ROC AUC (one-vs-rest, averaged over the
#: grades present in the test split: :func:`present_class_auc`) and quadratic kappa; ``joint_acc``
#: (both grades right) when DME is graded too.
TASK_METRICS: tuple[str, ...] = ("acc", "auc", "kappa")

#: Number of DME grades (Messidor / IDRiD risk 0-2).
N_DME_CLASSES = 3


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    if not tasks or tasks[0] != "dr" or not set(tasks) <= {"dr", "dme"}:
        raise ValueError(f"tasks must be ('dr',) or ('dr', 'dme'), got {tasks!r}")
    return tasks


def _check_n_dr(n_dr_classes: int) -> int:
    if n_dr_classes not in (2, 5):
        raise ValueError(f"n_dr_classes must be 2 (referable DR) or 5 (ICDR grades), got {n_dr_classes!r}")
    return int(n_dr_classes)


def dr_labels(grades: metrics.ArrayLike, n_dr_classes: int) -> np.ndarray:
    """The DR label a network learns: referable (grade >= 2) for 2 classes, the ICDR grade for 5."""
    if _check_n_dr(n_dr_classes) == 2:
        return metrics.referable(grades)
    return metrics.as_numpy(grades, "DR grades").astype(np.int64)


def task_labels(batch: Mapping[str, metrics.ArrayLike], task: str, n_dr_classes: int) -> np.ndarray:
    """Class labels of ``task`` ("dr" or "dme") from a batch or targets dict, as a NumPy array."""
    if task == "dr":
        return dr_labels(batch["dr"], n_dr_classes)
    if task == "dme":
        return metrics.as_numpy(batch["dme"], "DME grades").astype(np.int64)
    raise ValueError(f"task must be 'dr' or 'dme', got {task!r}")


class GradingLoss:
    """Sum over the predicted tasks of the cross-entropy; ``(total, parts)`` for :func:`fit`'s log.

    For a joint network this is CANet's loss with :math:`\\lambda = 0` and no auxiliary heads."""

    def __init__(self, n_dr_classes: int):
        self.n_dr_classes = _check_n_dr(n_dr_classes)

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]):
        parts = {task: F.cross_entropy(logits, torch.as_tensor(task_labels(batch, task, self.n_dr_classes),
                                                               device=logits.device))
                 for task, logits in outputs.items()}
        return sum(parts.values()), {task: value.detach() for task, value in parts.items()}


def grading_scores(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                   n_dr_classes: int) -> dict[str, float]:
    """``{"dr_acc": ..., "dr_kappa": ..., "joint_acc": ...}`` of logits against a targets dict,
    for the tasks ``outputs`` predicts (the validation metrics :func:`fit` logs, and the test scores)."""
    tasks = [task for task in ("dr", "dme") if task in outputs]
    return metrics.grading_scores({t: outputs[t] for t in tasks},
                                  {t: task_labels(targets, t, n_dr_classes) for t in tasks})


def make_model(cfg: RunConfig, kind: str, backbone: str | None = None) -> nn.Module:
    """``kind`` "dr" / "dme": an individual network for one task; "joint": shared backbone, two heads.
    Backbone and initialisation from ``cfg`` (``backbone`` overrides the backbone, for counting)."""
    weights = None if cfg.weights in (None, "none") else cfg.weights
    common = dict(backbone=backbone or cfg.backbone, n_dr=_check_n_dr(cfg.n_dr_classes), n_dme=N_DME_CLASSES,
                  weights=weights if backbone is None else None)
    if kind == "joint":
        return build_model("joint", **common)
    if kind in ("dr", "dme"):
        return build_model("individual", task=kind, **common)
    raise ValueError(f"kind must be 'dr', 'dme' or 'joint', got {kind!r}")


@dataclass
class Trained:
    """One trained network: its per-epoch history, its test logits and the test targets."""

    history: pd.DataFrame
    outputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]


def train_grader(cfg: RunConfig, manifest: pd.DataFrame, kind: str, seed: int,
                 tasks: Sequence[str] = ("dr", "dme")) -> Trained:
    """Train one network of ``kind`` on the train split with ``seed`` (data order and initialisation),
    keep the epoch of lowest validation loss, and predict the test split once."""
    tasks = _check_tasks(tasks)
    loaders = make_loaders(manifest, tasks=tasks, image_size=cfg.image_size, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, data_path=cfg.data_path, seed=seed)
    torch.manual_seed(seed)
    model = make_model(cfg, kind)
    n_dr = cfg.n_dr_classes
    history = fit(model, GradingLoss(n_dr), loaders["train"], loaders["val"], epochs=cfg.epochs, lr=cfg.lr,
                  metrics_fn=lambda outputs, targets: grading_scores(outputs, targets, n_dr),
                  monitor="val_loss", device=cfg.device, compile=cfg.compile, desc=f"{kind} seed {seed}")
    outputs, targets = predict(model, loaders["test"], device=cfg.device)
    return Trained(history, outputs, targets)


def present_class_auc(labels: np.ndarray, logits: np.ndarray) -> float:
    """One-vs-rest ROC AUC averaged over the classes that occur in ``labels`` (and are not all of
    them): the macro AUC of :func:`fundus_lib.metrics.roc_auc` when every class occurs, and still
    defined on a small test split that lacks a grade (NaN only when ``labels`` hold one class)."""
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    labels = np.asarray(labels)
    classes = [c for c in range(probs.shape[1]) if 0 < (labels == c).sum() < labels.size]
    if probs.shape[1] == 2:
        classes = classes[1:]  # binary: the AUC of class 1 (that of class 0 is the same number)
    if not classes:
        return float("nan")
    return float(np.mean([metrics.roc_auc((labels == c).astype(np.int64), probs[:, c]) for c in classes]))


def _test_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                  n_dr_classes: int) -> dict[str, float]:
    scores = grading_scores(outputs, targets, n_dr_classes)
    result = {"joint_acc": scores["joint_acc"]} if "joint_acc" in scores else {}
    for task in ("dr", "dme"):
        if task in outputs:
            labels = task_labels(targets, task, n_dr_classes)
            result.update({f"{task}_acc": scores[f"{task}_acc"], f"{task}_kappa": scores[f"{task}_kappa"],
                           f"{task}_auc": present_class_auc(labels, outputs[task])})
    return {key: value for key, value in result.items() if np.isfinite(value)}


def majority_baseline(manifest: pd.DataFrame, tasks: Sequence[str], n_dr_classes: int) -> dict[str, float]:
    """Test scores of the training split's majority class (per task; jointly both majorities):
    accuracy of the most frequent grade, kappa 0, AUC 0.5 (a constant score ranks nothing)."""
    tasks = _check_tasks(tasks)
    train, test = (manifest[manifest["split"] == split] for split in ("train", "test"))
    if train.empty or test.empty:
        raise ValueError("majority_baseline: the manifest needs a train and a test split")
    scores, correct = {}, np.ones(len(test), dtype=bool)
    for task in tasks:
        column = "dr_grade" if task == "dr" else "dme_grade"
        truth_train = task_labels({task: train[column].to_numpy()}, task, n_dr_classes)
        truth_test = task_labels({task: test[column].to_numpy()}, task, n_dr_classes)
        n_classes = n_dr_classes if task == "dr" else N_DME_CLASSES
        baseline = majority_scores(truth_train, truth_test, n_classes)
        scores.update({f"{task}_acc": baseline["accuracy"], f"{task}_auc": 0.5, f"{task}_kappa": baseline["kappa"]})
        correct &= majority_predictions(truth_train, len(test)) == truth_test
    if len(tasks) == 2:
        scores = {"joint_acc": float(correct.mean()), **scores}
    return scores


def individual_vs_joint(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int],
                        tasks: Sequence[str] = ("dr", "dme"),
                        keep: MutableMapping[int, dict[str, Trained]] | None = None) -> pd.DataFrame:
    """CANet Table IV's baselines over ``seeds``: a tidy frame with configurations
    :data:`INDIVIDUAL`, :data:`JOINT` (only when ``tasks`` has DME) and :data:`MAJORITY`.

    Per seed: the DR network, the DME network and the joint network, each trained with that seed;
    the individual networks' test logits are paired image by image. Metrics: ``joint_acc`` (with
    DME) and ``<task>_acc``, ``<task>_auc``, ``<task>_kappa``. ``keep``, when given, receives
    ``{seed: {"dr": Trained, "dme": Trained, "joint": Trained}}`` for learning curves and plots.
    """
    tasks = _check_tasks(tasks)
    store = {} if keep is None else keep
    n_dr = cfg.n_dr_classes

    def trained(seed: int, kind: str) -> Trained:
        by_kind = store.setdefault(seed, {})
        if kind not in by_kind:
            by_kind[kind] = train_grader(cfg, manifest, kind, seed, tasks)
        return by_kind[kind]

    def individual(seed: int) -> dict[str, float]:
        runs = {task: trained(seed, task) for task in tasks}
        outputs = {task: run.outputs[task] for task, run in runs.items()}
        return _test_metrics(outputs, runs["dr"].targets, n_dr)

    def joint(seed: int) -> dict[str, float]:
        run = trained(seed, "joint")
        return _test_metrics(run.outputs, run.targets, n_dr)

    baseline = majority_baseline(manifest, tasks, n_dr)
    runs = {INDIVIDUAL: individual, **({JOINT: joint} if "dme" in tasks else {}), MAJORITY: lambda seed: baseline}
    return run_grid(runs, seeds)


def parameter_counts(cfg: RunConfig, paper_backbone: str = "resnet50") -> pd.DataFrame:
    """Parameters in millions of each network, for the paper's backbone (counted, not trained) and
    the run's ``cfg.backbone``; a last row sums the two individual networks."""
    counts = {}
    for backbone in dict.fromkeys([paper_backbone, cfg.backbone]):
        counts[f"{backbone}, M"] = [count_parameters(make_model(cfg, kind, backbone)) / 1e6
                                    for kind in ("dr", "dme", "joint")]
    table = pd.DataFrame(counts, index=["individual (DR)", "individual (DME)", "joint"])
    table.loc["individual, both networks"] = table.iloc[:2].sum()
    return table


__all__ = ["INDIVIDUAL", "JOINT", "MAJORITY", "TASK_METRICS", "N_DME_CLASSES", "dr_labels", "task_labels",
           "GradingLoss", "grading_scores", "present_class_auc", "make_model", "Trained", "train_grader", "majority_baseline",
           "individual_vs_joint", "parameter_counts"]
