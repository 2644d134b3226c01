"""Segmentation, classification and multi-task losses (Wei et al., ICPR 2020, Eq. 2-4; Table 4).

Every loss is a callable ``loss(outputs, batch)`` reading named model outputs and batch keys:

- ``outputs["masks"]``: lesion-map **logits** (B, m, H, W);
- ``outputs["presence"]``: image-level lesion-presence **logits** (B, m), i.e. the global max of the
  mask logits. Because the sigmoid is monotone, ``sigmoid(presence)`` is exactly the global max of
  the probability maps, ``P_j`` of Eq. 1;
- ``batch["masks"]`` (B, m, H, W) in {0, 1}, ``batch["lesion_present"]`` (B, m) in {0, 1};
- ``batch["mask_valid"]`` (B, m): 0 where a lesion is not annotated by the image's dataset (IDRiD
  annotates 4 of the 8 lesions). Those (image, lesion) pairs are removed from every sum: their
  predictions change neither the loss value nor receive any gradient.

Plain losses return a scalar tensor; combined losses (:class:`DualLoss`, :class:`DualLossSchedule`,
:class:`MultiTaskLoss`) return ``(total, parts)`` with ``parts`` a dict of detached scalars for logging.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

LossOutput = Union[Tensor, tuple[Tensor, dict[str, Tensor]]]
LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], LossOutput]

DUAL_LAMBDA = 0.8  # Eq. 2, chosen by the paper on a held-out validation set


def _require(container: Mapping[str, Tensor], key: str, where: str) -> Tensor:
    if key not in container:
        raise KeyError(f"{where} has no key {key!r} (keys present: {sorted(container)})")
    return container[key]


def _valid_weights(batch: Mapping[str, Tensor], reference: Tensor) -> Tensor:
    """``batch["mask_valid"]`` as a float (B, m) tensor on the reference tensor's device."""
    valid = _require(batch, "mask_valid", "batch").to(device=reference.device, dtype=reference.dtype)
    if valid.shape != reference.shape[:2]:
        raise ValueError(f"batch['mask_valid'] must have shape {tuple(reference.shape[:2])} "
                         f"(batch, lesions), got {tuple(valid.shape)}")
    return valid


def _pixel_inputs(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, target, valid) for pixel-wise losses, with valid broadcastable to (B, m, H, W)."""
    logits = _require(outputs, "masks", "outputs")
    target = _require(batch, "masks", "batch").to(device=logits.device, dtype=logits.dtype)
    if target.shape != logits.shape:
        raise ValueError(f"batch['masks'] has shape {tuple(target.shape)} but outputs['masks'] has "
                         f"{tuple(logits.shape)}; they must match (B, m, H, W)")
    return logits, target, _valid_weights(batch, logits)[:, :, None, None]


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over valid elements (``valid`` broadcasts); 0 when nothing is valid."""
    weights = valid.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def soft_dice_loss(probs: Tensor, target: Tensor, valid: Tensor, smooth: float = 1e-6) -> Tensor:
    """``1 - 2 sum(p t) / (sum(p^2) + sum(t^2))`` over all valid elements of the mini-batch (Eq. 3, 4).

    The sums run jointly over images, lesions and pixels (one Dice for the whole batch, not a mean
    of per-image Dices), as in the paper. ``valid`` (broadcastable to ``probs``) zeroes excluded
    elements; ``smooth`` keeps the empty case (no positives predicted or present) at 0 instead of NaN.
    """
    weights = valid.expand_as(probs)
    intersection = (weights * probs * target).sum()
    denominator = (weights * probs.square()).sum() + (weights * target.square()).sum()
    return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def total_variation_loss(images: Tensor) -> Tensor:
    """Squared total variation: mean squared difference of vertical neighbours plus that of horizontal ones.

    ``mean((x[i+1, j] - x[i, j])^2) + mean((x[i, j+1] - x[i, j])^2)`` over a (B, C, H, W) batch, a
    smoothness prior on generated images (DeepMT-DR's SR loss; the SRGAN-style code it comes from
    has an extra factor 2).
    """
    if images.ndim != 4 or min(images.shape[-2:]) < 2:
        raise ValueError(f"images must be a (B, C, H, W) tensor with H, W >= 2, got shape {tuple(images.shape)}")
    vertical = (images[:, :, 1:, :] - images[:, :, :-1, :]).square().mean()
    horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).square().mean()
    return vertical + horizontal


class DiceSegLoss:
    """Pixel-level Dice loss over the mini-batch (Eq. 3): ``loss_seg``."""

    def __init__(self, smooth: float = 1e-6) -> None:
        self.smooth = smooth

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        logits, target, valid = _pixel_inputs(outputs, batch)
        return soft_dice_loss(torch.sigmoid(logits), target, valid, self.smooth)


