"""Tests for fundus_lib.losses: hand computations, reference implementations, Table 2, mask_valid."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from fundus_lib.losses import (
    DiceClsLoss,
    DiceSegLoss,
    DualLoss,
    DualLossSchedule,
    FocalLoss,
    MultiTaskLoss,
    WeightedBCELoss,
    total_variation_loss,
)

BIG = 30.0  # a logit whose sigmoid is 1 to float precision


def make_outputs(mask_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model-like outputs: mask logits and their global max as presence logits (as L-Net returns)."""
    return {"masks": mask_logits, "presence": mask_logits.amax(dim=(2, 3))}


def make_batch(masks: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    valid = torch.ones(masks.shape[:2]) if valid is None else valid
    return {"masks": masks, "mask_valid": valid, "lesion_present": masks.amax(dim=(2, 3))}


def test_dice_seg_matches_hand_computation_over_the_whole_batch():
    probs = torch.tensor([[[[0.5, 0.8], [0.1, 0.2]]], [[[0.6, 0.3], [0.4, 0.9]]]])  # (2,1,2,2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    loss = DiceSegLoss()(make_outputs(torch.logit(probs)), make_batch(target))
    inter = 0.5 + 0.8 + 0.9
    sq_p = sum(v * v for v in [0.5, 0.8, 0.1, 0.2, 0.6, 0.3, 0.4, 0.9])
    expected = 1 - 2 * inter / (sq_p + 3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # one Dice over the mini-batch (Eq. 3), not the mean of per-image Dices
    per_image = [1 - 2 * 1.3 / (0.25 + 0.64 + 0.01 + 0.04 + 2), 1 - 2 * 0.9 / (0.36 + 0.09 + 0.16 + 0.81 + 1)]
    assert abs(loss.item() - sum(per_image) / 2) > 1e-3


def test_dice_cls_uses_presence_probabilities():
    presence_p = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.6, 0.05]])
    present = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    outputs = {"presence": torch.logit(presence_p)}
    batch = {"lesion_present": present, "mask_valid": torch.ones(2, 3)}
    inter = 0.9 + 0.7 + 0.6
    expected = 1 - 2 * inter / (float((presence_p ** 2).sum()) + 3)
    assert DiceClsLoss()(outputs, batch).item() == pytest.approx(expected, rel=1e-5)


def test_dual_loss_is_the_lambda_mix_of_its_parts():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    batch = make_batch((torch.rand(2, 3, 6, 6) > 0.7).float())
    outputs = make_outputs(logits)
    total, parts = DualLoss()(outputs, batch)
    seg = DiceSegLoss()(outputs, batch)
    clf = DiceClsLoss()(outputs, batch)
    assert parts["seg"].item() == pytest.approx(seg.item())
    assert parts["clf"].item() == pytest.approx(clf.item())
    assert total.item() == pytest.approx(0.8 * seg.item() + 0.2 * clf.item(), rel=1e-6)
    with pytest.raises(ValueError, match="lam"):
        DualLoss(lam=1.5)


