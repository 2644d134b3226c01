"""CANet's experiments (Li et al., IEEE TMI 2020): the rows of Tables IV, V and the λ sweep.

:func:`ablation` trains every row it is given (a :class:`Row`: which model, which λ of Eq. 7,
which CANet switches) over the same seeds on the same split and returns a tidy frame (see
:mod:`fundus_lib.experiments.common`) with the trained runs beside it, for the figures.

Two ways to train a row, chosen by the configuration:

- **end to end** (``freeze_backbone`` false; the paper, the gpu and full profiles): every row
  trains its own backbone from ``weights`` on augmented images.
- **shared frozen trunk** (``freeze_backbone`` true; the quick profile): one backbone (the *trunk*)
  is trained once per notebook run on a disjoint set of ``pretrain_images`` images to recognise
  which lesions an image shows (image-level labels), then frozen; its feature maps of the
  train / val / test images are computed once and every row trains only what sits on top of
  them. The trunk stands in for the ImageNet weights a CPU profile cannot download. Rows then
  differ only in what the paper's ablation changes (the heads and attention modules), and a
  13-row table with several seeds costs seconds per row instead of minutes.

``output_stride`` 16 removes the stride of a ResNet's last stage, so a 112 px input gives the
7 x 7 attention grid that ResNet-50 gives at the paper's 224 px (output stride 32).

The pitfall of the authors' released loop (it evaluated on the test fold every 20th of 1000
epochs and kept the best: 50 candidates) is measured by :func:`selection_optimism` on the
per-epoch test predictions the final model records for that demonstration only, and bounded by
:func:`luckiest_draw`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import binom
from torch import Tensor, nn

from fundus_lib import metrics
from fundus_lib.config import RunConfig
from fundus_lib.data import pipeline
from fundus_lib.data.manifest import read_image
from fundus_lib.experiments.common import majority_class, majority_scores, run_seeds, tidy
from fundus_lib.models import build_model
from fundus_lib.models.backbones import Backbone, build_backbone
from fundus_lib.models.canet import CANetLoss
from fundus_lib.train import fit, predict
from fundus_lib.utils import Timer, choose_device, seed_everything

TASKS: tuple[str, ...] = ("dr", "dme")
JOINT = "Joint training"
MAJORITY = "majority class"
#: The authors' released loop: test-fold evaluation every 20th of 1000 epochs, the best kept.
AUTHORS_CANDIDATES = 1000 // 20


@dataclass(frozen=True)
class Row:
    """One row of a CANet table: a model, its λ (Eq. 7) and its CANet switches / build options."""

    model: str
    lam: float
    table: str
    options: Mapping[str, Any] = field(default_factory=dict)


def final_name(lam: float) -> str:
    """The final CANet's row name for λ = ``lam``."""
    return f"CANet (final, λ={lam:g})"


def paper_rows(lam: float = 0.25, lambdas: Sequence[float] = (), complex_baselines: bool = True,
               multitask: bool = True) -> dict[str, Row]:
    """The rows of Table IV (with the λ sweep over ``lambdas``) and Table V, in the paper's order.

    Joint training keeps CANet's Dropout(0.3) on the features, so the attention modules are the
    only difference to CANet."""
    rows = {JOINT: Row("joint", 0.0, "IV", {"dropout": 0.3})}
    if complex_baselines:
        rows["Joint training (complex)"] = Row("joint_complex", 0.0, "IV", {"dropout": 0.3})
        rows["Joint training (complex_v2)"] = Row("joint_complex_v2", 0.0, "IV", {"dropout": 0.3})
    rows["CANet (d-S only)"] = Row("canet", lam, "IV", {"dr_to_dme": False, "dme_to_dr": False})
    rows["CANet (d-S; d-D DR⇒DME)"] = Row("canet", lam, "IV", {"dme_to_dr": False})
    rows["CANet (d-S; d-D DR⇐DME)"] = Row("canet", lam, "IV", {"dr_to_dme": False})
    rows[final_name(lam)] = Row("canet", lam, "IV")
    rows[f"{final_name(lam)}, authors' gate σ(2·MLP)"] = Row("canet", lam, "IV", {"dependent_gate": "authors_code"})
    for value in lambdas:
        if value != lam:
            rows[f"CANet (λ={value:g})"] = Row("canet", float(value), "IV (λ)")
    if multitask:
        rows["Multi-task net (Chen et al.)"] = Row("multitask_chen", 0.0, "V")
        rows["MTMR-Net (Liu et al.)"] = Row("mtmr", 0.0, "V")
    return rows


