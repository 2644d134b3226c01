"""Notebook 15's experiments: DeepMT-DR's hierarchy (super-resolution -> lesion segmentation -> grading)
trained in its three stages, its baselines and its link ablations, one function per table or figure.

What is trained for one seed (:func:`train_seed`; everything is kept in a :class:`SeedRun` so every
table reads the same networks):

* **stage 1** (:class:`~fundus_lib.models.deepmt.Stage1Loss`): the SR net and the segmentation
  U-Net on LR -> SR, after ``sr_epochs`` of SR alone (MSE + TV; a warm-up of this project, not of
  the authors' code, so that a CPU schedule of a few epochs gets an SR net better than bicubic),
  at ``cfg.lr`` (the SR net at :data:`SR_LR_SHARE` of it);
* **the LR segmenter** (:func:`train_lr_segmenter`): the same U-Net trained on the LR image itself, for
  the row that grades LR directly (the stage-1 segmenter, trained on SR images, does not transfer to
  the 4x smaller image);
* **stage 2** (:class:`~fundus_lib.models.deepmt.Stage2Loss`, segmentation frozen): a grader for each
  *input* the table compares — LR directly, bicubic, SR, HR — on that input (the authors train this
  stage on HR only: here each grader learns on what it is tested on), and the attention fusion where
  a row has the attention link (:attr:`RowSpec.stage2_attention`);
* **stage 3** (:class:`~fundus_lib.models.deepmt.Stage3Loss`): the joint training with the
  task-aware feedback, starting from the SR grader of stage 2, for DeepMT-DR and each link removed.
  Stage 2 trains at ``cfg.grade_lr``, stage 3 at ``cfg.joint_lr`` (the SR net at :data:`SR_LR_SHARE` of each), their grading
  cross-entropy weighted by class or not (:func:`grade_class_weights`); each grader's last FC layer
  starts at zero (see :func:`_stage2_model`). Every stage follows :func:`one_cycle`.

The grading rows (:data:`GRADING_ROWS`) and how each is built are :data:`ROW_SPECS`. The 8 project
lesions are mapped to DeepMT-DR's 4 by :func:`~fundus_lib.models.deepmt.deepmt_masks` (HE pools every
haemorrhage). LR images are the bicubic (anti-aliased) down-samples of the HR images by ``lr_scale``
that :class:`~fundus_lib.data.datasets.FundusDataset` makes (x4 as in the paper, x8 as the authors'
scripts). Model selection looks at the validation split only; the test split is scored once.
"""
from __future__ import annotations

import copy
from functools import partial
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fundus_lib import explain, metrics
from fundus_lib.config import RunConfig
from fundus_lib.data.pipeline import available_tasks, make_loaders
from fundus_lib.experiments.common import map_seeds, majority_scores, seed_workers, tidy
from fundus_lib.models.deepmt import (LESIONS, DeepMT, SegmentationLoss, SRLoss, Stage1Loss, Stage2Loss, Stage3Loss,
                                      configure_stage, deepmt_masks)
from fundus_lib.stats import paired_bootstrap
from fundus_lib.train import fit, predict

LR, BICUBIC, SR_TWO_STAGE, DEEPMT = "LR directly", "bicubic", "SR, stages 1-2", "DeepMT-DR"
NO_LESION, NO_ATTENTION, NO_FEEDBACK, HR = "no lesion input", "no attention link", "no task feedback", "HR (upper bound)"
MAJORITY = "majority class"
#: Rows of the segmentation table that read the LR image: with the stage-1 segmenter (trained on SR images)
#: and with the LR segmenter (trained on LR images).
LR_INPUT, LR_SEGMENTER = "LR input", "LR input, U-Net trained on LR"
N_GRADES = 5


@dataclass(frozen=True)
class RowSpec:
    """How a grading row is built: the up-sampler, the image it reads, its links, and whether stage 3 runs."""

    upsampler: str
    input_key: str = "lr_image"
    lesion_input: bool = True
    attention: bool = True
    feedback: bool = True
    joint: bool = False

    @property
    def stage2(self) -> tuple[str, str, bool]:
        """Rows with the same key share one stage-2 grader (the attention and feedback switches do not
        change stage 2: its attention term trains the fusion module only)."""
        return self.upsampler, self.input_key, self.lesion_input

    @property
    def reads_lr(self) -> bool:
        """Whether the row grades the LR image itself (no up-sampler): its lesion maps then come from the
        segmenter trained on LR images (:func:`train_lr_segmenter`)."""
        return self.upsampler == "identity" and self.input_key == "lr_image"

    @property
    def stage2_attention(self) -> bool:
        """Whether the stage-2 grader of this row's key trains the attention fusion: when any row sharing it
        has the attention link."""
        return any(spec.attention for spec in ROW_SPECS.values() if spec.stage2 == self.stage2)