def test_table2_small_missed_blob_moves_classification_much_more_than_segmentation():
    """Paper Table 2: adding a small false blob barely changes loss_seg but raises loss_clf to ~1/3."""
    m, size = 8, 64
    truth = torch.zeros(1, m, size, size)
    truth[0, 1, 10:40, 10:40] = 1.0  # one large iHE region, no other lesion
    batch = make_batch(truth)
    # prediction 1: the large region, slightly too small on two sides (imprecise boundary)
    pred = torch.full((1, m, size, size), -BIG)
    pred[0, 1, 12:40, 12:40] = BIG
    # prediction 2: the same plus a 3x3 false blob of hard exudate
    pred_blob = pred.clone()
    pred_blob[0, 2, 50:53, 50:53] = BIG
    dual = DualLoss()
    total_1, parts_1 = dual(make_outputs(pred), batch)
    total_2, parts_2 = dual(make_outputs(pred_blob), batch)
    # hand computation: |T| = 900, |P| = 784 (+9), |P n T| = 784
    assert parts_1["seg"].item() == pytest.approx(1 - 2 * 784 / (784 + 900), abs=1e-5)
    assert parts_2["seg"].item() == pytest.approx(1 - 2 * 784 / (793 + 900), abs=1e-5)
    assert parts_1["clf"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts_2["clf"].item() == pytest.approx(1 - 2 * 1 / (2 + 1), abs=1e-5)  # 1/3, cf. 0.3325
    seg_change = (parts_2["seg"] - parts_1["seg"]).item()
    clf_change = (parts_2["clf"] - parts_1["clf"]).item()
    assert 0 < seg_change < 0.01
    assert clf_change > 50 * seg_change
    assert (total_2 - total_1).item() > 10 * seg_change


def _all_losses():
    return [DiceSegLoss(), DiceClsLoss(), DualLoss(), WeightedBCELoss(), FocalLoss(), DualLossSchedule()]


@pytest.mark.parametrize("loss", _all_losses(), ids=lambda l: type(l).__name__)
def test_unannotated_lesions_do_not_affect_value_or_gradient(loss):
    torch.manual_seed(1)
    b, m, h, w = 2, 8, 8, 8
    masks = (torch.rand(b, m, h, w) > 0.8).float()
    valid = torch.ones(b, m)
    valid[:, 4:] = 0.0  # e.g. IDRiD annotates only 4 of the 8 lesions
    valid[1, 0] = 0.0  # and per image: a lesion missing in one image's dataset
    excluded = (valid == 0)[:, :, None, None].expand(b, m, h, w)

    def value(logits, target):
        result = loss(make_outputs(logits), make_batch(target, valid))
        return result[0] if isinstance(result, tuple) else result

    logits = torch.randn(b, m, h, w, requires_grad=True)
    base = value(logits, masks)
    base.backward()
    assert logits.grad[excluded].abs().max() == 0
    assert logits.grad[~excluded].abs().max() > 0
    # whatever is predicted for, or written in, excluded channels leaves the value unchanged
    other_logits = torch.where(excluded, torch.full_like(logits, 25.0), logits.detach())
    other_masks = torch.where(excluded, 1.0 - masks, masks)
    assert value(other_logits, other_masks).item() == pytest.approx(base.item(), abs=1e-6)


def test_focal_loss_matches_torchvision():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5, 5)
    masks = (torch.rand(2, 3, 5, 5) > 0.7).float()
    ours = FocalLoss(alpha=0.8, gamma=2.0)(make_outputs(logits), make_batch(masks))
    ref = sigmoid_focal_loss(logits, masks, alpha=0.8, gamma=2.0, reduction="mean")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    valid = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    masked = FocalLoss()(make_outputs(logits), make_batch(masks, valid))
    per_element = sigmoid_focal_loss(logits, masks, alpha=0.8, gamma=2.0, reduction="none")
    keep = valid.bool()
    assert masked.item() == pytest.approx(per_element[keep].mean().item(), rel=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.8, 2.0), (0.25, 0.0), (1.0, 3.5)])
def test_focal_loss_equals_the_written_out_formula(alpha, gamma):
    """Lin et al. 2017, Eq. 5: FL = -alpha_t (1 - p_t)^gamma log(p_t), the body FocalLoss had before
    it called torchvision; averaged over annotated (image, lesion) pairs only."""
    torch.manual_seed(5)
    logits = 4 * torch.randn(2, 3, 6, 6)
    masks = (torch.rand(2, 3, 6, 6) > 0.6).float()
    valid = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    p_t = torch.where(masks == 1, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
    log_p_t = torch.where(masks == 1, F.logsigmoid(logits), F.logsigmoid(-logits))
    alpha_t = torch.where(masks == 1, torch.tensor(alpha), torch.tensor(1 - alpha))
    formula = -alpha_t * (1 - p_t) ** gamma * log_p_t
    expected = formula[valid.bool()].mean()
    ours = FocalLoss(alpha=alpha, gamma=gamma)(make_outputs(logits), make_batch(masks, valid))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_weighted_bce_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])  # (1,1,2,2)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # 1 positive, 3 negatives -> weight 3

    def bce(z, t):
        p = 1 / (1 + math.exp(-z))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (3 * bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0) + bce(-3.0, 0)) / 4
    assert WeightedBCELoss()(make_outputs(logits), make_batch(masks)).item() == pytest.approx(expected, rel=1e-6)
    ref = F.binary_cross_entropy_with_logits(logits, masks, pos_weight=torch.tensor([3.0])[:, None, None])
    assert expected == pytest.approx(ref.item(), rel=1e-6)
    # a batch without positives still penalises false alarms (negatives keep weight 1)
    empty = torch.zeros_like(masks)
    plain = F.binary_cross_entropy_with_logits(logits, empty)
    assert WeightedBCELoss()(make_outputs(logits), make_batch(empty)).item() == pytest.approx(plain.item(), rel=1e-6)
    # fixed and capped weights
    fixed = WeightedBCELoss(pos_weight=[10.0])(make_outputs(logits), make_batch(masks))
    assert fixed.item() == pytest.approx((10 * bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0) + bce(-3.0, 0)) / 4, rel=1e-6)
    capped = WeightedBCELoss(max_pos_weight=2.0)(make_outputs(logits), make_batch(masks))
    assert capped.item() == pytest.approx((2 * bce(2.0, 1) + bce(-1.0, 0) + bce(0.5, 0) + bce(-3.0, 0)) / 4, rel=1e-6)