class DiceClsLoss:
    """Image-level Dice loss on global-max-pooled presence ``P`` vs truth ``T`` (Eq. 4): ``loss_clf``.

    Both ``P`` and ``T`` are maxima over pixels, so the loss does not depend on lesion size: a
    single missed (or hallucinated) blob of any size moves it as much as a large one.
    """

    def __init__(self, smooth: float = 1e-6) -> None:
        self.smooth = smooth

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        logits = _require(outputs, "presence", "outputs")
        target = _require(batch, "lesion_present", "batch").to(device=logits.device, dtype=logits.dtype)
        if target.shape != logits.shape:
            raise ValueError(f"batch['lesion_present'] has shape {tuple(target.shape)} but "
                             f"outputs['presence'] has {tuple(logits.shape)}; they must match (B, m)")
        return soft_dice_loss(torch.sigmoid(logits), target, _valid_weights(batch, logits), self.smooth)


class DualLoss:
    """``lambda * loss_seg + (1 - lambda) * loss_clf`` (Eq. 2, lambda = 0.8); returns (total, parts)."""

    def __init__(self, lam: float = DUAL_LAMBDA, smooth: float = 1e-6) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        self.lam = lam
        self.seg = DiceSegLoss(smooth)
        self.clf = DiceClsLoss(smooth)

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        seg = self.seg(outputs, batch)
        clf = self.clf(outputs, batch)
        total = self.lam * seg + (1.0 - self.lam) * clf
        return total, {"seg": seg.detach(), "clf": clf.detach()}


class WeightedBCELoss:
    """Pixel-wise binary cross-entropy weighted against class imbalance (the WCE row of Table 4).

    Weighting: positive pixels of lesion ``j`` get weight ``w_j``, negative pixels weight 1, and the
    result is the mean over valid pixels. By default ``w_j = n_neg_j / n_pos_j`` counted over the
    valid pixels of the mini-batch (no gradient), so the rare lesion pixels (< 1 % in the paper's
    data) carry as much total weight as the background, as in class-balanced cross-entropy
    (HED, Xie & Tu 2015). Unlike HED's ``beta / (1 - beta)`` form, negatives keep weight 1, so a
    batch without any lesion ``j`` still penalises false alarms. ``pos_weight`` (length m, e.g.
    from training-set pixel counts) fixes the weights instead; ``max_pos_weight`` caps them, which
    keeps a batch holding one tiny microaneurysm from dominating the gradient.
    Equals ``F.binary_cross_entropy_with_logits(..., pos_weight=w)`` averaged over valid pixels.
    """

    def __init__(self, pos_weight: Sequence[float] | None = None, max_pos_weight: float | None = None) -> None:
        if pos_weight is not None and any(float(w) <= 0 for w in pos_weight):
            raise ValueError(f"pos_weight entries must be positive, got {list(pos_weight)}")
        if max_pos_weight is not None and max_pos_weight < 1:
            raise ValueError(f"max_pos_weight must be >= 1, got {max_pos_weight}")
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.max_pos_weight = max_pos_weight

    def class_weights(self, target: Tensor, valid: Tensor) -> Tensor:
        """Positive-pixel weight per lesion, shape (1, m, 1, 1)."""
        if self.pos_weight is not None:
            if self.pos_weight.numel() != target.shape[1]:
                raise ValueError(f"pos_weight has {self.pos_weight.numel()} entries but the masks have "
                                 f"{target.shape[1]} lesion channels")
            weights = self.pos_weight.to(device=target.device, dtype=target.dtype)
        else:
            valid_pixels = valid.expand_as(target)
            n_pos = (valid_pixels * target).sum(dim=(0, 2, 3))
            n_neg = valid_pixels.sum(dim=(0, 2, 3)) - n_pos
            weights = n_neg / n_pos.clamp_min(1.0)
        if self.max_pos_weight is not None:
            weights = weights.clamp_max(self.max_pos_weight)
        return weights[None, :, None, None]

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        logits, target, valid = _pixel_inputs(outputs, batch)
        pixel_weight = 1.0 + (self.class_weights(target, valid) - 1.0) * target
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return _masked_mean(pixel_weight * bce, valid)


class FocalLoss:
    """Sigmoid focal loss (Lin et al. 2017) averaged over valid pixels; alpha 0.8, gamma 2 as in Table 4.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``alpha_t = alpha`` on positives and
    ``1 - alpha`` on negatives: ``torchvision.ops.sigmoid_focal_loss`` elementwise, averaged here over
    the pixels of annotated lesions only (which torchvision's reductions cannot express).
    """

    def __init__(self, alpha: float = 0.8, gamma: float = 2.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.alpha = alpha
        self.gamma = gamma

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        logits, target, valid = _pixel_inputs(outputs, batch)
        elementwise = sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="none")
        return _masked_mean(elementwise, valid)