#: The rows without an SR net have no attention link: their maps would feed nothing (no SR net to send
#: feedback to, no stage 3) and stage 2's attention term trains the fusion module only, never the grader,
#: so leaving it out changes none of their grades and saves the Grad-CAM pass of every training step.
ROW_SPECS: dict[str, RowSpec] = {
    LR: RowSpec("identity", attention=False),
    BICUBIC: RowSpec("bicubic", attention=False),
    SR_TWO_STAGE: RowSpec("sr"),
    DEEPMT: RowSpec("sr", joint=True),
    NO_LESION: RowSpec("sr", lesion_input=False, joint=True),
    NO_ATTENTION: RowSpec("sr", attention=False, joint=True),
    NO_FEEDBACK: RowSpec("sr", feedback=False, joint=True),
    HR: RowSpec("identity", input_key="hr_image", attention=False),
}
GRADING_ROWS: tuple[str, ...] = tuple(ROW_SPECS)

#: Loss weights of the three stages (spec, "Losses and stages"); ``cfg.loss_weights`` overrides any of them.
LOSS_WEIGHTS: dict[str, float] = {
    "tv": 1e-6,                           # stages 1 and 3: total variation of the SR image
    "stage1_seg_consistency": 0.4,        # MSE(seg(SR), seg(HR))
    "stage2_attention": 1.0,              # MSE(fused attention, 1 - P(background))
    "stage3_seg_consistency": 1.0,
    "stage3_attention_consistency": 10.0,  # MSE(attention(SR), attention(HR))
    "stage3_attention_lesion": 0.3,       # MSE(attention(HR), 1 - P_bg(seg(HR)))
}


def loss_weights(cfg: RunConfig) -> dict[str, float]:
    """:data:`LOSS_WEIGHTS` updated with ``cfg.loss_weights``; an unknown or negative weight is an error."""
    given = dict(cfg.values.get("loss_weights") or {})
    unknown = sorted(set(given) - set(LOSS_WEIGHTS))
    if unknown:
        raise ValueError(f"loss_weights: unknown keys {unknown}; expected some of {sorted(LOSS_WEIGHTS)}")
    bad = {k: v for k, v in given.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0}
    if bad:
        raise ValueError(f"loss_weights: weights must be numbers >= 0, got {bad}")
    return {**LOSS_WEIGHTS, **{k: float(v) for k, v in given.items()}}


def check_sizes(image_size: int, lr_scale: int) -> None:
    """HR side ``image_size`` must be a multiple of 16 x ``lr_scale``: the U-Net pools four times, also on LR."""
    if lr_scale not in (2, 4, 8):
        raise ValueError(f"lr_scale must be 2, 4 or 8 (the SR net up-samples by x2 stages), got {lr_scale!r}")
    if image_size % (16 * lr_scale):
        raise ValueError(f"image_size={image_size} must be a multiple of 16 x lr_scale = {16 * lr_scale} "
                         "(the segmentation U-Net pools four times, and also runs on the LR image)")


def pair_loaders(cfg: RunConfig, manifest: pd.DataFrame, seed: int) -> dict:
    """Loaders of HR / LR pairs with DR grades (when the dataset has them) and lesion masks."""
    check_sizes(cfg.image_size, cfg.lr_scale)
    tasks = available_tasks(manifest, ("dr", "masks"), cfg.data_label) + ("hr_image", "lr_image")
    loaders = make_loaders(manifest, tasks=tasks, image_size=cfg.image_size, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, seed=seed, data_path=cfg.data_path)
    for loader in loaders.values():  # make_loaders builds its datasets with FundusDataset's default x4
        loader.dataset.lr_scale = cfg.lr_scale
    return loaders


class OnDeepMTLesions:
    """A DeepMT loss read on a batch whose 8 project lesion masks are mapped to DeepMT-DR's 4 and, with
    ``pool`` > 1, max-pooled by ``pool`` (the masks of the LR image: a pixel of it is a lesion pixel when
    any of the HR pixels it averages is one, so a microaneurysm smaller than an LR pixel is not lost)."""

    def __init__(self, loss, pool: int = 1) -> None:
        self.loss = loss
        self.pool = pool

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]):
        batch = dict(batch)
        if "masks" in batch:
            batch["masks"], batch["mask_valid"] = deepmt_masks(batch["masks"], batch.get("mask_valid"))
            if self.pool > 1:
                batch["masks"] = F.max_pool2d(batch["masks"], self.pool)
        return self.loss(outputs, batch)


