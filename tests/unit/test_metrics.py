"""fundus_lib.metrics against scikit-learn / scikit-image on random inputs, plus hand examples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from skimage import metrics as skm
from sklearn import metrics as sk

from fundus_lib import metrics
from fundus_lib.data.manifest import LESIONS

SEEDS = (0, 1, 2, 3)


def _labels(rng: np.random.Generator, k: int, n: int = 200) -> np.ndarray:
    return rng.integers(0, k, n)


def _probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    p = rng.random((n, k))
    return p / p.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ grading vs scikit-learn

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", (2, 3, 5))
def test_kappa_accuracy_confusion_equal_sklearn(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    t, p = _labels(rng, k), _labels(rng, k)
    assert metrics.quadratic_weighted_kappa(t, p) == pytest.approx(
        sk.cohen_kappa_score(t, p, weights="quadratic"), abs=1e-12)
    assert metrics.accuracy(t, p) == pytest.approx(sk.accuracy_score(t, p), abs=1e-15)
    np.testing.assert_array_equal(metrics.confusion_matrix(t, p, k),
                                  sk.confusion_matrix(t, p, labels=range(k)))


def test_kappa_with_missing_class_uses_fixed_labels() -> None:
    # grade 2 never occurs: weights must still follow the grade values, not the observed ranks
    rng = np.random.default_rng(7)
    t = rng.choice([0, 1, 3, 4], 100)
    p = rng.choice([0, 1, 3, 4], 100)
    ours = metrics.quadratic_weighted_kappa(t, p, n_classes=5)
    assert ours == pytest.approx(sk.cohen_kappa_score(t, p, weights="quadratic", labels=range(5)), abs=1e-12)
    assert ours != pytest.approx(sk.cohen_kappa_score(t, p, weights="quadratic"), abs=1e-6)
    cm = metrics.confusion_matrix(t, p, n_classes=5)
    assert cm.shape == (5, 5) and cm[2].sum() == 0 and cm[:, 2].sum() == 0


def test_kappa_hand_values() -> None:
    assert metrics.quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == 1.0
    assert metrics.quadratic_weighted_kappa([0, 4], [4, 0]) == pytest.approx(-1.0)
    assert np.isnan(metrics.quadratic_weighted_kappa([1, 1, 1], [1, 1, 1]))


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = _labels(rng, 2)
    scores = np.round(rng.random(t.size), 2)  # rounding creates ties
    assert metrics.roc_auc(t, scores) == pytest.approx(sk.roc_auc_score(t, scores), abs=1e-12)
    two_col = np.stack([1 - scores, scores], axis=1)
    assert metrics.roc_auc(t, two_col) == pytest.approx(sk.roc_auc_score(t, scores), abs=1e-12)
    assert metrics.roc_auc(torch.from_numpy(t), torch.from_numpy(scores).float()) == pytest.approx(
        sk.roc_auc_score(t, scores.astype(np.float32)), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", (3, 5))
def test_multiclass_ovr_macro_auc_equals_sklearn(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    t, probs = _labels(rng, k), _probs(rng, 200, k)
    expected = sk.roc_auc_score(t, probs, multi_class="ovr", average="macro", labels=range(k))
    assert metrics.roc_auc(t, probs) == pytest.approx(expected, abs=1e-12)


def test_auc_with_absent_class_raises_or_nan() -> None:
    rng = np.random.default_rng(0)
    t, probs = rng.choice([0, 1, 3], 60), _probs(rng, 60, 4)
    with pytest.raises(ValueError, match=r"undefined.*\[2\]"):
        metrics.roc_auc(t, probs)
    assert np.isnan(metrics.roc_auc(t, probs, on_undefined="nan"))
    with pytest.raises(ValueError, match="undefined"):
        metrics.roc_auc([1, 1, 1], [0.2, 0.5, 0.9])


def test_auc_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="y_true in"):
        metrics.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 3 columns"):
        metrics.roc_auc([0, 1, 3], np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="same length"):
        metrics.roc_auc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", SEEDS)
def test_precision_recall_f1_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t, p = _labels(rng, 2), _labels(rng, 2)
    ours = metrics.precision_recall_f1(t, p, average="binary")
    ref = sk.precision_recall_fscore_support(t, p, average="binary")
    assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx(ref[:3], abs=1e-12)

    t, p = _labels(rng, 5, 60), rng.choice([0, 1, 2, 4], 60)  # class 3 never predicted
    ours = metrics.precision_recall_f1(t, p, average="macro", n_classes=5)
    ref = sk.precision_recall_fscore_support(t, p, average="macro", labels=range(5), zero_division=0)
    assert [ours["precision"], ours["recall"], ours["f1"]] == pytest.approx(ref[:3], abs=1e-12)


def test_unacceptable_errors_hand_example() -> None:
    y_true = [0, 1, 3, 4, 2, 3, 0, 4, 1, 2]
    y_pred = [4, 3, 1, 0, 0, 2, 1, 4, 2, 4]
    #         x  x  x  x  .  .  .  .  .  .   (2 is never unacceptable; 3->2, 0->1, 1->2 are not)
    assert metrics.unacceptable_errors(y_true, y_pred) == 4
    assert metrics.unacceptable_errors(y_pred, y_true) == 4
    with pytest.raises(ValueError, match="0..4"):
        metrics.unacceptable_errors([0, 5], [0, 1])


def test_joint_accuracy_hand_example() -> None:
    dr_t, dr_p = [0, 1, 2, 3], [0, 1, 0, 3]
    dme_t, dme_p = [0, 2, 1, 1], [0, 1, 1, 1]
    # image 0 both right, image 1 DME wrong, image 2 DR wrong, image 3 both right
    assert metrics.joint_accuracy(dr_t, dr_p, dme_t, dme_p) == 0.5
    with pytest.raises(ValueError, match="same images"):
        metrics.joint_accuracy(dr_t, dr_p, dme_t[:3], dme_p[:3])


def test_referable() -> None:
    np.testing.assert_array_equal(metrics.referable([0, 1, 2, 3, 4]), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(metrics.referable(torch.tensor([0, 1, 2, 3]), threshold=1), [0, 1, 1, 1])
    probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(metrics.referable_probability(probs), [0.3, 1.0])


def test_label_validation_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="integer class labels"):
        metrics.accuracy([0.2, 1.0], [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        metrics.accuracy([-1, 1], [0, 1])
    with pytest.raises(ValueError, match="n_classes=3"):
        metrics.confusion_matrix([0, 3], [0, 1], n_classes=3)
    with pytest.raises(ValueError, match="average"):
        metrics.precision_recall_f1([0, 1], [0, 1], average="micro")


def test_classification_report_frame_matches_individual_metrics() -> None:
    rng = np.random.default_rng(3)
    dr_t, dr_p = _labels(rng, 5, 80), _probs(rng, 80, 5)
    ref_t, ref_p = _labels(rng, 2, 80), rng.random(80)
    frame = metrics.classification_report_frame({"dr": dr_t, "referable": ref_t}, {"dr": dr_p, "referable": ref_p})
    assert list(frame.index) == ["dr", "referable"]
    assert list(frame.columns) == list(metrics.REPORT_COLUMNS)
    dr_pred = dr_p.argmax(axis=1)
    assert frame.loc["dr", "acc"] == pytest.approx(sk.accuracy_score(dr_t, dr_pred))
    assert frame.loc["dr", "f1"] == pytest.approx(sk.f1_score(dr_t, dr_pred, average="macro", zero_division=0))
    assert frame.loc["dr", "auc"] == pytest.approx(sk.roc_auc_score(dr_t, dr_p, multi_class="ovr"))
    assert frame.loc["dr", "kappa"] == pytest.approx(sk.cohen_kappa_score(dr_t, dr_pred, weights="quadratic"))
    ref_pred = (ref_p >= 0.5).astype(int)
    assert frame.loc["referable", "f1"] == pytest.approx(sk.f1_score(ref_t, ref_pred))
    assert frame.loc["referable", "auc"] == pytest.approx(sk.roc_auc_score(ref_t, ref_p))
    assert frame.loc["referable", "n_classes"] == 2

    hard = metrics.classification_report_frame(dr_t, dr_pred, task="dr")
    assert list(hard.index) == ["dr"] and np.isnan(hard.loc["dr", "auc"])
    assert hard.loc["dr", "acc"] == frame.loc["dr", "acc"]


def test_classification_report_frame_nan_auc_for_missing_class_and_errors() -> None:
    t = np.array([0, 1, 1, 0, 2, 2])  # class 3 absent
    frame = metrics.classification_report_frame(t, np.full((6, 4), 0.25))
    assert np.isnan(frame.iloc[0]["auc"]) and frame.iloc[0]["n_classes"] == 4
    with pytest.raises(ValueError, match="both be arrays"):
        metrics.classification_report_frame({"dr": t}, t)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.classification_report_frame(t[:2], np.array([0.2, 1.7]))


def test_grading_metrics_from_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    outputs = {"dr": torch.randn(50, 5, generator=gen), "dme": torch.randn(50, 3, generator=gen),
               "masks": torch.zeros(50, 8, 4, 4)}
    targets = {"dr": torch.randint(0, 5, (50,), generator=gen), "dme": torch.randint(0, 3, (50,), generator=gen),
               "masks": torch.zeros(50, 8, 4, 4)}
    report = metrics.grading_metrics(outputs, targets)
    assert list(report.index) == ["dr", "dme", "joint"]
    dr_pred, dme_pred = outputs["dr"].argmax(1).numpy(), outputs["dme"].argmax(1).numpy()
    probs = torch.softmax(outputs["dr"], 1).numpy()
    assert report.loc["dr", "auc"] == pytest.approx(sk.roc_auc_score(targets["dr"].numpy(), probs, multi_class="ovr"))
    assert report.loc["dme", "acc"] == pytest.approx(sk.accuracy_score(targets["dme"].numpy(), dme_pred))
    joint = np.mean((dr_pred == targets["dr"].numpy()) & (dme_pred == targets["dme"].numpy()))
    assert report.loc["joint", "acc"] == pytest.approx(joint)
    assert np.isnan(report.loc["joint", "kappa"]) and report.loc["joint", "n_classes"] == 15

    scores = metrics.grading_scores({k: v.numpy() for k, v in outputs.items()},
                                    {k: v.numpy() for k, v in targets.items()})
    assert set(scores) == {f"{t}_{m}" for t in ("dr", "dme") for m in ("acc", "auc", "precision", "recall",
                                                                       "f1", "kappa")} | {"joint_acc"}
    assert scores["dr_kappa"] == report.loc["dr", "kappa"] and scores["joint_acc"] == pytest.approx(joint)

    single = metrics.grading_metrics({"dr": outputs["dr"]}, targets)
    assert list(single.index) == ["dr"]
    with pytest.raises(ValueError, match="no grading task"):
        metrics.grading_metrics({"masks": outputs["masks"]}, targets)
    with pytest.raises(ValueError, match="logits"):
        metrics.grading_metrics({"dr": outputs["dr"][:, :1]}, targets)


# ------------------------------------------------------------------ segmentation

def _segmentation_batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.random((6, 8, 12, 12))
    masks = (rng.random((6, 8, 12, 12)) < 0.3).astype(np.float32)
    valid = (rng.random((6, 8)) < 0.7).astype(np.float32)
    valid[:, 0] = 1  # at least one lesion fully annotated
    valid[:, 7] = 0  # one lesion never annotated
    return probs, masks, valid


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_f1_equals_sklearn_on_flattened_valid_maps(seed: int) -> None:
    probs, masks, valid = _segmentation_batch(seed)
    ours = metrics.pixel_f1(torch.from_numpy(probs), torch.from_numpy(masks), torch.from_numpy(valid))
    assert list(ours.index) == list(LESIONS)
    for c, lesion in enumerate(LESIONS):
        rows = valid[:, c] > 0
        if not rows.any():
            assert np.isnan(ours[lesion])
            continue
        ref = sk.f1_score(masks[rows, c].ravel() > 0, probs[rows, c].ravel() >= 0.5)
        assert ours[lesion] == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_image_f1_equals_sklearn_on_max_pooled_maps(seed: int) -> None:
    probs, masks, valid = _segmentation_batch(seed)
    probs = probs ** 8  # so that the max-pooled presence is not always >= 0.5
    masks[:, :, :, :] *= (np.random.default_rng(seed).random((6, 8, 1, 1)) < 0.5)
    ours = metrics.image_f1(probs, masks, valid, zero_division=0.0)
    same = metrics.image_f1(probs.max(axis=(2, 3)), masks.max(axis=(2, 3)), valid, zero_division=0.0)
    pd.testing.assert_series_equal(ours, same)
    for c, lesion in enumerate(LESIONS):
        rows = valid[:, c] > 0
        if not rows.any():
            assert np.isnan(ours[lesion])
            continue
        ref = sk.f1_score(masks[rows, c].max(axis=(1, 2)) > 0, probs[rows, c].max(axis=(1, 2)) >= 0.5,
                          zero_division=0.0)
        assert ours[lesion] == pytest.approx(ref, abs=1e-12)


def test_f1_zero_division_and_lesion_names() -> None:
    empty = np.zeros((2, 3, 4, 4))
    assert metrics.pixel_f1(empty, empty, lesions=["a", "b", "c"]).isna().all()
    assert (metrics.pixel_f1(empty, empty, lesions=["a", "b", "c"], zero_division=1.0) == 1.0).all()
    with pytest.raises(ValueError, match="lesions="):
        metrics.pixel_f1(empty, empty)
    with pytest.raises(ValueError, match="mask_valid"):
        metrics.pixel_f1(empty, empty, np.ones((2, 8)), lesions=["a", "b", "c"])
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.pixel_f1(empty, empty[:1], lesions=["a", "b", "c"])


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_pixel_aupr_equals_sklearn_average_precision(seed: int) -> None:
    probs, masks, valid = _segmentation_batch(seed)
    ours = metrics.pixel_aupr(probs, masks, valid)
    for c, lesion in enumerate(LESIONS):
        rows = valid[:, c] > 0
        if not rows.any():
            assert np.isnan(ours[lesion])
        else:
            assert ours[lesion] == pytest.approx(
                sk.average_precision_score(masks[rows, c].ravel(), probs[rows, c].ravel()), abs=1e-12)


# ------------------------------------------------------------------ super-resolution

@pytest.mark.parametrize("seed", SEEDS[:2])
def test_psnr_equals_skimage(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.random((3, 3, 24, 24))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    per_image = [skm.peak_signal_noise_ratio(target[i], pred[i], data_range=1.0) for i in range(3)]
    assert metrics.psnr(torch.from_numpy(pred), torch.from_numpy(target)) == pytest.approx(np.mean(per_image))
    assert metrics.psnr(pred[0], target[0]) == pytest.approx(per_image[0])
    hwc = np.moveaxis(pred[0], 0, -1) * 255, np.moveaxis(target[0], 0, -1) * 255
    assert metrics.psnr(*hwc, data_range=255, channels_last=True) == pytest.approx(per_image[0])
    assert metrics.psnr(target, target) == np.inf


def _smooth_images(x: np.ndarray) -> np.ndarray:
    """Random images with some spatial structure (pure noise makes SSIM trivially small)."""
    return ndimage.gaussian_filter(x, sigma=(0, 0, 2, 2))


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("gaussian", (True, False))
def test_ssim_equals_skimage(seed: int, gaussian: bool) -> None:
    rng = np.random.default_rng(seed)
    target = _smooth_images(rng.random((2, 3, 32, 32)))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    kwargs = dict(gaussian_weights=gaussian, use_sample_covariance=not gaussian)
    per_image = [skm.structural_similarity(target[i], pred[i], data_range=1.0, channel_axis=0, **kwargs)
                 for i in range(2)]
    assert metrics.ssim(pred, target, **kwargs) == pytest.approx(np.mean(per_image), abs=1e-10)
    gray = skm.structural_similarity(target[0, 0], pred[0, 0], data_range=1.0, **kwargs)
    assert metrics.ssim(pred[0, 0], target[0, 0], **kwargs) == pytest.approx(gray, abs=1e-10)
    assert metrics.ssim(target, target) == pytest.approx(1.0)


def test_psnr_and_ssim_equal_their_definitions() -> None:
    """The formulas metrics.py computed by hand before it called skimage: PSNR = 10 log10(R^2 / MSE)
    per image, then the batch mean; SSIM (Wang et al. 2004, Eq. 13) over every 7x7 window inside the
    image with sample statistics, averaged over windows, channels and images."""
    rng = np.random.default_rng(11)
    target = _smooth_images(rng.random((2, 2, 12, 12)))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    mse = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    assert metrics.psnr(pred, target) == pytest.approx(np.mean(10 * np.log10(1.0 / mse)), rel=1e-12)
    c1, c2, w = 0.01 ** 2, 0.03 ** 2, 7
    values = []
    for x_img, y_img in zip(pred.reshape(-1, 12, 12), target.reshape(-1, 12, 12)):
        for top in range(12 - w + 1):
            for left in range(12 - w + 1):
                x, y = x_img[top:top + w, left:left + w].ravel(), y_img[top:top + w, left:left + w].ravel()
                cov = np.cov(x, y)  # sample (n - 1) statistics
                values.append((2 * x.mean() * y.mean() + c1) * (2 * cov[0, 1] + c2)
                              / ((x.mean() ** 2 + y.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    ours = metrics.ssim(pred, target, gaussian_weights=False, win_size=w, use_sample_covariance=True)
    assert ours == pytest.approx(np.mean(values), abs=1e-10)


def test_sr_metric_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((3, 8, 8)), np.zeros((3, 8, 9)))
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="N, C, H, W"):
        metrics.psnr(np.zeros((1, 1, 1, 8, 8)), np.zeros((1, 1, 1, 8, 8)))