class DualLossSchedule:
    """The paper's L-Net schedule: train with ``loss_seg``; from the first learning-rate drop on, use the dual loss.

    The schedule has to be told the learning rate: either call :meth:`observe_lr` after every
    scheduler step, or let :meth:`watch` do it inside ``train.fit``::

        schedule = DualLossSchedule()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.95, weight_decay=1e-4)
        fit(model, schedule, ..., optimizer=optimizer, scheduler=ReduceLROnPlateau(optimizer, "max", 0.1, 4),
            monitor="val_f1", callbacks=[schedule.watch(optimizer)])

    The first rate seen is the initial one; the first strictly smaller rate switches the phase
    from ``"seg"`` to ``"dual"`` for good. Monitor a metric rather than ``val_loss``: the loss
    value jumps at the switch. Calling the schedule always returns ``(total, parts)``; in the
    ``"seg"`` phase ``parts`` holds only ``"seg"``. :meth:`state_dict` / :meth:`load_state_dict`
    let ``fit`` checkpoint and resume the phase.
    """

    def __init__(self, lam: float = DUAL_LAMBDA, smooth: float = 1e-6) -> None:
        self.dual = DualLoss(lam, smooth)
        self.initial_lr: float | None = None
        self.phase = "seg"

    @property
    def loss(self) -> LossFn:
        """The loss of the current phase: :class:`DiceSegLoss` or :class:`DualLoss`."""
        return self.dual if self.phase == "dual" else self.dual.seg

    def observe_lr(self, lr: float) -> bool:
        """Record the current learning rate; return True exactly when this call switched to the dual loss."""
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if self.initial_lr is None:
            self.initial_lr = lr
            return False
        if self.phase == "seg" and lr < self.initial_lr:
            self.phase = "dual"
            return True
        return False

    def watch(self, optimizer: torch.optim.Optimizer) -> Callable[[int, dict, torch.nn.Module], None]:
        """Observe ``optimizer``'s rate now and return a ``fit`` callback ``(epoch, row, model)`` observing it after each epoch."""
        self.observe_lr(optimizer.param_groups[0]["lr"])

        def callback(epoch: int, row: dict, model: torch.nn.Module) -> None:
            self.observe_lr(optimizer.param_groups[0]["lr"])

        return callback

    def state_dict(self) -> dict[str, float | str | None]:
        return {"phase": self.phase, "initial_lr": self.initial_lr}

    def load_state_dict(self, state: Mapping[str, float | str | None]) -> None:
        if state.get("phase") not in ("seg", "dual"):
            raise ValueError(f"state['phase'] must be 'seg' or 'dual', got {state.get('phase')!r}")
        self.phase = str(state["phase"])
        self.initial_lr = None if state.get("initial_lr") is None else float(state["initial_lr"])

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.phase == "dual":
            return self.dual(outputs, batch)
        seg = self.dual.seg(outputs, batch)
        return seg, {"seg": seg.detach()}


class MultiTaskLoss:
    """Weighted sum of named losses: ``MultiTaskLoss({"dr": (ce, 1.0), "lesion": (dual, 0.5)})``.

    Each entry's loss may return a scalar or ``(total, parts)``; the combiner returns
    ``(sum_k w_k * loss_k, parts)`` where ``parts[name]`` is each unweighted loss and nested parts
    appear as ``"name/part"``, all detached for logging.
    """

    def __init__(self, losses: Mapping[str, tuple[LossFn, float]]) -> None:
        if not losses:
            raise ValueError("losses must name at least one (loss, weight) pair")
        for name, entry in losses.items():
            if not (isinstance(entry, Sequence) and len(entry) == 2 and callable(entry[0])):
                raise ValueError(f"losses[{name!r}] must be a (callable loss, weight) pair, got {entry!r}")
            if float(entry[1]) < 0:
                raise ValueError(f"losses[{name!r}] weight must be >= 0, got {entry[1]}")
        self.losses = {name: (fn, float(weight)) for name, (fn, weight) in losses.items()}

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for name, (fn, weight) in self.losses.items():
            result = fn(outputs, batch)
            value, sub_parts = result if isinstance(result, tuple) else (result, {})
            parts[name] = value.detach()
            parts.update({f"{name}/{key}": part for key, part in sub_parts.items()})
            total = weight * value if total is None else total + weight * value
        return total, parts