def class_weights(labels: Sequence[int], n_classes: int = N_GRADES) -> list[float]:
    """Inverse class frequency, ``n / (K n_c)`` (a grade absent from training gets weight 1), as the
    authors' weighted cross-entropy (their constants are about this for DDR and IDRiD)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=n_classes)[:n_classes]
    return [float(len(labels) / (n_classes * c)) if c else 1.0 for c in counts]


def grade_class_weights(cfg: RunConfig, labels: Sequence[int]) -> list[float] | None:
    """The grading cross-entropy's class weights (stages 2 and 3): :func:`class_weights` of the training
    grades when ``cfg.class_weighted`` (the paper's weighted CE), else None (unweighted CE).

    Why the quick profile turns it off (validation split, seed 0, from-scratch graders of a few hundred
    steps): weighted by the inverse frequency (up to about 7 for the rarest grade) the graders' training
    loss climbed and they settled on a rare grade (accuracy below the majority class's), unweighted they
    learned; the numbers are in ``configs/15_deepmt_dr_multitask_low_resolution/quick.yaml``."""
    return class_weights(labels) if cfg.class_weighted else None


@dataclass
class SeedRun:
    """Everything trained for one seed: the stage-1 model, the LR segmenter (:func:`train_lr_segmenter`),
    one model per grading row, the histories (``"stage 1"``, ``"stage 1 · LR segmenter"``,
    ``"stage 2 · <row>"``, ``"stage 3 · <row>"``) and test predictions per name."""

    loaders: dict
    stage1: DeepMT
    lr_segmenter: DeepMT
    rows: dict[str, DeepMT] = field(default_factory=dict)
    stage2: dict[tuple[str, str, bool], DeepMT] = field(default_factory=dict)
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)
    predictions: dict[str, tuple[dict, dict]] = field(default_factory=dict)


def _grader_weights(cfg: RunConfig) -> str | None:
    weights = cfg.values.get("weights")
    return None if weights in (None, "none") else weights


#: The SR net's learning rate in stages 1 and 3, as a share of the stage's rate. The authors step the
#: SR net with its own optimiser; here it takes a fiftieth of the rate (4e-5 in stage 1 and 2e-5 in
#: stage 3 of the quick profile: the authors' own range, 1e-5 .. 5e-5) so that the segmentation and
#: grading gradients (Adam follows their direction, and they outweigh the MSE's) refine the warmed-up
#: SR net rather than overwrite it. Measured on the validation split (LR 16 -> HR 64, 160 training
#: images, 6 stage-1 epochs): at a tenth of the rate stage 1 took the SR net's SSIM from 0.837 after the
#: warm-up to 0.810, below bicubic's 0.813; at a fiftieth to 0.831, with the same lesion AUPRs.
SR_LR_SHARE = 0.02


def optimizer(model: torch.nn.Module, lr: float, sr_share: float = 1.0) -> torch.optim.Adam:
    """Adam over the trainable parameters at ``lr``, the SR net's at ``lr * sr_share``."""
    sr = {id(p) for p in model.upsampler.parameters()} if isinstance(model, DeepMT) else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in sr], "lr": lr},
              {"params": [p for p in trainable if id(p) in sr], "lr": lr * sr_share}]
    return torch.optim.Adam([group for group in groups if group["params"]])


