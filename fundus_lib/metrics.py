"""Evaluation metrics of the five papers, on NumPy arrays or torch tensors.

Grading (CANet, CLPI, SiAN, ELLG, DeepMT-DR): quadratic weighted kappa, accuracy, joint accuracy
(DR and DME both right), ROC AUC (binary, and one-vs-rest macro for several classes),
precision / recall / F1 (binary or macro), confusion matrices over a *fixed* label set, and
CLPI's count of "unacceptable" errors. Segmentation (L-Net, DeepMT-DR): pixel-wise and image-wise
F1 and pixel-wise average precision per lesion, with non-annotated lesions excluded through
``mask_valid``. Super-resolution (DeepMT-DR): PSNR and SSIM.

Every function accepts NumPy arrays, torch tensors (any device, detached here) or nested lists,
and returns plain Python floats, NumPy arrays or pandas objects. Class labels are the integers
``0 .. n_classes - 1``; ``n_classes`` is inferred as ``max label + 1`` when not given, so a class
missing from one split never shifts the rows of a confusion matrix.

The unit tests check each metric against scikit-learn / scikit-image on random inputs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from scipy.stats import rankdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import average_precision_score

from fundus_lib.data.manifest import LESIONS

ArrayLike = Any  # np.ndarray | torch.Tensor | nested sequences of numbers

#: Task keys that :func:`grading_metrics` looks for in model outputs and batches by default.
GRADING_TASKS: tuple[str, ...] = ("dr", "dme")

#: Columns of :func:`classification_report_frame`.
REPORT_COLUMNS: tuple[str, ...] = ("n", "n_classes", "acc", "auc", "precision", "recall", "f1", "kappa")


# --------------------------------------------------------------------------------------------
# input conversion
# --------------------------------------------------------------------------------------------

def as_numpy(x: ArrayLike, name: str = "input") -> np.ndarray:
    """Return ``x`` as a NumPy array: torch tensors are detached and moved to the CPU
    (half / bfloat16 become float32, which NumPy lacks); anything else goes through ``np.asarray``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    array = np.asarray(x)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{name} must be numeric (array or tensor), got dtype {array.dtype}")
    return array


def _labels(x: ArrayLike, name: str) -> np.ndarray:
    """1-D array of non-negative integer class labels (integral floats are accepted)."""
    array = as_numpy(x, name)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        if not (np.all(np.isfinite(array)) and np.all(array == np.round(array))):
            raise ValueError(f"{name} must hold integer class labels, got non-integral values "
                             "(pass probabilities to the AUC functions instead)")
    array = array.astype(np.int64)
    if array.min() < 0:
        raise ValueError(f"{name} must hold labels >= 0, got {array.min()}")
    return array


def _paired_labels(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return t, p


def _resolve_n_classes(n_classes: int | None, *labels: np.ndarray) -> int:
    observed = max(int(a.max()) for a in labels) + 1
    if n_classes is None:
        return max(observed, 2)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if observed > n_classes:
        raise ValueError(f"labels must be < n_classes={n_classes}, got label {observed - 1}")
    return n_classes


# --------------------------------------------------------------------------------------------
# grading
# --------------------------------------------------------------------------------------------

def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int | None = None) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class, over labels 0..K-1.

    Equals ``sklearn.metrics.confusion_matrix(y_true, y_pred, labels=range(K))``.
    """
    t, p = _paired_labels(y_true, y_pred)
    k = _resolve_n_classes(n_classes, t, p)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of predictions equal to the truth."""
    t, p = _paired_labels(y_true, y_pred)
    return float(np.mean(t == p))


def joint_accuracy(true_a: ArrayLike, pred_a: ArrayLike, true_b: ArrayLike, pred_b: ArrayLike) -> float:
    """CANet's Joint Accuracy: fraction of images where BOTH tasks (e.g. DR and DME) are right."""
    ta, pa = _paired_labels(true_a, pred_a)
    tb, pb = _paired_labels(true_b, pred_b)
    if ta.shape != tb.shape:
        raise ValueError(f"both tasks must cover the same images, got {ta.shape[0]} and {tb.shape[0]}")
    return float(np.mean((ta == pa) & (tb == pb)))