# --------------------------------------------------------------------------- data and trunk

def prepare(cfg: RunConfig) -> pd.DataFrame:
    """The manifest of the run (``pipeline.load_dataset``), DR made binary when ``n_dr_classes`` is 2
    (referable DR: grades 2 and above, as on Messidor)."""
    manifest = pipeline.load_dataset(cfg)
    if cfg.n_dr_classes == 2:
        referable = metrics.referable(manifest["dr_grade"].to_numpy(dtype=int))
        manifest = manifest.assign(dr_grade=pd.array(referable, dtype="Int64"))
    return manifest


def evaluation_splits(cfg: RunConfig, manifest: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The splits every row is trained on: the fixed train / val / test split (synthetic, IDRiD), or
    for Messidor ``cfg.folds`` cross-validation folds, each with a validation share carved from its
    training folds (the paper's protocol; folds grouped by the exam-level ``patient_id``)."""
    if cfg.dataset != "messidor":
        return [("fixed split", manifest)]
    from fundus_lib.data.splits import assign_splits, stratified_kfold

    pooled = manifest.assign(split=pd.array(["train"] * len(manifest), dtype="string"))
    result = []
    for k, (_, test_rows) in enumerate(stratified_kfold(pooled, cfg.folds, group="patient_id", seed=int(cfg.seed))):
        fold = pooled.copy()
        fold.loc[fold.index[test_rows], "split"] = "test"
        fold = assign_splits(fold, val=pipeline.VALIDATION_SHARE, test=0.0, seed=int(cfg.seed), source_split="train")
        result.append((f"fold {k}", fold))
    return result


def set_output_stride(backbone: Backbone, output_stride: int) -> Backbone:
    """Make a ResNet's last stage keep its input resolution (``output_stride`` 16) or leave it (32)."""
    if output_stride == 32:
        return backbone
    if output_stride != 16 or not backbone.name.startswith("resnet"):
        raise ValueError(f"output_stride must be 32, or 16 with a ResNet backbone; got {output_stride} "
                         f"with {backbone.name!r}")
    block = backbone.layer4[0]
    block.conv2.stride = (1, 1) if block.conv2.stride == (2, 2) else block.conv2.stride  # Bottleneck
    block.conv1.stride = (1, 1)  # BasicBlock
    block.downsample[0].stride = (1, 1)
    backbone.strides[backbone.stages[-1]] = 16
    return backbone


def _weights(cfg: RunConfig) -> str | None:
    return None if cfg.weights in (None, "none") else cfg.weights


def _output_stride(cfg: RunConfig) -> int:
    return int(cfg.values.get("output_stride") or 32)


def _lesion_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    return F.binary_cross_entropy_with_logits(outputs["presence"], batch["lesion_present"].float())


class _PresenceNet(nn.Module):
    """Trunk + GAP + Linear: image-level lesion presence logits (the trunk's pretext task)."""

    def __init__(self, trunk: Backbone, n_lesions: int) -> None:
        super().__init__()
        self.backbone = trunk
        self.head = nn.Linear(trunk.out_channels, n_lesions)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"presence": self.head(self.backbone(x)[self.backbone.stages[-1]].mean(dim=(2, 3)))}


def pretrain_trunk(cfg: RunConfig, *, progress: bool = False) -> tuple[Backbone, pd.DataFrame]:
    """The shared trunk: ``cfg.backbone`` (from ``weights``, at ``output_stride``) trained for
    ``pretrain_epochs`` to tell which lesions an image shows, on ``pretrain_images`` synthetic
    images of their own seed (none of them in the train / val / test splits). Returns the frozen
    trunk (eval mode, no gradients) and its training history."""
    images, epochs = int(cfg.values.get("pretrain_images") or 0), int(cfg.values.get("pretrain_epochs") or 0)
    trunk = set_output_stride(build_backbone(cfg.backbone, weights=_weights(cfg)), _output_stride(cfg))
    history = pd.DataFrame()
    if images and epochs:
        if not cfg.is_synthetic:
            raise ValueError("pretrain_images > 0 needs the synthetic benchmark (dataset: synthetic), which "
                             f"labels every lesion; dataset is {cfg.dataset!r}: set pretrain_images to 0")
        n_val = max(8, images // 8)
        pool = pipeline.synthetic_benchmark(images, n_val, 1, cfg.image_size, int(cfg.seed) + 7919,
                                            root=cfg.generated_dir / "synthetic")
        loaders = pipeline.make_loaders(pool, ("lesion_present",), image_size=cfg.image_size,
                                        batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=int(cfg.seed),
                                        splits=("train", "val"), data_path=cfg.data_path)
        net = _PresenceNet(trunk, len(pipeline.LESIONS))
        history = fit(net, _lesion_loss, loaders["train"], loaders["val"], epochs=epochs, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, scheduler=_cosine, scheduler_interval="batch",
                      device=choose_device(cfg.device), progress=progress, desc="trunk (lesion presence)")
    trunk.eval().requires_grad_(False)
    return trunk, history


class FeatureLoader:
    """Batches ``{"image": feature map, "dr": ..., "dme": ...}`` of precomputed trunk features."""

    def __init__(self, tensors: Mapping[str, Tensor], batch_size: int, shuffle: bool = False, seed: int = 0) -> None:
        self.tensors, self.batch_size, self.shuffle = dict(tensors), int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return -(-len(self.tensors["image"]) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.tensors["image"])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            yield {key: value[rows] for key, value in self.tensors.items()}


@torch.no_grad()
def trunk_features(cfg: RunConfig, trunk: Backbone, manifest: pd.DataFrame) -> dict[str, dict[str, Tensor]]:
    """Per split, the trunk's last feature map of every image (no augmentation) and its labels."""
    loaders = pipeline.make_loaders(manifest, TASKS, image_size=cfg.image_size, batch_size=cfg.batch_size,
                                    num_workers=cfg.num_workers, seed=int(cfg.seed), augment=False,
                                    data_path=cfg.data_path)
    device = choose_device(cfg.device)
    trunk = trunk.to(device)
    result = {}
    for split, loader in loaders.items():
        parts: dict[str, list[Tensor]] = {}
        for batch in loader:
            parts.setdefault("image", []).append(trunk(batch["image"].to(device))[trunk.stages[-1]].float().cpu())
            for task in TASKS:
                parts.setdefault(task, []).append(batch[task].cpu())
        result[split] = {key: torch.cat(value) for key, value in parts.items()}
    return result


class _Precomputed(nn.Module):
    """Takes the place of a frozen backbone whose outputs were computed once: returns its input."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stages = (stage,)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.stages[0]: x}


# --------------------------------------------------------------------------- training

def _cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay to 0, stepped per batch (Sec. III-E)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def joint_correct(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per image: True where both the DR and the DME grade are right."""
    return (outputs["dr"].argmax(1) == targets["dr"]) & (outputs["dme"].argmax(1) == targets["dme"])


def scores(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Test metrics of one run: joint accuracy; per disease accuracy, quadratic kappa, macro AUC, macro F1."""
    report = metrics.grading_metrics(outputs, targets, tasks=TASKS)
    result = {"joint_acc": float(report.loc["joint", "acc"])}
    for task in TASKS:
        predicted = outputs[task].argmax(1)
        kappa = metrics.quadratic_weighted_kappa(targets[task], predicted, outputs[task].shape[1])
        result.update({f"{task}_acc": float(report.loc[task, "acc"]), f"{task}_kappa": float(np.nan_to_num(kappa)),
                       f"{task}_auc": float(np.nan_to_num(report.loc[task, "auc"])),
                       f"{task}_f1": float(report.loc[task, "f1"])})
    return result


@dataclass
class Trained:
    """One trained row x seed: the model (for figures), its history, test outputs and, when asked, the
    per-epoch joint correctness on the test split (for the pitfall demonstration only)."""

    name: str
    seed: int
    model: nn.Module | None
    history: pd.DataFrame
    outputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    test_correct: list[np.ndarray]
    seconds: float


def train_row(cfg: RunConfig, name: str, row: Row, manifest: pd.DataFrame, seed: int, *,
              features: Mapping[str, Mapping[str, Tensor]] | None = None, trunk: Backbone | None = None,
              track_test: bool = False, progress: bool = False) -> Trained:
    """Train one row with one seed: end to end on images, or on ``features`` of the frozen ``trunk``.

    The epoch with the best validation joint accuracy is kept (``fit(monitor="val_joint_acc")``);
    the test split is predicted once at the end. ``track_test`` also records which test images
    are jointly right after every epoch — never used to choose anything."""
    device = choose_device(cfg.device)
    seed_everything(seed)
    model = build_model(row.model, backbone=cfg.backbone, weights=None if features is not None else _weights(cfg),
                        n_dr=cfg.n_dr_classes, **dict(row.options))
    if features is not None:
        if trunk is None:
            raise ValueError(f"train_row({name!r}): features were given without the trunk that computed them")
        model.backbone = _Precomputed(trunk.stages[-1])
        loaders = {split: FeatureLoader(tensors, cfg.batch_size, shuffle=split == "train", seed=seed)
                   for split, tensors in features.items()}
    else:
        set_output_stride(model.backbone, _output_stride(cfg))
        loaders = pipeline.make_loaders(manifest, TASKS, image_size=cfg.image_size, batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers, data_path=cfg.data_path, seed=seed)
    test_correct: list[np.ndarray] = []

    def log_test(epoch: int, history_row: Mapping[str, Any], core: nn.Module) -> None:
        test_correct.append(joint_correct(*predict(core, loaders["test"], device=device, progress=False)))

    with Timer() as timer:
        history = fit(model, CANetLoss(row.lam), loaders["train"], loaders["val"], epochs=cfg.epochs, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, scheduler=_cosine, scheduler_interval="batch",
                      metrics_fn=metrics.grading_scores, monitor="val_joint_acc", device=device,
                      compile=bool(cfg.values.get("compile")), callbacks=[log_test] if track_test else [],
                      progress=progress, desc=f"{name} · seed {seed}")
        outputs, targets = predict(model, loaders["test"], device=device, progress=False)
    if features is not None:
        model.backbone = trunk  # the whole network again: images in, attention maps out
    return Trained(name, seed, model.eval(), history, outputs, targets, test_correct, timer.seconds)


@dataclass
class Ablation:
    """What :func:`ablation` returns: the tidy frame and the trained runs (models kept as asked)."""

    frame: pd.DataFrame
    runs: list[Trained]
    trunk: Backbone | None = None
    trunk_history: pd.DataFrame = field(default_factory=pd.DataFrame)

    def run(self, name: str, seed: int | None = None) -> Trained:
        """The run of row ``name`` (the first seed unless ``seed`` is given)."""
        for trained in self.runs:
            if trained.name == name and (seed is None or trained.seed == seed):
                return trained
        raise KeyError(f"no run {name!r} (seed {seed}); rows: {sorted({t.name for t in self.runs})}")


def majority_frame(manifest: pd.DataFrame, seeds: Sequence[int]) -> pd.DataFrame:
    """The majority-class baseline of the training split, scored on the test split, as tidy rows for
    every seed (the split is fixed, so every seed scores the same): per disease accuracy and kappa,
    and joint accuracy of the most frequent (DR, DME) pair."""
    train, test = (manifest[manifest["split"] == split] for split in ("train", "test"))
    values: dict[str, float] = {}
    for task in TASKS:
        column = f"{task}_grade"
        result = majority_scores(train[column].to_numpy(dtype=int), test[column].to_numpy(dtype=int))
        values[f"{task}_acc"], values[f"{task}_kappa"] = result["accuracy"], result["kappa"]
    pair = lambda frame: frame["dr_grade"].to_numpy(dtype=int) * 3 + frame["dme_grade"].to_numpy(dtype=int)
    values["joint_acc"] = float(np.mean(pair(test) == majority_class(pair(train))))
    return run_seeds(lambda seed: values, config=MAJORITY, seeds=seeds)


def ablation(cfg: RunConfig, rows: Mapping[str, Row], seeds: Sequence[int], *, manifest: pd.DataFrame | None = None,
             track_test: Sequence[str] = (), keep_models: Sequence[str] = (), progress: bool = False) -> Ablation:
    """Train every row of ``rows`` ({name: Row}) with every seed and score it on the test split.

    Returns an :class:`Ablation` whose ``frame`` is tidy (config, seed, metric, value, fold), with
    the majority-class baseline as config ``"majority class"`` and per run the metrics of
    :func:`scores` plus ``best_epoch`` and ``seconds``. On Messidor every fold of
    :func:`evaluation_splits` is trained (column ``fold``; summaries average over the folds of a
    seed). ``track_test`` names rows that record per-epoch test correctness (the pitfall
    demonstration); ``keep_models`` rows keep their model (first fold only).
    """
    if not rows:
        raise ValueError("ablation(): rows is empty; give at least one {name: Row}")
    if not seeds:
        raise ValueError("ablation(): seeds is empty; give at least one seed")
    manifest = prepare(cfg) if manifest is None else manifest
    trunk, trunk_history = None, pd.DataFrame()
    if cfg.values.get("freeze_backbone"):
        trunk, trunk_history = pretrain_trunk(cfg, progress=progress)
    runs, frames = [], []
    for k, (fold, split) in enumerate(evaluation_splits(cfg, manifest)):
        features = trunk_features(cfg, trunk, split) if trunk is not None else None
        records = []
        for name, row in rows.items():
            for seed in seeds:
                trained = train_row(cfg, name, row, split, int(seed), features=features, trunk=trunk,
                                    track_test=name in track_test and k == 0, progress=progress)
                measured = {**scores(trained.outputs, trained.targets),
                            "best_epoch": trained.history.attrs["best_epoch"], "seconds": trained.seconds}
                records += [{"config": name, "seed": int(seed), "metric": m, "value": v} for m, v in measured.items()]
                if name not in keep_models or k > 0:
                    trained.model = None
                if k == 0:
                    runs.append(trained)
        frames += [tidy(records).assign(fold=fold), majority_frame(split, seeds).assign(fold=fold)]
    return Ablation(pd.concat(frames, ignore_index=True), runs, trunk, trunk_history)


# --------------------------------------------------------------------------- the pitfall

def selection_optimism(correct: np.ndarray | Sequence[np.ndarray], chosen: int, fold_size: int, *,
                       draws: int = 2000, seed: int = 0) -> float:
    """Mean, over random test folds of ``fold_size`` images, of the joint accuracy of the candidate
    that looks best on the fold minus that of candidate ``chosen`` (picked on validation), in points.

    ``correct`` is (candidates, test images) per-image joint correctness; never negative."""
    correct = np.asarray(correct, dtype=float)
    if correct.ndim != 2 or not 0 <= chosen < len(correct):
        raise ValueError(f"correct must be (candidates, images) and chosen an index into it; got shape "
                         f"{correct.shape} and chosen={chosen}")
    if not 1 <= fold_size <= correct.shape[1]:
        raise ValueError(f"fold_size must be in [1, {correct.shape[1]}], got {fold_size}")
    rng = np.random.default_rng(seed)
    folds = np.argsort(rng.random((draws, correct.shape[1])), axis=1)[:, :fold_size]
    on_fold = correct[:, folds].mean(axis=2)  # (candidates, draws)
    return 100 * float((on_fold.max(axis=0) - on_fold[chosen]).mean())


def luckiest_draw(accuracy: float, n_test: int, candidates: int) -> float:
    """Expected optimism (fraction) of reporting the best of ``candidates`` independent test
    measurements of a model whose true accuracy never changes: E[max] - accuracy, exact from the
    binomial distribution (real epochs are correlated, so this is the worst case)."""
    correct = np.arange(n_test + 1)
    cdf = binom.cdf(correct, n_test, accuracy)
    p_max = cdf ** candidates - np.concatenate([[0.0], cdf[:-1]]) ** candidates
    return max(0.0, float((correct / n_test * p_max).sum() - accuracy))  # >= 0; clip rounding noise


# --------------------------------------------------------------------------- leaky folds (Messidor)

def reencode(image: np.ndarray, scale: float = 0.8, quality: int = 75) -> np.ndarray:
    """A copy as re-saving makes one: resized and JPEG-compressed (other bytes, same photograph)."""
    import cv2

    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("reencode(): JPEG encoding failed")
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def descriptors(images: Sequence[np.ndarray]) -> np.ndarray:
    """Per image: the pixel fingerprint (unit length) next to the standardised colour of the field
    of view (the mean of each channel where the image is not black)."""
    from fundus_lib.data.duplicates import fingerprint

    prints = np.nan_to_num(np.stack([fingerprint(image) for image in images]))
    colour = np.stack([image[image.max(axis=2) > 20].mean(axis=0) for image in images])
    return np.hstack([prints, (colour - colour.mean(axis=0)) / (colour.std(axis=0) + 1e-9)])


def _kfold(frame: pd.DataFrame, folds: int, group: str | None, seed: int) -> list:
    """``folds`` folds stratified by DR grade: by image (group=None) or grouped by ``group``."""
    import warnings

    from fundus_lib.data.splits import stratified_kfold

    with warnings.catch_warnings():  # scikit-learn notes when a rare grade has fewer images than folds
        warnings.filterwarnings("ignore", message="The least populated class")
        return stratified_kfold(frame, folds, group=group, seed=seed)


def nn_correct(x: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-image correctness of 1-nearest-neighbour predictions, each fold predicted from the others."""
    correct = np.zeros(len(y), dtype=bool)
    norms = (x ** 2).sum(axis=1)
    for train, test in folds:
        distance = norms[test, None] + norms[None, train] - 2 * x[test] @ x[train].T
        correct[test] = y[train][distance.argmin(axis=1)] == y[test]
    return correct


def compare_folds(frame: pd.DataFrame, x: np.ndarray, folds: int, fold_seeds: Sequence[int]) -> pd.DataFrame:
    """Per fold seed and per image kind: 1-NN accuracy on the originals (rows without ``duplicate_of``)
    with folds by image over every row, and with folds grouped by ``patient_id`` over the originals
    only; and how many patients (exams, copies) the folds by image split."""
    y = frame["dr_grade"].to_numpy(dtype=int)
    original = frame["duplicate_of"].isna().to_numpy()
    originals = frame[original].reset_index(drop=True)
    copied = originals["image_id"].isin(frame["duplicate_of"]).to_numpy()
    exam_size = originals.groupby("patient_id")["image_id"].transform("size").to_numpy()
    kind = np.where(copied, "has a copy", np.where(exam_size > 1, "other eye present", "alone"))
    rows = []
    for seed in fold_seeds:
        by_image = _kfold(frame, folds, None, seed)
        fold = np.empty(len(frame), dtype=int)
        for k, (_, test) in enumerate(by_image):
            fold[test] = k
        spread = pd.Series(fold).groupby(frame["patient_id"].to_numpy()).nunique()
        correct = {"by image": nn_correct(x, y, by_image)[original],
                   "grouped, no copies": nn_correct(x[original], y[original],
                                                    _kfold(originals, folds, "patient_id", seed))}
        for scheme, right in correct.items():
            for name in ("all", "has a copy", "other eye present", "alone"):
                chosen = np.ones(len(kind), bool) if name == "all" else kind == name
                rows.append({"seed": seed, "folds": scheme, "images": name, "n": int(chosen.sum()),
                             "accuracy": right[chosen].mean() if chosen.any() else np.nan,
                             "patients split": int((spread > 1).sum())})
    return pd.DataFrame(rows)


def planted_leaks(pool: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Constructed leaks on a manifest without real exams: a re-encoded copy of every fifth image,
    and, among half of the images, pairs of one DR grade made "two eyes of one patient" by a
    shared colour cast. Returns the manifest (with ``patient_id`` and ``duplicate_of``) and images."""
    from fundus_lib.data.manifest import make_manifest

    pool = pool.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    grade = pool["dr_grade"].to_numpy(dtype=int)
    patient = np.arange(len(pool))
    for g in np.unique(grade):
        members = rng.permutation(np.flatnonzero(grade == g))[:(grade == g).sum() // 2]
        patient[members[1::2]] = members[0::2][:len(members[1::2])]
    cast = rng.uniform(0.6, 1.3, size=(len(pool), 3))[patient]  # one colour cast per patient
    eyes = [np.clip(read_image(path) * gain, 0, 255).astype(np.uint8) for path, gain in zip(pool["image_path"], cast)]
    copied = np.sort(rng.choice(len(pool), size=len(pool) // 5, replace=False))
    ids = pool["image_id"].astype(str).tolist()
    frame = make_manifest(pd.DataFrame({
        "image_id": ids + [f"{ids[i]} (copy)" for i in copied],
        "image_path": pool["image_path"].tolist() + pool["image_path"].iloc[copied].tolist(),
        "dr_grade": np.concatenate([grade, grade[copied]]),
        "patient_id": [f"patient {p}" for p in np.concatenate([patient, patient[copied]])],
        "duplicate_of": [pd.NA] * len(pool) + [ids[i] for i in copied]}))
    return frame, eyes + [reencode(eyes[i]) for i in copied]


__all__ = ["TASKS", "JOINT", "MAJORITY", "AUTHORS_CANDIDATES", "Row", "final_name", "paper_rows", "prepare",
           "evaluation_splits", "evaluation_splits",
           "set_output_stride", "pretrain_trunk", "FeatureLoader", "trunk_features", "joint_correct", "scores",
           "Trained", "train_row", "Ablation", "majority_frame", "ablation", "selection_optimism", "luckiest_draw",
           "reencode", "descriptors", "nn_correct", "compare_folds", "planted_leaks"]