def one_cycle(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The learning-rate schedule of every stage (a choice of this project: the authors keep Adam's rate
    constant): per batch, a warm-up over the first fifth of the steps to each group's rate, then a cosine
    decay (Smith's one-cycle). Not an isolated measurement: at LR 16 -> HR 64, 30 SR warm-up epochs end at
    about the same SSIM with it or at a constant rate; with it (and batch 16) the bicubic, SR and HR graders'
    training loss fell steadily over 8 epochs, where at a constant rate (batch 4) it rose in later epochs."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[group["lr"] for group in opt.param_groups],
                                               total_steps=total_steps, pct_start=0.2)


def _reseed_batches(loaders: dict, network: str) -> None:
    """Seed the training loader's generator (batch order and augmentation) from ``network``, a name unique
    to the network and seed (e.g. "stage 2 bicubic seed 0"): each network then sees the same batches
    whichever networks were trained before it, so adding, removing or reordering a grading row changes
    no other row's numbers (one shared generator would hand each network the state its predecessors left)."""
    loaders["train"].generator.manual_seed(int(np.random.SeedSequence(list(network.encode())).generate_state(1)[0]))


def _fit(cfg: RunConfig, model: torch.nn.Module, loss, loaders: dict, epochs: int, input_key: str,
         desc: str, stage: int, mask_pool: int = 1) -> pd.DataFrame:
    """Stage 1 at ``cfg.lr``, stage 2 at ``cfg.grade_lr``, stage 3 (fine-tuning the stage-2 model) at
    ``cfg.joint_lr``; the SR net at :data:`SR_LR_SHARE` of each; :func:`one_cycle` schedule; the weights of
    the epoch with the lowest validation loss are kept; lesion masks max-pooled by ``mask_pool``; batches
    drawn by :func:`_reseed_batches` from ``desc``."""
    _reseed_batches(loaders, desc)
    opt = optimizer(model, {1: cfg.lr, 2: cfg.grade_lr, 3: cfg.joint_lr}[stage], SR_LR_SHARE)
    return fit(model, OnDeepMTLesions(loss, mask_pool), loaders["train"], loaders.get("val"), epochs=epochs,
               optimizer=opt, scheduler=one_cycle, scheduler_interval="batch", input_key=input_key, device=cfg.device,
               compile=cfg.compile, monitor="val_loss", desc=desc)


def train_stage1(cfg: RunConfig, loaders: dict, seed: int) -> tuple[DeepMT, dict[str, pd.DataFrame]]:
    """SR warm-up (``sr_epochs``) and stage 1 (``seg_epochs``): the SR net and the segmenter."""
    weights = loss_weights(cfg)
    torch.manual_seed(seed)
    model = DeepMT(cfg.lr_scale, N_GRADES, seg_width=cfg.seg_width, grader_weights=_grader_weights(cfg))
    histories = {}
    if cfg.sr_epochs:  # the SR net alone, so at the whole stage-1 rate
        histories["SR warm-up"] = _fit(cfg, model.upsampler, SRLoss(tv=weights["tv"]), loaders, cfg.sr_epochs,
                                       "lr_image", f"SR warm-up seed {seed}", 1)
    configure_stage(model, 1)
    loss = Stage1Loss(model.hierarchy.segmenter, tv=weights["tv"], seg_consistency=weights["stage1_seg_consistency"])
    histories["stage 1"] = _fit(cfg, model, loss, loaders, cfg.seg_epochs, "lr_image", f"stage 1 seed {seed}", 1)
    return model, histories


def train_lr_segmenter(cfg: RunConfig, loaders: dict, seed: int) -> tuple[DeepMT, pd.DataFrame]:
    """The segmenter of the "LR directly" row: DeepMT-DR's U-Net trained on the LR image itself, with
    stage 1's segmentation loss (Dice + focal) against the lesion masks max-pooled to LR size
    (:class:`OnDeepMTLesions`), for ``seg_epochs`` at ``cfg.lr``. Returned inside a :class:`DeepMT` without
    an up-sampler, whose ``hierarchy`` reads the LR image.

    Why: each other grading row reads lesion maps of a segmenter trained at the size of its input (SR,
    bicubic and HR are all HR-size images). The stage-1 segmenter, trained on SR images, finds almost
    nothing on the 4x smaller LR image (the "LR input" row of the segmentation table: pixel AUPR near the
    prevalence), and a grader fed those maps stayed at the majority class in the quick profile. This
    project's choice for a fair LR baseline; the seed material does not say how the authors graded LR.
    At a fraction of stage 1's cost (no SR net, and the U-Net runs on lr_scale^2 times fewer pixels)."""
    torch.manual_seed(seed)
    model = DeepMT(cfg.lr_scale, N_GRADES, upsampler="identity", seg_width=cfg.seg_width)
    configure_stage(model, 1)
    history = _fit(cfg, model, SegmentationLoss(), loaders, cfg.seg_epochs, "lr_image",
                   f"LR segmenter seed {seed}", 1, mask_pool=cfg.lr_scale)
    return model, history


def _stage2_model(cfg: RunConfig, run: SeedRun, spec: RowSpec, seed: int) -> DeepMT:
    """A fresh grader (seeded) on the stage-1 SR net and segmenter (the LR segmenter for the row that
    reads the LR image itself, :attr:`RowSpec.reads_lr`).

    The grader's last FC layer starts at zero, so the untrained grader predicts uniform probabilities
    (the authors keep PyTorch's default initialisation): the spatial pyramid feeds 10752 max-pooled,
    positive features through FC 512 and dropout, and with default weights the first logits are
    large and noisy; measured on the synthetic benchmark, the training loss then grew for the first
    epochs at every Adam rate from 1e-4 to 2e-3, while from zero it falls from the first epoch.
    """
    torch.manual_seed(seed)
    model = DeepMT(cfg.lr_scale, N_GRADES, upsampler=spec.upsampler, lesion_input=spec.lesion_input,
                   seg_width=cfg.seg_width, grader_weights=_grader_weights(cfg))
    last = model.hierarchy.grader.head[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    segmenter = run.lr_segmenter if spec.reads_lr else run.stage1
    model.hierarchy.segmenter.load_state_dict(segmenter.hierarchy.segmenter.state_dict())
    if spec.upsampler == "sr":
        model.upsampler.load_state_dict(run.stage1.upsampler.state_dict())
    return model


def train_seed(cfg: RunConfig, manifest: pd.DataFrame, seed: int, rows: Sequence[str] = (),
               keep: MutableMapping[int, SeedRun] | None = None) -> SeedRun:
    """Train (or take from ``keep``) stage 1 and whatever ``rows`` of :data:`GRADING_ROWS` still need.

    Rows sharing a stage-2 key (:attr:`RowSpec.stage2`) share one stage-2 grader; each joint row
    continues a copy of it through stage 3 with its own links switched off or on.
    """
    unknown = [row for row in rows if row not in ROW_SPECS]
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; expected some of {list(ROW_SPECS)}")
    store = {} if keep is None else keep
    if seed not in store:
        loaders = pair_loaders(cfg, manifest, seed)
        stage1, histories = train_stage1(cfg, loaders, seed)
        lr_segmenter, histories["stage 1 · LR segmenter"] = train_lr_segmenter(cfg, loaders, seed)
        store[seed] = SeedRun(loaders, stage1, lr_segmenter, histories=histories)
    run = store[seed]
    todo = [row for row in rows if row not in run.rows]
    if not todo:
        return run
    if "dr" not in run.loaders["train"].dataset.tasks:
        raise ValueError(f"{cfg.data_label} has no DR grades: the grading rows {todo} cannot be trained")
    weights = loss_weights(cfg)
    cw = grade_class_weights(cfg, run.loaders["train"].dataset.manifest["dr_grade"].to_numpy())
    for row in todo:
        spec = ROW_SPECS[row]
        if spec.stage2 not in run.stage2:
            model = _stage2_model(cfg, run, spec, seed)
            configure_stage(model, 2)
            model.hierarchy.attention = spec.stage2_attention
            attention = weights["stage2_attention"] if spec.stage2_attention else 0.0
            run.histories[f"stage 2 · {row}"] = _fit(cfg, model, Stage2Loss(cw, attention=attention),
                                                     run.loaders, cfg.grade_epochs, spec.input_key,
                                                     f"stage 2 {row} seed {seed}", 2)
            run.stage2[spec.stage2] = model
        model = run.stage2[spec.stage2]
        if spec.joint:
            model = copy.deepcopy(model)
            model.hierarchy.attention, model.feedback = spec.attention, spec.feedback
            configure_stage(model, 3)
            on = 1.0 if spec.attention else 0.0
            loss = Stage3Loss(model.hierarchy, cw, tv=weights["tv"], seg_consistency=weights["stage3_seg_consistency"],
                              attention_consistency=on * weights["stage3_attention_consistency"],
                              attention_lesion=on * weights["stage3_attention_lesion"])
            torch.manual_seed(seed)
            run.histories[f"stage 3 · {row}"] = _fit(cfg, model, loss, run.loaders, cfg.epochs, spec.input_key,
                                                     f"stage 3 {row} seed {seed}", 3)
        run.rows[row] = model
    return run


def _trained_seed(cfg: RunConfig, manifest: pd.DataFrame, rows: Sequence[str], seed: int) -> SeedRun:
    """Worker of :func:`train_seeds`: one seed's stages, returned without its loaders (rebuilt where it lands)."""
    run = train_seed(cfg, manifest, seed, rows)
    run.loaders = {}
    return run


def train_seeds(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int], rows: Sequence[str] = (),
                keep: MutableMapping[int, SeedRun] | None = None) -> MutableMapping[int, SeedRun]:
    """:func:`train_seed` for every seed not yet in ``keep`` (``rows`` for each), the seeds side by side in
    ``seed_workers`` processes (:func:`~fundus_lib.experiments.common.map_seeds`); returns ``keep``, which
    the table functions below read. Seeds already in ``keep`` get their missing rows here, in order."""
    store = {} if keep is None else keep
    todo = [int(seed) for seed in seeds if int(seed) not in store]
    workers = seed_workers(cfg)
    if workers > 1 and len(todo) > 1:
        for seed, run in zip(todo, map_seeds(partial(_trained_seed, cfg, manifest, tuple(rows)), todo, workers)):
            run.loaders = pair_loaders(cfg, manifest, seed)
            store[seed] = run
    for seed in seeds:
        train_seed(cfg, manifest, int(seed), rows, keep=store)
    return store


#: Test predictions of the stage-1 networks: the whole stage-1 model on LR (SR + segmentation), its
#: segmenter alone on the HR image or on the LR image itself, and the LR segmenter on the LR image.
STAGE1_PREDICTIONS: dict[str, str] = {"stage 1": "lr_image", "stage 1 · HR": "hr_image", "stage 1 · LR": "lr_image",
                                      "stage 1 · LR segmenter": "lr_image"}


def test_predictions(cfg: RunConfig, run: SeedRun, name: str) -> tuple[dict, dict]:
    """(outputs, targets) on the test split of a grading row or of :data:`STAGE1_PREDICTIONS` (cached)."""
    if name not in run.predictions:
        if name in STAGE1_PREDICTIONS:
            models = {"stage 1": run.stage1, "stage 1 · LR segmenter": run.lr_segmenter.hierarchy}
            model = models.get(name, run.stage1.hierarchy)
            key = STAGE1_PREDICTIONS[name]
        elif name in run.rows:
            model, key = run.rows[name], ROW_SPECS[name].input_key
        else:
            raise KeyError(f"{name!r} was not trained for this seed; trained: {list(STAGE1_PREDICTIONS) + list(run.rows)}")
        run.predictions[name] = predict(model, run.loaders["test"], device=cfg.device, input_key=key, progress=False)
    return run.predictions[name]


# --------------------------------------------------------------------------------------------
# the tables
# --------------------------------------------------------------------------------------------

def _sr_candidates(cfg: RunConfig, run: SeedRun) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """The up-sampled test images of one seed by method (bicubic, the stage-1 SR net, and DeepMT-DR's SR
    net after stage 3 when it was trained) and the HR targets."""
    outputs, targets = test_predictions(cfg, run, "stage 1")
    lr = torch.as_tensor(test_predictions(cfg, run, "stage 1 · HR")[1]["lr_image"])  # the input is not a target
    candidates = {"bicubic": bicubic(lr, cfg.lr_scale).numpy(), "SR net (stage 1)": outputs["sr"]}
    if DEEPMT in run.rows:
        candidates["SR net (DeepMT-DR, stage 3)"] = test_predictions(cfg, run, DEEPMT)[0]["sr"]
    return candidates, torch.as_tensor(targets["hr_image"])


def sr_image_scores(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int],
                    keep: MutableMapping[int, SeedRun] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-image PSNR (dB) and SSIM on the test split: ``{metric: {method: (n_seeds, n_images)}}``, the
    input of :func:`bootstrap_table` (the same test images in the same order for every seed)."""
    store = {} if keep is None else keep
    scores: dict[str, dict[str, list]] = {"psnr": {}, "ssim": {}}
    for seed in seeds:
        candidates, hr = _sr_candidates(cfg, train_seed(cfg, manifest, seed, keep=store))
        for config, images in candidates.items():
            for name, fn in (("psnr", metrics.psnr), ("ssim", metrics.ssim)):
                scores[name].setdefault(config, []).append([fn(images[i:i + 1], hr[i:i + 1]) for i in range(len(hr))])
    return {name: {config: np.asarray(v) for config, v in by.items()} for name, by in scores.items()}


def super_resolution(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int],
                     keep: MutableMapping[int, SeedRun] | None = None) -> pd.DataFrame:
    """PSNR (dB) and SSIM on the test split (scikit-image via :mod:`fundus_lib.metrics`, mean over the
    images) of bicubic up-sampling and the stage-1 SR net, per seed; plus DeepMT-DR's SR net after
    stage 3 when it was trained."""
    scores = sr_image_scores(cfg, manifest, seeds, keep)
    return tidy({"config": config, "seed": seed, "metric": name, "value": float(values[i].mean())}
                for name, by in scores.items() for config, values in by.items() for i, seed in enumerate(seeds))


def bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic up-sampling clamped to [0, 1], as :class:`~fundus_lib.models.deepmt.BicubicUpsampler`."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def lesion_targets(targets: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The test split's DeepMT lesion masks (N, 4, H, W) and validity (N, 4) from a targets dict."""
    masks, valid = deepmt_masks(torch.as_tensor(targets["masks"]).float(),
                                torch.as_tensor(targets["mask_valid"]).float())
    return masks.numpy(), valid.numpy()


def segmentation(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int],
                 keep: MutableMapping[int, SeedRun] | None = None) -> pd.DataFrame:
    """Pixel AUPR per lesion (metric ``aupr_<lesion>``) against the HR-size masks: of the stage-1 segmenter
    reading the LR image itself, the SR image and the HR image, and of the LR segmenter
    (:func:`train_lr_segmenter`) reading the LR image (LR maps up-sampled bilinearly to HR size), beside
    the lesion's **pixel prevalence** on the test split (the AUPR of an uninformative score). A lesion
    without a pixel in the test split is left out (AUPR is undefined)."""
    store = {} if keep is None else keep
    rows = []
    for seed in seeds:
        run = train_seed(cfg, manifest, seed, keep=store)
        masks, valid = lesion_targets(test_predictions(cfg, run, "stage 1")[1])
        inputs = {LR_INPUT: "stage 1 · LR", LR_SEGMENTER: "stage 1 · LR segmenter", "SR input": "stage 1",
                  "HR input": "stage 1 · HR"}
        for config, name in inputs.items():
            lesions = torch.as_tensor(test_predictions(cfg, run, name)[0]["lesions"])
            if lesions.shape[-2:] != masks.shape[-2:]:
                lesions = F.interpolate(lesions, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            aupr = metrics.pixel_aupr(lesions.numpy(), masks, valid, lesions=LESIONS)
            rows += [{"config": config, "seed": seed, "metric": f"aupr_{k}", "value": v}
                     for k, v in aupr.items() if np.isfinite(v)]
        rows += [{"config": "pixel prevalence", "seed": seed, "metric": f"aupr_{k}", "value": v}
                 for k, v in prevalence(masks, valid).items() if v > 0]
    return tidy(rows)


def prevalence(masks: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Share of lesion pixels per lesion over the valid images: the AUPR of an uninformative score."""
    return {lesion: float(masks[valid[:, c] > 0, c].mean()) if (valid[:, c] > 0).any() else 0.0
            for c, lesion in enumerate(LESIONS)}


def grading(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int], rows: Sequence[str] = GRADING_ROWS,
            keep: MutableMapping[int, SeedRun] | None = None) -> pd.DataFrame:
    """Quadratic kappa (``kappa``) and accuracy of every grading row on the test split, per seed, plus
    the training split's :data:`MAJORITY` class (the trivial grader)."""
    records = []
    for seed, run, row, outputs, targets in _test_outputs(cfg, manifest, seeds, rows, keep):
        predicted = outputs["dr"].argmax(axis=1)
        records += [{"config": row, "seed": seed, "metric": "kappa",
                     "value": metrics.quadratic_weighted_kappa(targets["dr"], predicted, N_GRADES)},
                    {"config": row, "seed": seed, "metric": "accuracy",
                     "value": metrics.accuracy(targets["dr"], predicted)}]
        if row == rows[-1]:  # once per seed
            train = run.loaders["train"].dataset.manifest["dr_grade"].to_numpy()
            test = run.loaders["test"].dataset.manifest["dr_grade"].to_numpy()
            baseline = majority_scores(train, test, N_GRADES)
            records += [{"config": MAJORITY, "seed": seed, "metric": m, "value": baseline[m]}
                        for m in ("kappa", "accuracy")]
    return tidy(records)


def _test_outputs(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int], rows: Sequence[str],
                  keep: MutableMapping[int, SeedRun] | None) -> Iterator[tuple[int, SeedRun, str, dict, dict]]:
    """``(seed, run, row, outputs, targets)`` on the test split for every seed and row, in that order,
    training (or taking from ``keep``) whatever a seed still needs."""
    store = {} if keep is None else keep
    for seed in seeds:
        run = train_seed(cfg, manifest, seed, rows, keep=store)
        for row in rows:
            yield (seed, run, row, *test_predictions(cfg, run, row))


def grade_predictions(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int],
                      rows: Sequence[str] = GRADING_ROWS, keep: MutableMapping[int, SeedRun] | None = None
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predicted grades on the test split, ``{row: (n_seeds, n_images)}``, and the true grades (the same
    test images in the same order for every seed): the input of :func:`bootstrap_table`."""
    store = {} if keep is None else keep
    predicted: dict[str, list] = {row: [] for row in rows}
    truth = None
    for seed in seeds:
        run = train_seed(cfg, manifest, seed, rows, keep=store)
        for row in rows:
            outputs, targets = test_predictions(cfg, run, row)
            predicted[row].append(outputs["dr"].argmax(axis=1))
            if truth is None:
                truth = np.asarray(targets["dr"])
            elif not np.array_equal(truth, targets["dr"]):
                raise ValueError("the test split differs between seeds: predictions cannot be paired by image")
    return {row: np.stack(v) for row, v in predicted.items()}, truth


def kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Quadratic weighted kappa over the :data:`N_GRADES` grades (the metric of the grading table)."""
    return metrics.quadratic_weighted_kappa(y_true, y_pred, N_GRADES)


def bootstrap_table(values: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], metric_name: str, *,
                    metric=None, y_true: np.ndarray | None = None, n_resamples: int = 2000) -> pd.DataFrame:
    """One row per (a, b) pair: the difference a - b (mean over seeds), its 95 % interval from
    :func:`fundus_lib.stats.paired_bootstrap` over test images x seeds, and the verdict sentence.

    ``values`` maps a method to (n_seeds, n_images) per-image scores (compared by their mean) or, with
    ``metric`` and ``y_true``, to per-image predictions (``metric(y_true, predictions)`` on each resample)."""
    rows = []
    for a, b in pairs:
        c = paired_bootstrap(values[a], values[b], metric=metric, y_true=y_true, names=(a, b),
                             metric_name=metric_name, n_resamples=n_resamples)
        rows.append({"a": a, "b": b, "metric": metric_name, "difference": c.effect, "low": c.low, "high": c.high,
                     "seeds": c.n_seeds, "images": c.n_images, "verdict": c.verdict()})
    return pd.DataFrame(rows)