def quadratic_weighted_kappa(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2`` over the labels 0..K-1.

    Equals ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=range(K))``.
    Returns NaN when kappa is undefined (no expected disagreement: both raters used one class).
    """
    cm = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    k = cm.shape[0]
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / cm.sum()
    denominator = float((weights * expected).sum())
    if denominator == 0.0:
        return float("nan")
    return float(1.0 - (weights * cm).sum() / denominator)


def precision_recall_f1(y_true: ArrayLike, y_pred: ArrayLike, *,
                        average: Literal["binary", "macro"] = "macro", n_classes: int | None = None,
                        pos_label: int = 1, zero_division: float = 0.0) -> dict[str, float]:
    """Precision, recall and F1 as ``{"precision", "recall", "f1"}``.

    ``average="binary"``: scores of class ``pos_label`` (labels must be 0/1 unless ``n_classes``
    says otherwise). ``average="macro"``: unweighted mean over ALL classes 0..K-1, the per-class F1
    averaged (not the F1 of the averaged precision and recall), as scikit-learn does. A ratio with
    an empty denominator counts as ``zero_division`` (scikit-learn's default behaviour is 0).
    """
    if average not in ("binary", "macro"):
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    cm = confusion_matrix(y_true, y_pred, n_classes if n_classes is not None else
                          (2 if average == "binary" else None))
    if average == "binary" and not 0 <= pos_label < cm.shape[0]:
        raise ValueError(f"pos_label={pos_label} is not a class of a {cm.shape[0]}-class problem")
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision = _safe_ratio(tp, predicted, zero_division)
    recall = _safe_ratio(tp, actual, zero_division)
    f1 = _safe_ratio(2 * tp, predicted + actual, zero_division)
    if average == "binary":
        return {"precision": float(precision[pos_label]), "recall": float(recall[pos_label]),
                "f1": float(f1[pos_label])}
    return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray, zero_division: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = numerator / denominator
    return np.where(denominator == 0, zero_division, ratio)


def unacceptable_errors(y_true: ArrayLike, y_pred: ArrayLike) -> int:
    """CLPI's "unacceptable" errors on the 5-grade ICDR scale: grades 3-4 (severe NPDR, PDR)
    predicted as 0-1 (no / mild DR), and grades 0-1 predicted as 3-4 (Yang et al., Table VII)."""
    t, p = _paired_labels(y_true, y_pred)
    if max(t.max(), p.max()) > 4:
        raise ValueError("unacceptable_errors needs 5-grade DR labels 0..4, "
                         f"got a label {max(t.max(), p.max())}")
    low_t, high_t = t <= 1, t >= 3
    low_p, high_p = p <= 1, p >= 3
    return int(np.sum((high_t & low_p) | (low_t & high_p)))


def referable(grades: ArrayLike, threshold: int = 2) -> np.ndarray:
    """Binary referable-DR labels: 1 where ``grade >= threshold`` (grades 2-3 on Messidor, CANet)."""
    return (_labels(grades, "grades") >= threshold).astype(np.int64)


def referable_probability(probs: ArrayLike, threshold: int = 2) -> np.ndarray:
    """Probability of a referable grade from an (N, C) grade-probability matrix: the sum of the
    columns ``threshold..C-1`` (scores for a binary referable AUC from a multi-grade model)."""
    p = _probability_matrix(probs, "probs")
    if not 0 < threshold < p.shape[1]:
        raise ValueError(f"threshold must lie in 1..{p.shape[1] - 1} for {p.shape[1]} classes, got {threshold}")
    return p[:, threshold:].sum(axis=1)


def _probability_matrix(probs: ArrayLike, name: str) -> np.ndarray:
    p = as_numpy(probs, name).astype(np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name} must be an (N, C>=2) probability matrix, got shape {p.shape}")
    return p


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Column-wise ROC AUC by the Mann-Whitney rank statistic (ties count one half), which equals
    the trapezoidal area under the ROC curve. ``positive`` and ``scores`` are (N, M)."""
    ranks = rankdata(scores, axis=0)
    n_pos = positive.sum(axis=0)
    n_neg = positive.shape[0] - n_pos
    rank_sum = (ranks * positive).sum(axis=0)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_auc(y_true: ArrayLike, scores: ArrayLike, *,
            on_undefined: Literal["raise", "nan"] = "raise") -> float:
    """ROC AUC, binary or one-vs-rest macro.

    - ``scores`` 1-D (score of class 1) or (N, 2): binary AUC; ``y_true`` must be 0/1.
    - ``scores`` (N, C) with C > 2: the mean over the C classes of the AUC of column c against
      ``y_true == c`` (scikit-learn's ``multi_class="ovr", average="macro"``; unlike scikit-learn,
      rows need not sum to 1).

    AUC is undefined when a class is absent from ``y_true`` (no positives or no negatives): then
    ``on_undefined="raise"`` raises a ValueError naming the class, ``"nan"`` returns NaN.
    """
    t = _labels(y_true, "y_true")
    s = as_numpy(scores, "scores").astype(np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"y_true and scores must have the same length, got {t.shape[0]} and {s.shape[0]}")
    if s.ndim == 1:
        if t.max() > 1:
            raise ValueError(f"binary AUC needs y_true in {{0, 1}}, got label {t.max()}; "
                             "pass an (N, C) score matrix for several classes")
        positive, s = (t == 1)[:, None], s[:, None]
    elif s.ndim == 2:
        if t.max() >= s.shape[1]:
            raise ValueError(f"y_true has label {t.max()} but scores has only {s.shape[1]} columns")
        positive = t[:, None] == np.arange(s.shape[1])[None, :]
    else:
        raise ValueError(f"scores must be 1-D or (N, C), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    counts = positive.sum(axis=0)
    undefined = np.flatnonzero((counts == 0) | (counts == t.shape[0]))
    if undefined.size:
        if on_undefined == "nan":
            return float("nan")
        if positive.shape[1] == 1:
            raise ValueError("binary ROC AUC is undefined: y_true holds only one class")
        raise ValueError(f"one-vs-rest ROC AUC is undefined: class(es) {undefined.tolist()} have no "
                         "positives or no negatives in y_true")
    return float(_binary_auc(positive.astype(np.float64), s).mean())


def classification_report_frame(y_true: ArrayLike | Mapping[str, ArrayLike],
                                y_prob_or_pred: ArrayLike | Mapping[str, ArrayLike],
                                task: str = "task", *, n_classes: int | None = None,
                                average: Literal["binary", "macro"] | None = None) -> pd.DataFrame:
    """Per-task grading report, one row per task, columns :data:`REPORT_COLUMNS`.

    ``y_prob_or_pred`` per task is either an (N, C) probability matrix (prediction = argmax, AUC
    from the probabilities), a 1-D float array of positive-class probabilities of a binary task
    (prediction = p >= 0.5), or 1-D integer predicted labels (then ``auc`` is NaN: an AUC needs
    scores). Pass dicts ``{task: array}`` for several tasks (``task`` is then ignored).
    ``average`` defaults to "binary" for 2 classes and "macro" otherwise (CANet's convention).
    AUC is NaN where a class is missing from ``y_true`` (small validation splits).
    """
    if isinstance(y_true, Mapping) != isinstance(y_prob_or_pred, Mapping):
        raise ValueError("y_true and y_prob_or_pred must both be arrays or both be {task: array} dicts")
    if isinstance(y_true, Mapping):
        missing = set(y_true) ^ set(y_prob_or_pred)
        if missing:
            raise ValueError(f"y_true and y_prob_or_pred must have the same tasks, mismatched: {sorted(missing)}")
        rows = {name: _report_row(y_true[name], y_prob_or_pred[name], n_classes, average)
                for name in y_true}
    else:
        rows = {task: _report_row(y_true, y_prob_or_pred, n_classes, average)}
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(REPORT_COLUMNS))
    frame.index.name = "task"
    return frame.astype({"n": "int64", "n_classes": "int64"})


def _report_row(y_true: ArrayLike, y_prob_or_pred: ArrayLike, n_classes: int | None,
                average: str | None) -> dict[str, float]:
    t = _labels(y_true, "y_true")
    scores = as_numpy(y_prob_or_pred, "y_prob_or_pred")
    if scores.ndim == 2:
        scores = scores.astype(np.float64)
        pred = scores.argmax(axis=1)
        k = scores.shape[1]
        if n_classes is not None and n_classes != k:
            raise ValueError(f"n_classes={n_classes} disagrees with {k} probability columns")
    elif scores.ndim == 1 and np.issubdtype(scores.dtype, np.floating):
        if scores.min() < 0 or scores.max() > 1:
            raise ValueError("1-D float y_prob_or_pred must be positive-class probabilities in [0, 1]")
        pred = (scores >= 0.5).astype(np.int64)
        k = 2
    else:
        pred, scores = _labels(scores, "y_prob_or_pred"), None
        k = n_classes
    cm_classes = _resolve_n_classes(k, t, pred)
    avg = average or ("binary" if cm_classes == 2 else "macro")
    prf = precision_recall_f1(t, pred, average=avg, n_classes=cm_classes)
    return {"n": t.shape[0], "n_classes": cm_classes, "acc": accuracy(t, pred),
            "auc": float("nan") if scores is None else roc_auc(t, scores, on_undefined="nan"),
            **prf, "kappa": quadratic_weighted_kappa(t, pred, cm_classes)}


def grading_metrics(outputs: Mapping[str, ArrayLike], targets: Mapping[str, ArrayLike],
                    tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Report of :func:`classification_report_frame` from a model's logits dict and a batch dict.

    ``outputs[task]`` are (N, C) logits (softmax is applied here), ``targets[task]`` (N,) labels.
    ``tasks`` defaults to those of :data:`GRADING_TASKS` present in both dicts. With two or more
    tasks a last row ``"joint"`` holds the joint accuracy (every task right) in column ``acc``: the
    accuracy on the combined label, whose ``n_classes`` is the product of the tasks' (its other
    metric columns are NaN).
    """
    if tasks is None:
        tasks = [name for name in GRADING_TASKS if name in outputs and name in targets]
        if not tasks:
            raise ValueError(f"no grading task found: outputs has {sorted(outputs)}, "
                             f"targets has {sorted(targets)}, expected some of {GRADING_TASKS}")
    for name in tasks:
        if name not in outputs or name not in targets:
            raise ValueError(f"task {name!r} must be a key of both outputs and targets")
    probs = {}
    for name in tasks:
        logits = as_numpy(outputs[name], f"outputs[{name!r}]").astype(np.float64)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"outputs[{name!r}] must be (N, C>=2) logits, got shape {logits.shape}")
        probs[name] = softmax(logits, axis=1)
    report = classification_report_frame({name: targets[name] for name in tasks}, probs)
    if len(tasks) >= 2:
        correct = np.all([_labels(targets[name], f"targets[{name!r}]") == probs[name].argmax(axis=1)
                          for name in tasks], axis=0)
        joint = pd.DataFrame({"n": correct.size, "n_classes": int(report["n_classes"].prod()),
                              "acc": float(correct.mean())}, index=pd.Index(["joint"], name="task"))
        report = pd.concat([report, joint]).astype({"n": "int64", "n_classes": "int64"})
    return report


def grading_scores(outputs: Mapping[str, ArrayLike], targets: Mapping[str, ArrayLike],
                   tasks: Sequence[str] | None = None) -> dict[str, float]:
    """:func:`grading_metrics` flattened to ``{"<task>_<metric>": value}`` (``"dr_kappa"``,
    ``"dme_f1"``, ``"joint_acc"``...): the ``metrics_fn(outputs, targets)`` that
    :func:`fundus_lib.train.fit` logs as ``val_<name>`` columns."""
    report = grading_metrics(outputs, targets, tasks)
    scores = {f"{task}_{column}": float(report.loc[task, column])
              for task in report.index if task != "joint" for column in REPORT_COLUMNS[2:]}
    if "joint" in report.index:
        scores["joint_acc"] = float(report.loc["joint", "acc"])
    return scores


# --------------------------------------------------------------------------------------------
# lesion segmentation
# --------------------------------------------------------------------------------------------

def _lesion_names(n_channels: int, lesions: Sequence[str] | None) -> list[str]:
    if lesions is None:
        if n_channels != len(LESIONS):
            raise ValueError(f"maps have {n_channels} channels; pass lesions=[...] naming them "
                             f"(the default names {LESIONS} need {len(LESIONS)})")
        return list(LESIONS)
    if len(lesions) != n_channels:
        raise ValueError(f"lesions has {len(lesions)} names for {n_channels} channels")
    return list(lesions)


def _valid_matrix(mask_valid: ArrayLike | None, n: int, c: int) -> np.ndarray:
    if mask_valid is None:
        return np.ones((n, c), dtype=bool)
    valid = as_numpy(mask_valid, "mask_valid")
    if valid.shape != (n, c):
        raise ValueError(f"mask_valid must have shape {(n, c)}, got {valid.shape}")
    return valid > 0


def _segmentation_pair(pred: ArrayLike, target: ArrayLike, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    p, t = as_numpy(pred, "pred"), as_numpy(target, "target")
    if p.ndim != ndim or p.shape != t.shape:
        raise ValueError(f"pred and target must both have {ndim} dims and equal shapes, "
                         f"got {p.shape} and {t.shape}")
    return p, t


def _f1_per_channel(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray,
                    zero_division: float) -> np.ndarray:
    """F1 per channel over all valid images: ``pred``/``truth`` boolean (N, C, ...), valid (N, C)."""
    weight = valid.reshape(valid.shape + (1,) * (pred.ndim - 2))
    axes = (0, *range(2, pred.ndim))
    tp = np.sum(pred & truth & weight, axis=axes, dtype=np.int64)
    fp = np.sum(pred & ~truth & weight, axis=axes, dtype=np.int64)
    fn = np.sum(~pred & truth & weight, axis=axes, dtype=np.int64)
    f1 = _safe_ratio(2.0 * tp, 2 * tp + fp + fn, zero_division)
    return np.where(valid.any(axis=0), f1, np.nan)


def pixel_f1(pred: ArrayLike, target: ArrayLike, mask_valid: ArrayLike | None = None, *,
             threshold: float = 0.5, lesions: Sequence[str] | None = None,
             zero_division: float = float("nan")) -> pd.Series:
    """L-Net's pixel-wise F1 per lesion (Wei et al., Table 3).

    ``pred`` (N, C, H, W) probabilities (or binary masks), foreground where ``pred >= threshold``;
    ``target`` (N, C, H, W) binary masks. For each lesion the pixels of all images where
    ``mask_valid[n, c] > 0`` are pooled (as ``sklearn.metrics.f1_score`` on the flattened maps).
    A lesion with no valid image is NaN; one with no true and no predicted pixel is
    ``zero_division`` (NaN by default, so it drops out of a ``nanmean``).
    """
    p, t = _segmentation_pair(pred, target, 4)
    valid = _valid_matrix(mask_valid, p.shape[0], p.shape[1])
    f1 = _f1_per_channel(p >= threshold, t > 0, valid, zero_division)
    return pd.Series(f1, index=_lesion_names(p.shape[1], lesions), name="pixel_f1")


def image_f1(pred: ArrayLike, target: ArrayLike, mask_valid: ArrayLike | None = None, *,
             threshold: float = 0.5, lesions: Sequence[str] | None = None,
             zero_division: float = float("nan")) -> pd.Series:
    """Image-wise F1 per lesion (lesion present / absent per image; Wei et al., Table 5).

    ``pred`` is (N, C, H, W) probability maps, reduced by global max pooling as L-Net does
    (Eq. 1), or (N, C) presence probabilities; present where ``>= threshold``. ``target`` is
    (N, C, H, W) masks (present = any foreground pixel) or (N, C) presence labels. Images with
    ``mask_valid[n, c] == 0`` are left out of lesion c.
    """
    p, t = as_numpy(pred, "pred"), as_numpy(target, "target")
    if p.ndim == 4:
        p = p.max(axis=(2, 3))
    if t.ndim == 4:
        t = t.max(axis=(2, 3))
    p, t = _segmentation_pair(p, t, 2)
    valid = _valid_matrix(mask_valid, p.shape[0], p.shape[1])
    f1 = _f1_per_channel(p >= threshold, t > 0, valid, zero_division)
    return pd.Series(f1, index=_lesion_names(p.shape[1], lesions), name="image_f1")


def pixel_aupr(pred: ArrayLike, target: ArrayLike, mask_valid: ArrayLike | None = None, *,
               lesions: Sequence[str] | None = None) -> pd.Series:
    """Pixel-wise area under the precision-recall curve per lesion (average precision, DeepMT-DR's
    segmentation metric), pooling the pixels of the valid images. NaN for a lesion with no valid
    image or no foreground pixel (AP is undefined without positives)."""
    p, t = _segmentation_pair(pred, target, 4)
    valid = _valid_matrix(mask_valid, p.shape[0], p.shape[1])
    scores = np.full(p.shape[1], np.nan)
    for c in range(p.shape[1]):  # one sort per lesion channel; pixels are handled vectorised
        truth = t[valid[:, c], c] > 0
        if truth.any():
            scores[c] = average_precision_score(truth.ravel(), p[valid[:, c], c].ravel())
    return pd.Series(scores, index=_lesion_names(p.shape[1], lesions), name="pixel_aupr")


# --------------------------------------------------------------------------------------------
# super-resolution
# --------------------------------------------------------------------------------------------

def _image_batch(pred: ArrayLike, target: ArrayLike, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 (N, C, H, W); accepted layouts are (H, W), (C, H, W), (N, C, H, W),
    or (H, W, C), (N, H, W, C) with ``channels_last``."""
    p, t = as_numpy(pred, "pred").astype(np.float64), as_numpy(target, "target").astype(np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.ndim == 2:
        p, t = p[None, None], t[None, None]
    elif p.ndim in (3, 4):
        if channels_last:
            p, t = np.moveaxis(p, -1, -3), np.moveaxis(t, -1, -3)
        if p.ndim == 3:
            p, t = p[None], t[None]
    else:
        raise ValueError(f"images must be (H, W), (C, H, W) or (N, C, H, W), got shape {p.shape}")
    return p, t


def psnr(pred: ArrayLike, target: ArrayLike, *, data_range: float = 1.0,
         channels_last: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``
    (``skimage.metrics.peak_signal_noise_ratio`` per image).

    A batch (N, C, H, W) gives the mean of the per-image PSNRs (the usual super-resolution
    report). ``inf`` for identical images.
    """
    p, t = _image_batch(pred, target, channels_last)
    with np.errstate(divide="ignore"):
        values = [peak_signal_noise_ratio(t_i, p_i, data_range=data_range) for p_i, t_i in zip(p, t)]
    return float(np.mean(values))


def ssim(pred: ArrayLike, target: ArrayLike, *, data_range: float = 1.0, gaussian_weights: bool = True,
         sigma: float = 1.5, win_size: int = 7, use_sample_covariance: bool = False,
         channels_last: bool = False) -> float:
    """Mean structural similarity (Wang et al., 2004), computed per channel, averaged over channels
    and then over the images of a batch (``skimage.metrics.structural_similarity`` per image).

    Defaults follow Wang et al.: an 11x11 Gaussian window with ``sigma=1.5`` and population
    covariance. ``gaussian_weights=False`` uses a ``win_size`` uniform window instead.
    """
    p, t = _image_batch(pred, target, channels_last)
    window = 2 * int(3.5 * sigma + 0.5) + 1 if gaussian_weights else win_size  # skimage's Gaussian extent
    if window % 2 == 0 or window < 3:
        raise ValueError(f"the SSIM window must be odd and >= 3, got {window}")
    if min(p.shape[-2:]) < window:
        raise ValueError(f"images of size {p.shape[-2:]} are smaller than the {window}x{window} SSIM window")
    values = [structural_similarity(t_i, p_i, data_range=data_range, channel_axis=0, win_size=window,
                                    gaussian_weights=gaussian_weights, sigma=sigma,
                                    use_sample_covariance=use_sample_covariance)
              for p_i, t_i in zip(p, t)]
    return float(np.mean(values))