def test_weighted_bce_counts_each_lesion_separately():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0, 0, 0] = 1.0  # lesion 0: 1 of 4 positive -> weight 3
    masks[0, 1, :, 0] = 1.0  # lesion 1: 2 of 4 positive -> weight 1
    weights = WeightedBCELoss().class_weights(masks, torch.ones(1, 2, 1, 1))
    assert weights.flatten().tolist() == [3.0, 1.0]


def test_dual_loss_schedule_switches_at_first_lr_drop():
    torch.manual_seed(3)
    outputs = make_outputs(torch.randn(1, 2, 4, 4))
    batch = make_batch((torch.rand(1, 2, 4, 4) > 0.5).float())
    schedule = DualLossSchedule()
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=1)
    callback = schedule.watch(optimizer)  # as train.fit calls it: after the epoch's scheduler step
    phases = []
    for epoch, score in enumerate([0.5, 0.6, 0.6, 0.6, 0.6, 0.7]):  # stalls after the second validation
        plateau.step(score)
        callback(epoch, {}, None)
        phases.append(schedule.phase)
    assert phases == ["seg", "seg", "seg", "dual", "dual", "dual"]
    total, parts = schedule(outputs, batch)
    ref_total, _ = DualLoss()(outputs, batch)
    assert total.item() == pytest.approx(ref_total.item()) and set(parts) == {"seg", "clf"}
    fresh = DualLossSchedule()
    assert fresh.observe_lr(1e-3) is False and isinstance(fresh.loss, DiceSegLoss)
    seg_total, seg_parts = fresh(outputs, batch)
    assert seg_total.item() == pytest.approx(DiceSegLoss()(outputs, batch).item()) and set(seg_parts) == {"seg"}
    assert fresh.observe_lr(1e-4) is True and isinstance(fresh.loss, DualLoss)
    assert fresh.observe_lr(1e-3) is False and fresh.phase == "dual"  # the switch is permanent
    with pytest.raises(ValueError, match="lr"):
        fresh.observe_lr(0.0)
    resumed = DualLossSchedule()
    resumed.load_state_dict(fresh.state_dict())
    assert resumed.phase == "dual" and resumed.initial_lr == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="phase"):
        resumed.load_state_dict({"phase": "warmup", "initial_lr": 1e-3})


def test_multitask_loss_weights_and_names_parts():
    torch.manual_seed(4)
    outputs = make_outputs(torch.randn(2, 3, 4, 4))
    outputs["dr"] = torch.randn(2, 5)
    batch = make_batch((torch.rand(2, 3, 4, 4) > 0.5).float())
    batch["dr"] = torch.tensor([0, 3])

    def grading(out, b):
        return F.cross_entropy(out["dr"], b["dr"])

    combined = MultiTaskLoss({"dr": (grading, 1.0), "lesion": (DualLoss(), 0.5)})
    total, parts = combined(outputs, batch)
    dual_total, dual_parts = DualLoss()(outputs, batch)
    assert total.item() == pytest.approx(grading(outputs, batch).item() + 0.5 * dual_total.item(), rel=1e-6)
    assert set(parts) == {"dr", "lesion", "lesion/seg", "lesion/clf"}
    assert parts["lesion/clf"].item() == pytest.approx(dual_parts["clf"].item())
    with pytest.raises(ValueError, match="weight"):
        MultiTaskLoss({"dr": (grading, -1.0)})
    with pytest.raises(ValueError, match="at least one"):
        MultiTaskLoss({})


def test_bad_inputs_raise_clear_errors():
    outputs = make_outputs(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="masks"):
        DiceSegLoss()(outputs, make_batch(torch.zeros(1, 2, 3, 3)))
    with pytest.raises(KeyError, match="mask_valid"):
        DiceSegLoss()(outputs, {"masks": torch.zeros(1, 2, 4, 4)})
    with pytest.raises(ValueError, match="mask_valid"):
        FocalLoss()(outputs, make_batch(torch.zeros(1, 2, 4, 4), torch.ones(1, 3)))
    with pytest.raises(ValueError, match="pos_weight"):
        WeightedBCELoss(pos_weight=[1.0, 2.0, 3.0])(outputs, make_batch(torch.zeros(1, 2, 4, 4)))


def test_total_variation_matches_hand_computation_and_is_zero_on_constants():
    image = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])  # (1, 1, 2, 3)
    vertical = (2.0 ** 2 + 1.0 ** 2 + 1.0 ** 2) / 3  # rows differ by 2, 1, -1
    horizontal = (1.0 + 4.0 + 0.0 + 0.0) / 4  # steps 1, 2 in row 0; 0, 0 in row 1
    assert total_variation_loss(image).item() == pytest.approx(vertical + horizontal)
    assert total_variation_loss(torch.full((2, 3, 5, 4), 0.7)).item() == 0.0
    with pytest.raises(ValueError, match="H, W >= 2"):
        total_variation_loss(torch.zeros(1, 3, 1, 4))