def attention_scores(cfg: RunConfig, manifest: pd.DataFrame, seeds: Sequence[int],
                     rows: Sequence[str] = (SR_TWO_STAGE, DEEPMT, NO_FEEDBACK),
                     keep: MutableMapping[int, SeedRun] | None = None) -> pd.DataFrame:
    """The fused attention ("pathological") maps scored against the true lesions (union of the 4) with
    :func:`fundus_lib.explain.saliency_scores`, averaged over the test images that have lesions:
    ``auc``, ``energy`` (share of the map's mass on lesions) and ``pointing_game``; the row
    ``uniform map`` is what a map without information scores (AUC 0.5, energy and pointing game =
    the lesion area fraction)."""
    without = [row for row in rows if not ROW_SPECS[row].attention]
    if without:
        raise ValueError(f"rows {without} have no attention link to score")
    records = []
    for seed, _, row, outputs, targets in _test_outputs(cfg, manifest, seeds, rows, keep):
        truth = lesion_targets(targets)[0].max(axis=1)
        scores = explain.saliency_scores(outputs["attention"][:, 0], truth).mean()
        records += [{"config": row, "seed": seed, "metric": m, "value": float(scores[m])}
                    for m in ("auc", "energy", "pointing_game")]
        if row == rows[-1]:  # once per seed
            area = truth.mean(axis=(1, 2))[truth.any(axis=(1, 2))].mean()
            records += [{"config": "uniform map", "seed": seed, "metric": m, "value": v}
                        for m, v in (("auc", 0.5), ("energy", area), ("pointing_game", area))]
    return tidy(records)


