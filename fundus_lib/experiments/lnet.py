"""L-Net and SiAN experiments (Wei et al., ICPR 2020): one function per paper table, tidy frames out.

Segmentation (Tables 3-5) is trained the way a CPU can afford without shrinking lesions away:
the images are made at ``seg_image_size`` (256 px in quick: a microaneurysm stays a few pixels
wide), L-Net trains on ``crop_size`` crops centred on lesion pixels (:class:`LesionCropLoader`,
every lesion class drawn equally often, so rare DR4 lesions are seen) with a short warm-up and one
learning-rate drop, and is validated and tested on whole images (:class:`SlidingWindow`: L-Net is
fully convolutional and reads them at the scale it trained at; images larger than
:data:`EVAL_WINDOW` are read in overlapping windows whose probabilities are averaged, as the paper
does for its patch-based baseline). One probability threshold per lesion is chosen on the
validation split (:func:`choose_thresholds`) and applied unchanged to the test split.

* :func:`lnet_runs` trains and scores every (variant, loss) pair over the seeds; :func:`variants`
  (Table 3 / 5 rows) and :func:`losses` (Table 4 rows) are views of it. Trained models are kept in
  :class:`SegData` so a run shared by two tables trains once and the notebook can draw its maps.
  The Dice and dual-loss runs are one run until the dual loss takes over: that prefix trains once.
  Every table trains its seeds side by side in ``seed_workers`` processes (:func:`~fundus_lib.experiments.common.map_seeds`).
* :func:`presence_classifier` is Table 5's segmentation-free classifier.
* :func:`grading` trains DR graders (Table 6: plain backbone, Lesion-Concat, SiAN) and
  :func:`sian_attention` the attention / fusion ablation (Table 7), with the majority baseline.

Metric names in the frames: ``pixel_f1`` and ``image_f1`` (means over the lesions present in the
test split), ``pixel_f1 · <lesion>`` and ``image_f1 · <lesion>`` per lesion; ``kappa`` and
``accuracy`` for graders.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import Tensor, nn

from fundus_lib import metrics
from fundus_lib.config import RunConfig
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.in_memory import TensorData
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.patches import crop_patches
from fundus_lib.data.pipeline import load_dataset, make_loaders
from fundus_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from fundus_lib.experiments.common import map_seeds, majority_scores, seed_workers, tidy
from fundus_lib.stats import paired_bootstrap
from fundus_lib.losses import (DiceClsLoss, DiceSegLoss, DualLossSchedule, FocalLoss, WeightedBCELoss,
                               soft_dice_loss)
from fundus_lib.models import build_model
from fundus_lib.models.backbones import build_backbone
from fundus_lib.models.lnet import LNet, predict_patches
from fundus_lib.models.sian import LesionConcat, SiAN
from fundus_lib.train import fit, predict
from fundus_lib.utils import choose_device, seed_everything

#: Table 4's losses. ``dual`` is the paper's schedule: Dice, then the dual loss after the first LR drop.
LOSSES: tuple[str, ...] = ("wce", "focal", "dice", "dual")
LOSS_LABELS: dict[str, str] = {"wce": "weighted cross-entropy", "focal": "focal loss", "dice": "Dice",
                               "dual": "dual loss"}
#: Initial lesion probability of every pixel: the head's bias starts at its logit (RetinaNet's prior).
LESION_PRIOR = 0.01
#: Largest side L-Net reads at once when validating and testing (larger images: overlapping windows).
EVAL_WINDOW = 512
#: Share of training crops centred on a lesion pixel; the rest are random crops inside the image.
LESION_CROP_SHARE = 0.8
N_GRADES = 5
#: Candidate probability thresholds of the lesion maps, one chosen per lesion on the validation split.
THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Share of the training steps over which the learning rate warms up linearly (short schedules).
WARMUP_SHARE = 0.05

#: Grader rows: name -> (kind, attention, fusion). Table 6 rows, then Table 7's ablation.
GRADERS: dict[str, tuple[str, str | None, str | None]] = {
    "plain": ("plain", None, None),
    "Lesion-Concat": ("concat", None, None),
    "SiAN": ("sian", "conv", "feature"),
    "SiAN · CW-MaxPool · feature maps": ("sian", "cw_maxpool", "feature"),
    "SiAN · Conv · input image": ("sian", "conv", "input"),
    "SiAN · CW-MaxPool · input image": ("sian", "cw_maxpool", "input"),
}
TABLE7_ROWS: tuple[str, ...] = ("SiAN", "SiAN · CW-MaxPool · feature maps", "SiAN · Conv · input image",
                                "SiAN · CW-MaxPool · input image")


def _weights(cfg: RunConfig) -> Any:
    return None if cfg.weights in (None, "none") else cfg.weights


@dataclass
class LesionCropLoader:
    """Training batches of ``size`` x ``size`` crops of a :class:`TensorData` split, for :func:`fit`.

    Each crop is centred (up to a random shift of a quarter crop) on a random pixel of one lesion,
    the lesion drawn uniformly among those the split contains, so a lesion in three images is
    trained on as often as one in every image; a share ``1 - lesion_share`` of the crops is placed
    uniformly at random instead (background, borders). Random horizontal and vertical flips.
    Yields ``image`` (normalised), ``masks``, ``lesion_present`` (of the crop) and ``mask_valid``.
    """

    data: TensorData
    size: int
    batch_size: int
    batches: int
    lesion_share: float = LESION_CROP_SHARE
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        side = self.data.images.shape[-1]
        if not isinstance(self.size, int) or not 8 <= self.size <= side:
            raise ValueError(f"crop_size must be an int in [8, {side}] (the image side), got {self.size!r}")
        for name in ("batch_size", "batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        masks = self.data.fields["masks"]
        present = masks.flatten(2).amax(dim=2) > 0  # (N, m)
        self.holders = {j: torch.nonzero(present[:, j]).flatten() for j in range(masks.shape[1]) if present[:, j].any()}
        self._pixels: dict[tuple[int, int], Tensor] = {}

    def __len__(self) -> int:
        return self.batches

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def _centre(self) -> tuple[int, int, int]:
        side = self.data.images.shape[-1]
        if not self.holders or float(torch.rand((), generator=self.generator)) >= self.lesion_share:
            return self._randint(len(self.data)), self._randint(side), self._randint(side)
        lesion = list(self.holders)[self._randint(len(self.holders))]
        image = int(self.holders[lesion][self._randint(len(self.holders[lesion]))])
        if (image, lesion) not in self._pixels:
            self._pixels[(image, lesion)] = torch.nonzero(self.data.fields["masks"][image, lesion])
        pixels = self._pixels[(image, lesion)]
        row, col = pixels[self._randint(len(pixels))].tolist()
        shift = self.size // 4
        return image, row + self._randint(2 * shift + 1) - shift, col + self._randint(2 * shift + 1) - shift

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        side, half = self.data.images.shape[-1], self.size // 2
        for _ in range(self.batches):
            picks = [self._centre() for _ in range(self.batch_size)]
            index = torch.tensor([p[0] for p in picks])
            # keep every crop inside the image: no zero padding the whole-image windows never see
            centres = np.array([[min(max(r, half), side - self.size + half), min(max(c, half), side - self.size + half)]
                                for _, r, c in picks])
            images = torch.cat([crop_patches(self.data.images[i], centres[k:k + 1], self.size)
                                for k, i in enumerate(index.tolist())]).float().div_(255)
            masks = torch.cat([crop_patches(self.data.fields["masks"][i], centres[k:k + 1], self.size)
                               for k, i in enumerate(index.tolist())]).float()
            flips = torch.rand(2, generator=self.generator) < 0.5
            for dim, flip in zip((-1, -2), flips.tolist()):
                if flip:
                    images, masks = images.flip(dim), masks.flip(dim)
            yield {"image": normalize(images, IMAGENET_MEAN, IMAGENET_STD), "masks": masks,
                   "lesion_present": masks.amax(dim=(2, 3)), "mask_valid": self.data.fields["mask_valid"][index]}


class SlidingWindow(nn.Module):
    """A segmenter trained on crops, applied to whole images (by overlapping sliding windows when larger).

    In training mode, or for inputs no larger than ``window``, ``forward`` is the wrapped net's. In
    eval mode, for larger inputs, it runs :func:`~fundus_lib.models.lnet.predict_patches` (``window`` x ``window`` windows every
    ``stride`` pixels, the last one flush with the border, probabilities averaged where windows
    overlap) and returns the same keys as an L-Net: ``masks`` (logits of the averaged
    probabilities) and ``presence`` (their global max, Eq. 1).
    """

    def __init__(self, net: nn.Module, window: int, stride: int | None = None) -> None:
        super().__init__()
        self.net, self.window, self.stride = net, int(window), int(stride or window // 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.training or x.shape[-1] <= self.window:
            return self.net(x)
        probs = predict_patches(self.net, x, window=self.window, stride=self.stride)
        logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
        return {"masks": logits, "presence": logits.amax(dim=(2, 3))}


@dataclass
class SegRun:
    """One trained segmenter: its configuration, the model, the history, test scores, the per-lesion
    thresholds chosen on the validation split, (optionally) the test probabilities, and ``counts``:
    true-positive, false-positive and false-negative pixels per test image and lesion (N, m, 3), from
    which any resample of the test images can recompute the pixel F1 (:func:`paired_pixel_f1`)."""

    variant: str
    loss: str
    seed: int
    model: nn.Module
    history: pd.DataFrame
    pixel_f1: pd.Series
    image_f1: pd.Series
    thresholds: pd.Series | None = None
    probs: np.ndarray | None = None
    counts: np.ndarray | None = None

    def masks(self) -> np.ndarray:
        """The kept test probabilities binarised at the per-lesion validation thresholds (N, m, H, W)."""
        if self.probs is None or self.thresholds is None:
            raise ValueError("this run kept no test probabilities: call lnet_run(..., keep_probs=True)")
        return _binary(self.probs, self.thresholds)


@dataclass
class SegData:
    """Everything the segmentation experiments share: the manifest at ``seg_image_size``, the
    in-memory splits, the whole-image val / test loaders, and every run trained so far."""

    cfg: RunConfig
    manifest: pd.DataFrame
    splits: dict[str, TensorData]
    loaders: dict[str, Any]
    device: torch.device
    runs: dict[tuple[str, str, int], SegRun] = field(default_factory=dict)
    #: scratch space for the checkpoints of shared training prefixes; removed with this object
    scratch: tempfile.TemporaryDirectory = field(default_factory=lambda: tempfile.TemporaryDirectory(prefix="lnet-"))

    @property
    def test_masks(self) -> np.ndarray:
        return self.splits["test"].fields["masks"].numpy() > 0

    @property
    def test_valid(self) -> np.ndarray:
        return self.splits["test"].fields["mask_valid"].numpy() > 0

    @property
    def present_lesions(self) -> list[str]:
        """Lesions with at least one annotated pixel in the test split (where F1 is defined)."""
        masks, valid = self.test_masks, self.test_valid
        return [l for j, l in enumerate(LESIONS) if (masks[:, j].any(axis=(1, 2)) & valid[:, j]).any()]

    @property
    def window(self) -> int:
        """Side of the training crops and test windows: ``crop_size``, or the whole image when that is smaller."""
        return min(int(self.cfg.crop_size), int(self.cfg.seg_image_size))

    @property
    def eval_window(self) -> int:
        """Side of the validation / test windows: whole images up to :data:`EVAL_WINDOW` px (cheaper than
        crop-sized windows, and each pixel sees its full context), windows of that size beyond."""
        return min(int(self.cfg.seg_image_size), max(self.window, EVAL_WINDOW))

    def crops(self, seed: int) -> LesionCropLoader:
        """A training crop loader whose draws depend only on ``seed``: ``crops_per_epoch`` crops per epoch
        (None: as many as training images, one pass's worth, as with whole images)."""
        cfg = self.cfg
        per_epoch = cfg.crops_per_epoch or len(self.splits["train"])
        return LesionCropLoader(self.splits["train"], size=self.window, batch_size=cfg.batch_size,
                                batches=max(1, -(-int(per_epoch) // cfg.batch_size)),
                                generator=torch.Generator().manual_seed(int(seed)))


def seg_data(cfg: RunConfig, manifest: pd.DataFrame | None = None) -> SegData:
    """Load (or make) the data at ``cfg.seg_image_size`` and hold every split in memory."""
    manifest = load_dataset(cfg, image_size=cfg.seg_image_size) if manifest is None else manifest
    tasks = ("masks", "lesion_present", "dr")
    splits = {split: TensorData(FundusDataset(manifest[manifest["split"] == split].reset_index(drop=True),
                                              tasks=tasks, image_size=cfg.seg_image_size))
              for split in ("train", "val", "test")}
    from fundus_lib.data.in_memory import TensorLoader
    loaders = {split: TensorLoader(splits[split], batch_size=max(1, cfg.batch_size // 4))
               for split in ("val", "test")}
    return SegData(cfg, manifest, splits, loaders, choose_device(cfg.device))


def build_lnet(cfg: RunConfig, variant: str) -> LNet:
    """L-Net-``variant`` on ``cfg.backbone`` with the lesion-prior bias on its last layer."""
    model = LNet(variant, n_lesions=len(LESIONS), backbone=cfg.backbone, weights=_weights(cfg))
    nn.init.constant_(model.decoder.head.bias, float(np.log(LESION_PRIOR / (1 - LESION_PRIOR))))
    return model


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum 0.95 (the paper, ``paper_schedule``) or Adam (short CPU runs from scratch)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # SiAN's frozen L-Net is left out
    if cfg.paper_schedule:
        return torch.optim.SGD(trainable, lr=cfg.lr, momentum=0.95, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)


def drop_epoch(epochs: int) -> int:
    """The epoch after which the short schedule divides the rate by 10 (and the dual loss takes over)."""
    return max(1, 2 * int(epochs) // 3)


def make_scheduler(cfg: RunConfig, epochs: int, steps_per_epoch: int) -> tuple[Any, str]:
    """The schedule and the interval ``fit`` steps it at: the paper's ÷10 after 4 validations without
    gain (per epoch), or for short runs from scratch a linear warm-up over the first
    :data:`WARMUP_SHARE` of the steps, then one ÷10 drop at the first epoch boundary after 2/3 of
    the epochs (per batch; the dual-loss schedule switches there, as at the paper's first drop)."""
    if cfg.paper_schedule:
        return (lambda optimizer, steps: torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=4)), "epoch"
    warmup = max(1, round(WARMUP_SHARE * epochs * steps_per_epoch))
    drop = drop_epoch(epochs) * steps_per_epoch

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * (0.1 if step >= drop else 1.0)

    return (lambda optimizer, steps: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)), "batch"


def train(cfg: RunConfig, model: nn.Module, loss: Any, train_loader: Any, val_loader: Any, *, epochs: int,
          metrics_fn: Callable, monitor: str, seed: int, desc: str, device: torch.device,
          stop_after: int | None = None, checkpoint_dir: Path | None = None, resume: bool = False) -> pd.DataFrame:
    """Train ``model`` with the profile's optimiser and schedule (``fit``) for ``epochs``; return the history
    (``attrs["seconds"]`` = wall time of this call). Model selection looks at the validation split only.

    ``stop_after`` ends the run early, after that epoch, on the schedule of ``epochs`` (a shared prefix,
    written to ``checkpoint_dir``); ``resume`` continues the run checkpointed in ``checkpoint_dir``."""
    optimizer = make_optimizer(cfg, model)
    # the dual-loss schedule reads the initial rate now, before the warm-up lowers it
    callbacks = [loss.watch(optimizer)] if isinstance(loss, DualLossSchedule) else []
    scheduler, interval = make_scheduler(cfg, epochs, len(train_loader))
    started = time.perf_counter()
    history = fit(model, loss, train_loader, val_loader, epochs=stop_after or epochs, optimizer=optimizer,
                  scheduler=scheduler, scheduler_interval=interval, metrics_fn=metrics_fn, monitor=monitor,
                  early_stopping_patience=cfg.patience, callbacks=callbacks, device=device,
                  compile=cfg.compile, desc=desc, progress=False, checkpoint_dir=checkpoint_dir, resume=resume)
    history.attrs["seconds"] = time.perf_counter() - started
    return history


def presence_scores(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean image-wise F1 over the lesions (Table 5's metric): presence = sigmoid(max-pooled logit) >= 0.5."""
    image = metrics.image_f1(expit(outputs["presence"]), targets["lesion_present"], targets["mask_valid"])
    return {"image_f1": float(np.nanmean(image))}


def lesion_scores(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Validation metrics of a segmenter: mean pixel F1, mean image F1, and their mean (``score``)."""
    pixel = float(np.nanmean(metrics.pixel_f1(expit(outputs["masks"]), targets["masks"], targets["mask_valid"])))
    image = presence_scores(outputs, targets)["image_f1"]
    return {"pixel_f1": pixel, "image_f1": image, "score": (pixel + image) / 2}


class PerLesionDiceLoss:
    """Eq. 3's soft Dice computed for each lesion over the mini-batch, then averaged over the lesions.

    The paper's Eq. 3 pools every lesion into one Dice (:class:`~fundus_lib.losses.DiceSegLoss`), so
    the lesions with the most pixels (large haemorrhages, exudate fields) dominate it and a lesion of a
    few pixels (MA) barely moves it. Averaging per-lesion Dices gives every lesion the same weight.
    ``smooth`` = 1 (one pixel) keeps a lesion absent from the batch well defined and still penalises
    its false positives (its Dice is then 1 / (1 + sum p^2)).
    """

    def __init__(self, smooth: float = 1.0) -> None:
        self.smooth = smooth

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        probs = torch.sigmoid(outputs["masks"])
        target = batch["masks"].to(device=probs.device, dtype=probs.dtype)
        valid = batch["mask_valid"].to(device=probs.device, dtype=probs.dtype)[:, :, None, None]
        return torch.stack([soft_dice_loss(probs[:, j], target[:, j], valid[:, j], self.smooth)
                            for j in range(probs.shape[1])]).mean()


def make_loss(cfg: RunConfig, name: str) -> Any:
    """The Table 4 loss ``name``; ``dice`` and the segmentation term of ``dual`` are the paper's pooled
    Dice (Eq. 3), or :class:`PerLesionDiceLoss` when ``cfg.dice_per_lesion``."""
    _check_names([name], LOSSES, "losses")
    per_lesion = bool(cfg.as_dict().get("dice_per_lesion"))
    seg = PerLesionDiceLoss() if per_lesion else DiceSegLoss()
    if name == "dual":
        schedule = DualLossSchedule(cfg.lam)
        schedule.dual.seg = seg
        return schedule
    return {"wce": WeightedBCELoss, "focal": FocalLoss}[name]() if name in ("wce", "focal") else seg


def _check_names(given: Sequence[str], allowed: Sequence[str], parameter: str) -> None:
    unknown = [name for name in given if name not in allowed]
    if unknown or not given:
        raise ValueError(f"{parameter} must be a non-empty list among {list(allowed)}, got {list(given)!r}")


def choose_thresholds(probs: np.ndarray, masks: np.ndarray, valid: np.ndarray) -> pd.Series:
    """Per lesion, the probability threshold of :data:`THRESHOLDS` with the best pixel F1 on the maps
    given — always the **validation** split's, never the test split's; 0.5 for a lesion with no
    annotated pixel there (nothing to choose from)."""
    scores = pd.DataFrame({t: metrics.pixel_f1(probs, masks, valid, threshold=t) for t in THRESHOLDS})
    annotated = (np.asarray(masks) > 0).any(axis=(2, 3)) & (np.asarray(valid) > 0)  # (N, m)
    best = scores.fillna(-1.0).idxmax(axis=1).astype(float)
    return best.where(annotated.any(axis=0), 0.5).rename("threshold")


def _binary(probs: np.ndarray, thresholds: pd.Series) -> np.ndarray:
    return probs >= thresholds.to_numpy(dtype=np.float32)[None, :, None, None]


#: Losses whose runs of one variant and seed coincide until the dual loss takes over: the dual schedule
#: trains with the Dice loss until its first rate drop.
SHARED_PREFIX_LOSSES: tuple[str, ...] = ("dice", "dual")


def _probs(data: SegData, model: nn.Module, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Whole-image lesion probabilities (N, m, H, W) of ``split`` and its targets."""
    outputs, targets = predict(model, data.loaders[split], device=data.device, keys=("masks",), progress=False)
    return expit(outputs["masks"]), targets


def _train_from_shared_prefix(data: SegData, model: nn.Module, variant: str, loss: str, seed: int,
                              **train_args: Any) -> pd.DataFrame:
    """Train ``model`` with ``loss`` (``dice`` or ``dual``) by continuing the prefix both losses share.

    The prefix (the epochs up to :func:`drop_epoch`) is trained once per variant and seed and
    checkpointed; each loss resumes from a copy of that checkpoint (``fit``'s resume restores the
    weights, optimiser, schedule, loss phase and every random state), which gives the same weights
    as a separate run from scratch at the cost of the epochs after the drop. The returned history
    covers every epoch; its ``attrs["seconds"]`` counts the prefix in the run that trained it.
    """
    cfg, scratch = data.cfg, Path(data.scratch.name)
    prefix, branch = scratch / f"{variant}-seed{seed}-prefix", scratch / f"{variant}-{loss}-seed{seed}"
    crops, prefix_seconds = data.crops(seed), 0.0
    if not (prefix / "last.pt").is_file():
        prefix_seconds = train(cfg, model, make_loss(cfg, "dual"), crops, data.loaders["val"], epochs=cfg.seg_epochs,
                               stop_after=drop_epoch(cfg.seg_epochs), checkpoint_dir=prefix, seed=seed,
                               **train_args).attrs["seconds"]
    shutil.copytree(prefix, branch)
    try:
        history = train(cfg, model, make_loss(cfg, loss), crops, data.loaders["val"], epochs=cfg.seg_epochs,
                        checkpoint_dir=branch, resume=True, seed=seed, **train_args)
    finally:
        shutil.rmtree(branch, ignore_errors=True)
    history.attrs["seconds"] += prefix_seconds
    return history


def lnet_run(data: SegData, variant: str, loss: str, seed: int, keep_probs: bool = False) -> SegRun:
    """Train (once; later calls reuse it) and test L-Net-``variant`` with ``loss`` and ``seed``.

    After training, one probability threshold per lesion is chosen on the validation split
    (:func:`choose_thresholds`) and applied unchanged to the test split, for the pixel masks and for
    presence (a lesion is present where any pixel clears its threshold: the global max of Eq. 1).
    With the short schedule (``paper_schedule`` off, whose drop epoch is known in advance) the Dice
    and dual-loss runs share their prefix (:func:`_train_from_shared_prefix`). ``keep_probs`` keeps
    the test probabilities (for figures), predicted again from the kept model if the run exists.
    """
    key = (variant, loss, int(seed))
    if key in data.runs:
        run = data.runs[key]
        if keep_probs and run.probs is None:
            run.probs = _probs(data, run.model, "test")[0].astype(np.float16)
        return run
    cfg = data.cfg
    seed_everything(int(seed))
    # L-Net is fully convolutional: validation and test read whole images (windows of data.eval_window,
    # overlapping by half, only where an image is larger) at the scale the crops were trained at
    model = SlidingWindow(build_lnet(cfg, variant), window=data.eval_window)
    train_args = dict(metrics_fn=lesion_scores, monitor="val_score", device=data.device,
                      desc=f"L-Net-{variant} · {loss} · seed {seed}")
    if loss in SHARED_PREFIX_LOSSES and not cfg.paper_schedule and drop_epoch(cfg.seg_epochs) < cfg.seg_epochs:
        history = _train_from_shared_prefix(data, model, variant, loss, int(seed), **train_args)
    else:
        history = train(cfg, model, make_loss(cfg, loss), data.crops(seed), data.loaders["val"],
                        epochs=cfg.seg_epochs, seed=seed, **train_args)
    val_probs, val_targets = _probs(data, model, "val")
    thresholds = choose_thresholds(val_probs, val_targets["masks"], val_targets["mask_valid"])
    probs, targets = _probs(data, model, "test")
    probs = probs.astype(np.float16)
    binary = _binary(probs, thresholds)
    pixel = metrics.pixel_f1(binary, targets["masks"], targets["mask_valid"])
    image = metrics.image_f1(binary.any(axis=(2, 3)), targets["lesion_present"], targets["mask_valid"])
    truth = targets["masks"] > 0
    counts = np.stack([(x).sum(axis=(2, 3)) for x in (binary & truth, binary & ~truth, ~binary & truth)], axis=-1)
    counts = counts * (targets["mask_valid"] > 0)[..., None]
    data.runs[key] = SegRun(variant, loss, int(seed), model, history, pixel, image, thresholds,
                            probs if keep_probs else None, counts)
    return data.runs[key]


def paired_pixel_f1(data: SegData, a: tuple[str, str], b: tuple[str, str], seeds: Sequence[int], *,
                    names: tuple[str, str]) -> Any:
    """Paired bootstrap (:func:`fundus_lib.stats.paired_bootstrap`) of the mean pixel F1 (over the lesions
    present in the test split) of run ``a`` minus run ``b`` — each a (variant, loss) pair trained over
    ``seeds`` — resampling test images and seeds: the F1 is recomputed on every resample from the
    per-image true-positive, false-positive and false-negative pixel counts."""
    lesions = [LESIONS.index(l) for l in data.present_lesions]
    stack = lambda pair: np.stack([lnet_run(data, *pair, seed).counts[:, lesions] for seed in seeds])

    def mean_f1(_: np.ndarray, c: np.ndarray) -> float:  # lesions with nothing true or predicted drop out
        tp, fp, fn = c.sum(axis=0).T
        denominator = 2 * tp + fp + fn
        return float(np.mean(2 * tp[denominator > 0] / denominator[denominator > 0]))

    first = stack(a)
    return paired_bootstrap(first, stack(b), metric=mean_f1, y_true=np.zeros(first.shape[1]), names=names,
                            metric_name="mean pixel F1", seed=int(seeds[0]))


def _seg_rows(run: SegRun, config: str, lesions: Sequence[str]) -> list[dict[str, Any]]:
    lesions = list(lesions)
    values = {"pixel_f1": float(run.pixel_f1[lesions].mean()), "image_f1": float(run.image_f1[lesions].mean())}
    for lesion in lesions:
        values[f"pixel_f1 · {lesion}"] = float(run.pixel_f1[lesion])
        values[f"image_f1 · {lesion}"] = float(run.image_f1[lesion])
    return [{"config": config, "seed": run.seed, "metric": metric, "value": value} for metric, value in values.items()]


def _lnet_runs_of_seed(cfg: RunConfig, manifest: pd.DataFrame, pairs: Sequence[tuple[str, str]],
                      seed: int) -> dict[tuple[str, str, int], SegRun]:
    """Worker of :func:`train_lnets`: every (variant, loss) pair for one seed, on the splits loaded afresh."""
    data = seg_data(cfg, manifest)
    for variant, loss in pairs:
        lnet_run(data, variant, loss, seed)
    return data.runs


def train_lnets(data: SegData, pairs: Sequence[tuple[str, str]], seeds: Sequence[int]) -> None:
    """Train every (variant, loss) pair of ``pairs`` not yet in ``data.runs`` over ``seeds``, the seeds side
    by side in ``seed_workers`` processes (:func:`~fundus_lib.experiments.common.map_seeds`; each seed's
    pairs in order, so the Dice and dual runs of a seed share their prefix)."""
    missing = [pair for pair in pairs if any((*pair, int(seed)) not in data.runs for seed in seeds)]
    if not missing:
        return
    workers = seed_workers(data.cfg)
    if workers <= 1 or len(seeds) <= 1:
        for seed in seeds:
            for variant, loss in missing:
                lnet_run(data, variant, loss, seed)
        return
    for runs in map_seeds(partial(_lnet_runs_of_seed, data.cfg, data.manifest, tuple(missing)), seeds, workers):
        data.runs.update({key: run for key, run in runs.items() if key not in data.runs})


def lnet_runs(data: SegData, pairs: Sequence[tuple[str, str]], seeds: Sequence[int],
              config: Callable[[str, str], str]) -> pd.DataFrame:
    """Train (:func:`train_lnets`) and score every (variant, loss) pair over ``seeds``; a tidy frame named
    by ``config(variant, loss)``."""
    train_lnets(data, pairs, seeds)
    lesions = data.present_lesions
    rows = []
    for variant, loss in pairs:
        for seed in seeds:
            rows += _seg_rows(lnet_run(data, variant, loss, seed), config(variant, loss), lesions)
    return tidy(rows)


def variants(data: SegData, variants: Sequence[str], seeds: Sequence[int], loss: str = "dual") -> pd.DataFrame:
    """Table 3 (pixel F1) and Table 5 (image F1) rows: L-Net-``variant`` trained with ``loss``."""
    from fundus_lib.models.lnet import VARIANTS
    _check_names(variants, tuple(VARIANTS), "variants")
    return lnet_runs(data, [(v, loss) for v in variants], seeds, lambda v, _: f"L-Net-{v}")


def losses(data: SegData, losses: Sequence[str], seeds: Sequence[int], variant: str = "16s") -> pd.DataFrame:
    """Table 4 rows: L-Net-``variant`` trained with each loss of ``losses``."""
    _check_names(losses, tuple(LOSSES), "losses")
    return lnet_runs(data, [(variant, l) for l in losses], seeds, lambda _, l: LOSS_LABELS[l])


def trivial_segmentation(data: SegData) -> pd.DataFrame:
    """The all-negative and all-positive baselines of Tables 3 and 5 as a tidy frame (seed = cfg.seed)."""
    masks, valid = data.test_masks, data.test_valid
    present = masks.any(axis=(2, 3))
    rows = []
    for name, fill in (("all-negative", 0.0), ("all-positive", 1.0)):
        pixel = metrics.pixel_f1(np.full(masks.shape, fill, dtype=np.float16), masks, valid)
        image = metrics.image_f1(np.full(present.shape, fill), present, valid)
        run = SegRun("-", "-", int(data.cfg.seed), nn.Identity(), pd.DataFrame(), pixel, image)
        rows += _seg_rows(run, name, data.present_lesions)
    return tidy(rows)


# ----------------------------------------------------------------------------- grading (Tables 5-7)

@dataclass
class GradeData:
    """The whole-image loaders at ``image_size`` for the graders and the segmentation-free classifier."""

    cfg: RunConfig
    loaders: dict[str, Any]
    train_grades: np.ndarray
    test_grades: np.ndarray
    device: torch.device


def grade_data(cfg: RunConfig) -> GradeData:
    """Loaders of the same images (same seeds, same scenes) made at ``cfg.image_size``."""
    manifest = load_dataset(cfg, image_size=cfg.image_size)
    loaders = make_loaders(manifest, ("masks", "lesion_present", "dr"), image_size=cfg.image_size,
                           batch_size=cfg.batch_size, num_workers=cfg.num_workers, data_path=cfg.data_path,
                           seed=cfg.seed, augment=cfg.paper_schedule)
    grades = {split: manifest.loc[manifest["split"] == split, "dr_grade"].astype(int).to_numpy()
              for split in ("train", "test")}
    return GradeData(cfg, loaders, grades["train"], grades["test"], choose_device(cfg.device))


class PresenceClassifier(nn.Module):
    """Segmentation-free lesion classifier (Table 5's "Inception-v3" row): backbone, GAP, FC to m presence logits."""

    def __init__(self, backbone: str, weights: Any, n_lesions: int = len(LESIONS)) -> None:
        super().__init__()
        self.encoder = build_backbone(backbone, weights=weights)
        self.fc = nn.Linear(self.encoder.out_channels, n_lesions)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.encoder(x)[self.encoder.stages[-1]]
        return {"presence": self.fc(features.mean(dim=(2, 3)))}


def _grade_seeds(grades: GradeData, fn: Callable[..., Any], seeds: Sequence[int], *args: Any) -> list[Any]:
    """``fn(grades, cfg, *args, seed)`` for every seed, side by side in ``seed_workers`` processes; a worker
    gets ``grades`` None and loads its own (:func:`grade_data`), in this process they are shared."""
    workers = seed_workers(grades.cfg)
    return map_seeds(partial(fn, grades if workers <= 1 else None, grades.cfg, *args), seeds, workers)


def _presence_of_seed(grades: GradeData | None, cfg: RunConfig, lesions: Sequence[str], seed: int) -> list[dict]:
    """One seed of :func:`presence_classifier` (``grades`` None: a worker process loads them afresh)."""
    grades = grade_data(cfg) if grades is None else grades
    seed_everything(int(seed))
    grades.loaders["train"].generator.manual_seed(int(seed))
    model = PresenceClassifier(cfg.backbone, _weights(cfg))
    train(cfg, model, DiceClsLoss(), grades.loaders["train"], grades.loaders["val"], epochs=cfg.seg_epochs,
          metrics_fn=presence_scores, monitor="val_image_f1", seed=seed, device=grades.device,
          desc=f"{cfg.backbone} lesion classifier · seed {seed}")
    outputs, targets = predict(model, grades.loaders["test"], device=grades.device, progress=False)
    image = metrics.image_f1(expit(outputs["presence"]), targets["lesion_present"], targets["mask_valid"])
    config = f"{cfg.backbone} classifier"
    return ([{"config": config, "seed": int(seed), "metric": "image_f1", "value": float(image[list(lesions)].mean())}]
            + [{"config": config, "seed": int(seed), "metric": f"image_f1 · {l}", "value": float(image[l])}
               for l in lesions])


def presence_classifier(grades: GradeData, seeds: Sequence[int], lesions: Sequence[str]) -> pd.DataFrame:
    """Table 5's segmentation-free row: the backbone trained on image-level lesion labels with the
    image-level Dice loss (Eq. 4), scored by image F1 on ``lesions``; seeds side by side in
    ``seed_workers`` processes."""
    return tidy([row for rows in _grade_seeds(grades, _presence_of_seed, seeds, tuple(lesions)) for row in rows])


def build_grader(cfg: RunConfig, name: str, lnet: LNet | None) -> nn.Module:
    """A grader of :data:`GRADERS` with ``lnet`` (frozen inside) as its side branch."""
    kind, attention, fusion = GRADERS[name]
    common = dict(n_classes=N_GRADES, backbone=cfg.backbone, weights=_weights(cfg))
    if kind == "plain":
        return build_model("individual", task="dr", backbone=cfg.backbone, n_dr=N_GRADES, weights=_weights(cfg))
    if kind == "concat":
        return LesionConcat(lnet, n_lesions=len(LESIONS), **common)
    return SiAN(lnet, attention=attention, fusion=fusion, n_lesions=len(LESIONS), **common)


def _grade_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    return F.cross_entropy(outputs["dr"], batch["dr"])


def grade_scores(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Quadratic kappa and accuracy of the arg-max grade."""
    predicted = np.asarray(outputs["dr"]).argmax(1)
    return {"kappa": metrics.quadratic_weighted_kappa(targets["dr"], predicted, n_classes=N_GRADES),
            "accuracy": metrics.accuracy(targets["dr"], predicted)}


def _grading_of_seed(grades: GradeData | None, cfg: RunConfig, side: nn.Module | None, rows: Sequence[str],
                     first_seed: int, seed: int) -> tuple[list[dict], dict[tuple[str, int], dict[str, np.ndarray]]]:
    """One seed of :func:`grading`: its tidy rows and its kept test outputs (``grades`` None: a worker
    process loads them afresh)."""
    grades = grade_data(cfg) if grades is None else grades
    frame, kept = [], {}
    for name in rows:
        seed_everything(int(seed))
        grades.loaders["train"].generator.manual_seed(int(seed))
        model = build_grader(cfg, name, side)
        history = train(cfg, model, _grade_loss, grades.loaders["train"], grades.loaders["val"],
                        epochs=cfg.grade_epochs, metrics_fn=grade_scores, monitor="val_kappa", seed=seed,
                        device=grades.device, desc=f"{name} · seed {seed}")
        outputs, targets = predict(model, grades.loaders["test"], device=grades.device, keys=("dr", "masks"),
                                   progress=False)
        scores = grade_scores(outputs, targets)
        frame += [{"config": name, "seed": int(seed), "metric": k, "value": v} for k, v in scores.items()]
        frame.append({"config": name, "seed": int(seed), "metric": "seconds", "value": history.attrs["seconds"]})
        kept[(name, int(seed))] = {"dr": outputs["dr"],
                                   **({"masks": outputs["masks"].astype(np.float16)} if "masks" in outputs
                                      and int(seed) == first_seed else {})}
    baseline = majority_scores(grades.train_grades, grades.test_grades, N_GRADES)
    frame += [{"config": "majority", "seed": int(seed), "metric": k, "value": v} for k, v in baseline.items()]
    return frame, kept


def grading(grades: GradeData, lnet: LNet | None, rows: Sequence[str], seeds: Sequence[int],
            keep: dict[tuple[str, int], dict[str, np.ndarray]] | None = None) -> pd.DataFrame:
    """Table 6 / 7 rows: every grader of ``rows`` (names of :data:`GRADERS`) trained with cross-entropy
    over ``seeds`` (the same data order and initialisation per seed: paired; seeds side by side in
    ``seed_workers`` processes), scored on the test split, plus the training split's majority class
    as ``majority`` (the trivial baseline). ``keep`` receives each run's test outputs (``dr`` logits,
    ``masks`` for the first seed) for figures."""
    _check_names(rows, tuple(GRADERS), "rows")
    side = lnet.net if isinstance(lnet, SlidingWindow) else lnet
    frame = []
    for rows_of_seed, kept in _grade_seeds(grades, _grading_of_seed, seeds, side, tuple(rows), int(seeds[0])):
        frame += rows_of_seed
        if keep is not None:
            keep.update(kept)
    return tidy(frame)


def paired_kappa(grades: GradeData, outputs: Mapping[tuple[str, int], Mapping[str, np.ndarray]], a: str, b: str,
                 seeds: Sequence[int]) -> Any:
    """Paired bootstrap (:func:`fundus_lib.stats.paired_bootstrap`) of quadratic kappa, grader ``a`` minus
    ``b``, from the test outputs :func:`grading` kept (``keep``): test images and seeds resampled
    together, the kappa recomputed on every resample."""
    grade = lambda name: np.stack([np.asarray(outputs[(name, int(s))]["dr"]).argmax(1) for s in seeds])
    kappa = lambda y, p: metrics.quadratic_weighted_kappa(y, p, n_classes=N_GRADES)
    return paired_bootstrap(grade(a), grade(b), metric=kappa, y_true=grades.test_grades, names=(a, b),
                            metric_name="quadratic kappa", seed=int(seeds[0]))


def sian_attention(grades: GradeData, lnet: LNet | None, seeds: Sequence[int],
                   rows: Sequence[str] = TABLE7_ROWS) -> pd.DataFrame:
    """Table 7: SiAN's attention (Conv, Eq. 7 vs CW-MaxPool, Eq. 6) x fusion (feature maps vs input image)."""
    return grading(grades, lnet, rows, seeds)


__all__ = ["LOSSES", "LOSS_LABELS", "GRADERS", "TABLE7_ROWS", "THRESHOLDS", "EVAL_WINDOW", "LesionCropLoader",
           "SlidingWindow", "SegRun", "SegData", "seg_data", "build_lnet", "make_optimizer", "drop_epoch", "make_scheduler",
           "train", "SHARED_PREFIX_LOSSES",
           "lesion_scores", "presence_scores", "PerLesionDiceLoss", "make_loss", "choose_thresholds", "lnet_run",
           "paired_pixel_f1", "train_lnets", "lnet_runs", "variants", "losses", "trivial_segmentation", "GradeData", "grade_data",
           "PresenceClassifier", "presence_classifier", "build_grader", "grade_scores", "grading", "paired_kappa",
           "sian_attention"]