def lesion_contrast(hr: torch.Tensor, lr: torch.Tensor, masks: torch.Tensor, scale: int,
                    ring: int = 3) -> pd.DataFrame:
    """Why low resolution hurts grading, measured: per lesion, its contrast in the green channel (mean of
    a ``ring``-pixel band around it minus the mean on it; lesions are darker or brighter than their
    surround) in the HR image and in the LR image brought back by bicubic up-sampling, and the share
    of the contrast that survives. ``hr`` (N, 3, H, W), ``lr`` (N, 3, H/s, W/s), ``masks`` (N, 4, H, W)."""
    up = bicubic(lr, scale)
    rows = []
    for c, lesion in enumerate(LESIONS):
        mask = masks[:, c:c + 1] > 0
        if not mask.any():
            continue
        band = (F.max_pool2d(mask.float(), 2 * ring + 1, 1, ring) > 0) & ~(masks.amax(dim=1, keepdim=True) > 0)
        contrast = {name: float(image[:, 1:2][band].mean() - image[:, 1:2][mask].mean())
                    for name, image in (("HR", hr), ("LR, bicubic up", up))}
        rows.append({"lesion": lesion, "pixels": int(mask.sum()), "contrast HR": contrast["HR"],
                     "contrast LR": contrast["LR, bicubic up"],
                     "kept": contrast["LR, bicubic up"] / contrast["HR"] if contrast["HR"] else float("nan")})
    return pd.DataFrame(rows).set_index("lesion")


__all__ = ["LR", "BICUBIC", "SR_TWO_STAGE", "DEEPMT", "NO_LESION", "NO_ATTENTION", "NO_FEEDBACK", "HR", "MAJORITY",
           "LR_INPUT", "LR_SEGMENTER",
           "RowSpec", "ROW_SPECS", "GRADING_ROWS", "LOSS_WEIGHTS", "loss_weights", "check_sizes", "pair_loaders",
           "OnDeepMTLesions", "class_weights", "grade_class_weights", "SR_LR_SHARE", "optimizer", "one_cycle", "SeedRun", "train_stage1", "train_lr_segmenter", "train_seed", "train_seeds",
           "STAGE1_PREDICTIONS", "test_predictions",
           "sr_image_scores", "super_resolution", "bicubic", "grade_predictions", "kappa", "bootstrap_table", "lesion_targets", "segmentation", "prevalence", "grading",
           "attention_scores", "lesion_contrast"]
