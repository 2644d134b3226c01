"""CLPI experiments (Yang et al., IEEE T-Cyb 2022): one function per paper table or figure, tidy frames out.

The paper trains in two steps: the lesion attention generator on 68 x 68 lesion patches (4
classes: background, MA, haemorrhage, exudate; Sec. III-A, IV-A), then the whole CLPI end to end
on image-level grades only (Sec. III-C). Everything here follows that order:

* :func:`clpi_data` reads the grading images, the lesion patch sets (Table III) and, on the
  synthetic benchmark, test sets from other camera domains; :class:`ClpiData` also keeps every
  generator and grader trained so far, so a model shared by two tables trains once and the
  notebook can draw its maps.
* :func:`pretrain_patches` — patch pre-training of the generator, scored on held-out patches
  (balanced accuracy over the 4 classes, recall and average precision per class) beside the
  majority-class baseline.
* :func:`annotation_dropout` — Fig. 8: the generator pre-trained after discarding 25/50/75 % of the
  lesion boxes, its scores and their reduction rate (score after discarding / score with all).
* :func:`ablation` — Table VIII and Fig. 6 rows (:data:`ROWS`): CLPI, without end-to-end learning,
  without the abnormal shortcut, CLPI- (no patch pre-training) and the DenseNet alone, with the
  majority-class baseline; kappa, accuracy, AUC and Table VII's unacceptable errors.
* :func:`cross_domain` — Table VI's shape: the graders trained on one camera domain, tested on the
  others and on low-quality captures.
* :func:`attention_scores` — the generator's lesion maps against the true lesion masks (AUC and
  pointing game per lesion class, on the generator's own 64-px cells) beside a random map.

Model selection looks at the validation split only; the test split is scored once per model.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, recall_score
from torch import Tensor, nn

from fundus_lib import metrics
from fundus_lib.config import RunConfig
from fundus_lib.data.batch_augment import BatchAugment
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.in_memory import TensorData, TensorLoader
from fundus_lib.data.patches import FOV_LEVEL, PATCH_CLASSES, PatchLoader, lesion_patch_set
from fundus_lib.data.pipeline import has_labels, load_dataset, make_loaders, synthetic_benchmark
from fundus_lib.explain import pointing_game, saliency_auc
from fundus_lib.experiments.common import majority_class, majority_scores, tidy
from fundus_lib.models.baselines import IndividualNet
from fundus_lib.models.clpi import CLPI, LesionAttentionGenerator, PatchClassifier, clpi_loss, patch_loss, warmup_cosine
from fundus_lib.train import fit, predict
from fundus_lib.utils import choose_device, seed_everything

# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One grader of Table VIII / Fig. 6: CLPI with some part switched off, or the DenseNet alone."""

    clpi: bool = True
    pretrained: bool = True      # generator pre-trained on lesion patches
    shortcut: bool = True        # abnormal shortcut 1 - P_0 (Sec. III-B)
    end_to_end: bool = True      # grade loss reaches the generator


#: Rows of Table VIII and Fig. 6, in the order the notebook shows them.
ROWS: dict[str, Row] = {
    "CLPI": Row(),
    "CLPI w/o end-to-end": Row(end_to_end=False),
    "CLPI w/o shortcut": Row(shortcut=False),
    "CLPI-": Row(pretrained=False),
    "DenseNet": Row(clpi=False, pretrained=False),
}
MAJORITY = "majority class"
RANDOM_MAP = "random map"
#: Lesion classes scored by :func:`attention_scores` (class id -> name), and the union of all three.
LESION_CLASSES: dict[int, str] = {1: "microaneurysm", 2: "haemorrhage", 3: "exudate"}
ANY_LESION = "any lesion"


def _check_names(given: Sequence[Any], allowed: Sequence[Any], parameter: str) -> None:
    unknown = [name for name in given if name not in allowed]
    if unknown or not given:
        raise ValueError(f"{parameter} must be a non-empty list from {list(allowed)}, got {list(given)!r}")


def generator_widths(cfg: RunConfig) -> list[int]:
    """The generator's conv widths of ``cfg.generator_widths`` (Table II: 32, 64, ..., 1024)."""
    widths = list(cfg.generator_widths)
    if len(widths) < 8 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"generator_widths must list at least 8 positive ints (5x5 conv, six stride-2 convs, "
                         f"1x1 convs), got {widths!r}")
    return widths


def grading_size(cfg: RunConfig) -> int:
    """Side of the grading module's input: half the generator's (the paper: 1024 -> 512)."""
    return cfg.image_size // 2


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


@dataclass
class GradingRun:
    """One trained grader: its row, seed, model (eval mode, on the CPU), history and test outputs."""

    config: str
    seed: int
    model: nn.Module
    history: pd.DataFrame
    outputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    seconds: float


@dataclass
class ClpiData:
    """What every CLPI experiment shares (see :func:`clpi_data`)."""

    cfg: RunConfig
    manifest: pd.DataFrame                       # grading images, train / val / test, at cfg.image_size
    loaders: dict[str, Any]                      # "dr" loaders of the grading images
    patches: dict[str, dict[str, Any]] | None    # lesion patch sets by split; None: no lesion masks
    lesion_images: TensorData | None             # test images with lesion masks (attention scoring)
    lesion_label: str | None                     # where the lesion masks come from
    domain_loaders: dict[str, Any] = field(default_factory=dict)   # other camera domains' test loaders
    generators: dict[tuple[float, int], dict[str, Tensor]] = field(default_factory=dict)
    runs: dict[tuple[str, int], GradingRun] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return choose_device(self.cfg.device)


def _lesion_manifest(cfg: RunConfig, manifest: pd.DataFrame) -> tuple[pd.DataFrame | None, str | None]:
    """The images whose lesion masks train the generator: the grading images themselves when they
    have masks (synthetic benchmark, IDRiD), else ``cfg.lesion_dataset`` read from ``cfg.lesion_data_dir``."""
    values = cfg.as_dict()
    lesion_dataset, lesion_dir = values.get("lesion_dataset"), values.get("lesion_data_dir")
    if lesion_dataset is None and has_labels(manifest, "masks"):
        return manifest, cfg.data_label
    if lesion_dataset is None or lesion_dir is None:
        return None, None
    lesion_cfg = RunConfig(cfg.notebook, {**values, "dataset": lesion_dataset, "data_dir": lesion_dir},
                           cfg.project_root)
    lesions = load_dataset(lesion_cfg)
    if not has_labels(lesions, "masks"):
        raise ValueError(f"lesion_dataset={lesion_dataset!r} in {lesion_dir!r} has no lesion masks")
    return lesions, lesion_cfg.data_label


def _as_classes(manifest: pd.DataFrame, n_dr_classes: int, label: str) -> pd.DataFrame:
    """DR labels as the graders learn them: referable (grade >= 2) for 2 classes, the grade for 5."""
    grades = manifest["dr_grade"].to_numpy(dtype=int)
    if n_dr_classes == 2:
        return manifest.assign(dr_grade=pd.array(metrics.referable(grades), dtype="Int64"))
    if grades.max() >= n_dr_classes:
        raise ValueError(f"{label} has DR grade {grades.max()}, beyond n_dr_classes={n_dr_classes}; "
                         "Messidor grades 0-3: use n_dr_classes 2 (referable DR)")
    return manifest


def clpi_data(cfg: RunConfig, test_domains: Sequence[str] = ()) -> ClpiData:
    """Grading images (``load_dataset(cfg)``; referable DR when ``cfg.n_dr_classes == 2``), lesion
    patch sets per split and the test images with masks, and the ``test_domains``' test sets.

    Patches (:func:`~fundus_lib.data.patches.lesion_patch_set`): positives from every image of the
    split that has lesion masks, negatives from its No-DR images; a lesion dataset without No-DR
    images (IDRiD segmentation) takes its negatives from the grading images' No-DR images of the
    same split. ``test_domains`` apply to the synthetic benchmark only.
    """
    seed_everything(cfg.seed)
    graded = load_dataset(cfg)  # negatives come from No-DR images (grade 0), before any binarisation
    manifest = _as_classes(graded, cfg.n_dr_classes, cfg.data_label)
    loaders = make_loaders(manifest, ("dr",), image_size=cfg.image_size, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, data_path=cfg.data_path, seed=cfg.seed)
    lesions, lesion_label = _lesion_manifest(cfg, graded)
    patches, lesion_images = None, None
    if lesions is not None:
        patches = {}
        for split in ("train", "val", "test"):
            part = lesions[lesions["split"] == split]
            if lesions is not graded:  # negatives from the grading images' No-DR images
                healthy = graded[(graded["split"] == split) & (graded["dr_grade"] == 0)]
                part = pd.concat([part.assign(dr_grade=pd.NA), healthy], ignore_index=True)
            patches[split] = lesion_patch_set(part, image_size=cfg.image_size,
                                              negatives_per_image=cfg.negatives_per_image, seed=cfg.seed)
        tested = lesions[(lesions["split"] == "test")].reset_index(drop=True)
        tested = tested[tested[[c for c in tested.columns if c.startswith("mask_")]].notna().any(axis=1)]
        lesion_images = TensorData(FundusDataset(tested.reset_index(drop=True), tasks=("masks", "patch_labels"),
                                                 image_size=cfg.image_size))
    domain_loaders = {}
    if cfg.is_synthetic:
        for domain in test_domains:
            other = synthetic_benchmark(1, 1, cfg.n_test, cfg.image_size, cfg.seed, root=cfg.generated_dir / "synthetic",
                                        domain=domain)
            other = _as_classes(other[other["split"] == "test"], cfg.n_dr_classes, domain)
            domain_loaders[domain] = make_loaders(other, ("dr",), image_size=cfg.image_size,
                                                  batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                                  data_path=cfg.data_path, seed=cfg.seed, splits=("test",))["test"]
    return ClpiData(cfg, manifest, loaders, patches, lesion_images, lesion_label, domain_loaders)


def discard_lesions(patch_set: Mapping[str, Any], fraction: float, seed: int) -> dict[str, Any]:
    """Fig. 8: drop ``fraction`` of the lesion boxes (positive patches, each class alike) of a patch
    set, at random; the negatives from No-DR images stay, so nothing becomes a false negative."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"discard fractions must lie in [0, 1), got {fraction!r}")
    labels = torch.as_tensor(patch_set["patch_labels"])
    rng = np.random.default_rng(seed)
    keep = np.ones(len(labels), dtype=bool)
    for label in labels.unique().tolist():
        if label == 0:
            continue
        members = np.flatnonzero(labels.numpy() == label)
        keep[rng.choice(members, size=int(round(fraction * len(members))), replace=False)] = False
    index = torch.from_numpy(np.flatnonzero(keep))
    return {"image": patch_set["image"][index], "patch_labels": labels[index],
            "image_id": [patch_set["image_id"][i] for i in index.tolist()]}


# ------------------------------------------------------------------------------------------------
# patch pre-training (Sec. III-A, IV-B) and Fig. 8
# ------------------------------------------------------------------------------------------------


#: Learning-rate factor of the lesion attention generator in end-to-end training. The paper trains
#: the whole framework end to end "to fine-tune the lesion attention generator" through the shortcut
#: (Sec. IV-B) and gives no separate rate; a 10x smaller one is our reading of "fine-tune" (with the
#: grading module's rate, the pre-trained generator's maps were overwritten within the quick
#: profile's few epochs and CLPI graded below the majority class).
GENERATOR_LR_FACTOR = 0.1


def _optimiser(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The paper's SGD (momentum 0.9; warm-up to ``cfg.lr`` then cosine) with ``paper_schedule``, else Adam;
    a CLPI generator trained end to end gets ``GENERATOR_LR_FACTOR`` times the rate."""
    tuned = {id(p) for p in model.generator.parameters()} if isinstance(model, CLPI) else set()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in tuned]},
              {"params": [p for p in model.parameters() if p.requires_grad and id(p) in tuned],
               "lr": cfg.lr * GENERATOR_LR_FACTOR}]
    groups = [group for group in groups if group["params"]]
    if cfg.paper_schedule:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def patch_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Balanced accuracy over the 4 classes, and recall and average precision of each class."""
    probs = torch.as_tensor(logits).float().softmax(dim=1).numpy()
    predicted = probs.argmax(axis=1)
    classes = list(range(len(PATCH_CLASSES)))
    scores = {"balanced_accuracy": float(balanced_accuracy_score(labels, predicted))}
    recalls = recall_score(labels, predicted, labels=classes, average=None, zero_division=0)
    for c, name in enumerate(PATCH_CLASSES):
        if (labels == c).any():
            scores[f"recall · {name}"] = float(recalls[c])
            scores[f"AP · {name}"] = float(average_precision_score(labels == c, probs[:, c]))
    return scores


def _patch_loader(cfg: RunConfig, patch_set: Mapping[str, Any], seed: int, train: bool) -> PatchLoader:
    generator = torch.Generator().manual_seed(seed)
    if train:
        return PatchLoader(patch_set, cfg.batch_size, per_class=cfg.patches_per_class, augment=BatchAugment(),
                           generator=generator)
    return PatchLoader(patch_set, cfg.batch_size * 4, shuffle=False, generator=generator)  # evaluation only


def _pretrain(data: ClpiData, seed: int, fraction: float) -> dict[str, float]:
    cfg = data.cfg
    if data.patches is None:
        raise ValueError(f"{cfg.data_label} has no lesion masks: set lesion_dataset and lesion_data_dir "
                         "(IDRiD or DDR segmentation) to pre-train the generator on lesion patches")
    train_set = discard_lesions(data.patches["train"], fraction, seed) if fraction else data.patches["train"]
    seed_everything(seed)
    classifier = PatchClassifier(LesionAttentionGenerator(generator_widths(cfg)))
    started = time.perf_counter()
    fit(classifier, patch_loss, _patch_loader(cfg, train_set, seed, True),
        _patch_loader(cfg, data.patches["val"], seed, False), epochs=cfg.patch_epochs,
        optimizer=_optimiser(cfg, classifier), scheduler=warmup_cosine(), scheduler_interval="batch",
        metrics_fn=lambda outputs, targets: patch_scores(outputs["patch_logits"], targets["patch_labels"]),
        metric_keys=("patch_logits",), monitor="val_balanced_accuracy", mode="max", device=data.device,
        compile=cfg.compile, desc=f"patches seed {seed} discard {fraction:g}")
    data.generators[(fraction, seed)] = {k: v.detach().cpu().clone() for k, v in classifier.generator.state_dict().items()}
    outputs, targets = predict(classifier, _patch_loader(cfg, data.patches["test"], seed, False), device=data.device,
                               keys=("patch_logits",))
    scores = patch_scores(outputs["patch_logits"], targets["patch_labels"])
    return {**scores, "minutes": (time.perf_counter() - started) / 60}


def pretrain_patches(data: ClpiData, seeds: Sequence[int]) -> pd.DataFrame:
    """Patch pre-training of the generator for each seed (the weights the CLPI rows start from),
    scored on the held-out test patches; plus the majority class of the training patches
    (balanced accuracy 1/4: it recalls one class). Configs ``"generator (patches)"`` and
    :data:`MAJORITY`."""
    rows = []
    labels = torch.as_tensor(data.patches["test"]["patch_labels"]).numpy() if data.patches else None
    for seed in seeds:
        for metric, value in _pretrain(data, seed, 0.0).items():
            rows.append({"config": "generator (patches)", "seed": seed, "metric": metric, "value": value})
        majority = np.full(len(labels), majority_class(data.patches["train"]["patch_labels"].numpy()))
        rows.append({"config": MAJORITY, "seed": seed, "metric": "balanced_accuracy",
                     "value": float(balanced_accuracy_score(labels, majority))})
    return tidy(rows)


def annotation_dropout(data: ClpiData, fractions: Sequence[float], seeds: Sequence[int]) -> pd.DataFrame:
    """Fig. 8: the generator pre-trained after discarding each fraction of the lesion boxes (0 is
    the full set, trained first when missing), scored on the same test patches. Config
    ``"<p> % discarded"``; besides every score of :func:`patch_scores` each row set has
    ``reduction · <metric>`` = score / score with all annotations, for balanced accuracy and the
    mean AP over the three lesion classes (the paper plots AP50 / AP75 of detectors)."""
    fractions = sorted({0.0, *map(float, fractions)})
    rows = []
    for seed in seeds:
        reference: dict[str, float] = {}
        for fraction in fractions:
            scores = _pretrain(data, seed, fraction) if fraction or (0.0, seed) not in data.generators \
                else _test_generator_patches(data, seed)
            scores["lesion mAP"] = float(np.mean([scores[f"AP · {n}"] for n in LESION_CLASSES.values()
                                                  if f"AP · {n}" in scores]))
            reference = reference or scores
            for metric in ("balanced_accuracy", "lesion mAP"):
                scores[f"reduction · {metric}"] = scores[metric] / reference[metric]
            config = f"{100 * fraction:g} % discarded"
            rows += [{"config": config, "seed": seed, "metric": m, "value": v} for m, v in scores.items() if m != "minutes"]
    return tidy(rows)


def generator_classifier(data: ClpiData, state: Mapping[str, Tensor]) -> PatchClassifier:
    """A :class:`PatchClassifier` holding generator weights ``state`` (eval mode)."""
    classifier = PatchClassifier(LesionAttentionGenerator(generator_widths(data.cfg)))
    classifier.generator.load_state_dict(state)
    return classifier.eval()


def _test_generator_patches(data: ClpiData, seed: int) -> dict[str, float]:
    classifier = generator_classifier(data, data.generators[(0.0, seed)])
    outputs, targets = predict(classifier, _patch_loader(data.cfg, data.patches["test"], seed, False),
                               device=data.device, keys=("patch_logits",))
    return patch_scores(outputs["patch_logits"], targets["patch_labels"])


# ------------------------------------------------------------------------------------------------
# grading: Table VIII, Fig. 6, Table VII, Table VI
# ------------------------------------------------------------------------------------------------


def build_grader(data: ClpiData, config: str, seed: int) -> nn.Module:
    """The model of row ``config`` of :data:`ROWS`, its generator pre-trained on patches when the row
    asks (pre-training that seed first when needed)."""
    cfg, row = data.cfg, ROWS[config]
    weights = None if cfg.weights in (None, "none") else cfg.weights
    seed_everything(seed)
    if not row.clpi:
        return IndividualNet(task="dr", backbone=cfg.grading_backbone, n_dr=cfg.n_dr_classes, weights=weights)
    model = CLPI(n_dr=cfg.n_dr_classes, widths=generator_widths(cfg), backbone=cfg.grading_backbone, weights=weights,
                 shortcut=row.shortcut, train_generator=row.end_to_end)
    if row.pretrained:
        if (0.0, seed) not in data.generators:
            _pretrain(data, seed, 0.0)
        model.generator.load_state_dict(data.generators[(0.0, seed)])
    return model


class _DenseNetAtGradingSize(nn.Module):
    """The DenseNet alone sees the image at the grading module's size (the paper's 512 px)."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        resized = nn.functional.interpolate(image, size=(self.size, self.size), mode="bilinear",
                                            align_corners=False, antialias=True)
        return self.net(resized)


def grade_scores(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``kappa`` (quadratic), ``accuracy``, ``auc`` (referable DR: grade >= 2, from the summed
    probabilities of five grades) and, for five grades, Table VII's ``unacceptable`` error count."""
    logits = np.asarray(outputs["dr"], dtype=np.float64)
    truth = np.asarray(targets["dr"]).astype(np.int64)
    probs = torch.as_tensor(logits).softmax(dim=1).numpy()
    predicted = probs.argmax(axis=1)
    n_classes = probs.shape[1]
    scores = {"kappa": metrics.quadratic_weighted_kappa(truth, predicted, n_classes),
              "accuracy": metrics.accuracy(truth, predicted)}
    if n_classes == 5:
        scores["auc"] = metrics.roc_auc(metrics.referable(truth), metrics.referable_probability(probs),
                                        on_undefined="nan")
        scores["unacceptable"] = float(metrics.unacceptable_errors(truth, predicted))
    else:
        scores["auc"] = metrics.roc_auc(truth, probs[:, 1], on_undefined="nan")
    return {k: float(np.nan_to_num(v, nan=0.5)) for k, v in scores.items()}


def train_grader(data: ClpiData, config: str, seed: int) -> GradingRun:
    """Train row ``config`` with ``seed`` (same data order for every row of a seed), keep the epoch of
    best validation kappa, predict the test split once. Cached in ``data.runs``."""
    if (config, seed) in data.runs:
        return data.runs[(config, seed)]
    cfg = data.cfg
    model = build_grader(data, config, seed)
    if not ROWS[config].clpi:
        model = _DenseNetAtGradingSize(model, grading_size(cfg))
    loaders = make_loaders(data.manifest, ("dr",), image_size=cfg.image_size, batch_size=cfg.batch_size,
                           num_workers=cfg.num_workers, data_path=cfg.data_path, seed=seed)
    train = loaders["train"]
    if isinstance(train, TensorLoader):  # a last batch of one image cannot train BatchNorm at 1 x 1 features
        train = replace(train, drop_last=len(train.data) > cfg.batch_size)
    started = time.perf_counter()
    history = fit(model, clpi_loss, train, loaders["val"], epochs=cfg.epochs,
                  optimizer=_optimiser(cfg, model), scheduler=warmup_cosine(), scheduler_interval="batch",
                  metrics_fn=lambda outputs, targets: grade_scores(outputs, targets), metric_keys=("dr",),
                  monitor="val_kappa", mode="max", device=data.device, compile=cfg.compile,
                  desc=f"{config} seed {seed}")
    model = model.cpu().eval()
    outputs, targets = predict(model, data.loaders["test"], device="cpu", keys=("dr",))
    run = GradingRun(config, seed, model, history, outputs, targets, time.perf_counter() - started)
    data.runs[(config, seed)] = run
    return run


def majority_grades(data: ClpiData) -> dict[str, float]:
    """Scores of predicting the training split's most frequent grade for every test image."""
    split = {s: data.manifest.loc[data.manifest["split"] == s, "dr_grade"].to_numpy(dtype=int) for s in ("train", "test")}
    scores = majority_scores(split["train"], split["test"], data.cfg.n_dr_classes)
    out = {"kappa": scores["kappa"], "accuracy": scores["accuracy"], "auc": 0.5}
    if data.cfg.n_dr_classes == 5:
        predicted = np.full(len(split["test"]), majority_class(split["train"]))
        out["unacceptable"] = float(metrics.unacceptable_errors(split["test"], predicted))
    return out


def ablation(data: ClpiData, rows: Sequence[str], seeds: Sequence[int]) -> pd.DataFrame:
    """Table VIII and Fig. 6: every row of ``rows`` (names of :data:`ROWS`) trained over ``seeds`` on
    the same images, test scores of :func:`grade_scores` plus ``minutes``; and :data:`MAJORITY`."""
    _check_names(rows, list(ROWS), "ablation rows")
    records = []
    for seed in seeds:
        for config in rows:
            run = train_grader(data, config, seed)
            scores = {**grade_scores(run.outputs, run.targets), "minutes": run.seconds / 60}
            records += [{"config": config, "seed": seed, "metric": m, "value": v} for m, v in scores.items()]
        records += [{"config": MAJORITY, "seed": seed, "metric": m, "value": v} for m, v in majority_grades(data).items()]
    return tidy(records)


def cross_domain(data: ClpiData, rows: Sequence[str], seeds: Sequence[int]) -> pd.DataFrame:
    """Table VI's shape: the graders of ``rows`` (trained on the training domain, reused from
    :func:`ablation` when present) scored on each test set: metrics ``kappa · <test set>`` and
    ``auc · <test set>``, the first test set being the training domain's own."""
    _check_names(rows, list(ROWS), "cross-domain rows")
    own = data.cfg.as_dict().get("domain") or "cam_a"
    records = []
    for seed in seeds:
        for config in rows:
            run = train_grader(data, config, seed)
            results = {f"{own} (training domain)": (run.outputs, run.targets)}
            for domain, loader in data.domain_loaders.items():
                results[domain] = predict(run.model, loader, device="cpu", keys=("dr",))
            for name, (outputs, targets) in results.items():
                scores = grade_scores(outputs, targets)
                records += [{"config": config, "seed": seed, "metric": f"{m} · {name}", "value": scores[m]}
                            for m in ("kappa", "auc")]
    return tidy(records)


# ------------------------------------------------------------------------------------------------
# attention maps against lesion masks (Fig. 4, Fig. 7)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(generator: nn.Module, data: ClpiData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The generator's P (N, 4, h, w) on the test images with masks, their grid labels (N, h, w)
    (most severe target lesion of each 64-px cell) and the cells inside the field of view (N, h, w)."""
    loader = TensorLoader(data.lesion_images, batch_size=data.cfg.batch_size)
    maps, labels, fov = [], [], []
    generator = generator.eval()
    for batch in loader:
        maps.append(generator(batch["image"])["attention"])
        labels.append(batch["patch_labels"])
    stride = data.lesion_images.images.shape[-1] // maps[0].shape[-1]
    pixels = data.lesion_images.images.float().amax(dim=1) / 255 > FOV_LEVEL   # (N, S, S)
    centre = stride // 2
    fov = pixels[:, centre::stride, centre::stride]
    return torch.cat(maps).numpy(), torch.cat(labels).numpy(), fov.numpy()


def _map_scores(maps: np.ndarray, labels: np.ndarray, fov: np.ndarray) -> dict[str, float]:
    scores = {}
    for class_id, name in [*LESION_CLASSES.items(), (0, ANY_LESION)]:
        target = labels > 0 if class_id == 0 else labels == class_id
        score_map = 1.0 - maps[:, 0] if class_id == 0 else maps[:, class_id]
        for metric, per_image in (("auc", saliency_auc), ("pointing", pointing_game)):
            values = per_image(score_map, target, fov)  # NaN for images the score is undefined on
            if np.isfinite(values).any():
                scores[f"{metric} · {name}"] = float(np.nanmean(values))
    return scores


def attention_scores(data: ClpiData, seeds: Sequence[int], rows: Sequence[str] = ("CLPI", "CLPI-")) -> pd.DataFrame:
    """AUC and pointing game of each lesion map P_c against the cells holding lesion c (and of the
    abnormal map 1 - P_0 against any lesion), on the test images with masks: the pre-trained
    generator, the generators of ``rows`` after end-to-end training (those already trained), and a
    uniformly random map (the chance level: AUC 0.5)."""
    if data.lesion_images is None:
        raise ValueError(f"{data.cfg.data_label} has no lesion masks to score attention maps against")
    records = []
    for seed in seeds:
        sources: dict[str, nn.Module] = {}
        if (0.0, seed) in data.generators:
            sources["generator (patches)"] = generator_classifier(data, data.generators[(0.0, seed)]).generator
        for config in rows:
            if (config, seed) in data.runs and ROWS[config].clpi:
                sources[f"{config} (end to end)"] = data.runs[(config, seed)].model.generator
        labels = fov = None
        for name, generator in sources.items():
            maps, labels, fov = attention_maps(generator, data)
            records += [{"config": name, "seed": seed, "metric": m, "value": v}
                        for m, v in _map_scores(maps, labels, fov).items()]
        if labels is not None:
            rng = np.random.default_rng(seed)
            random = rng.random((len(labels), len(PATCH_CLASSES), *labels.shape[1:]))
            random /= random.sum(axis=1, keepdims=True)
            records += [{"config": RANDOM_MAP, "seed": seed, "metric": m, "value": v}
                        for m, v in _map_scores(random, labels, fov).items()]
    return tidy(records)


__all__ = ["ANY_LESION", "ClpiData", "GradingRun", "LESION_CLASSES", "MAJORITY", "RANDOM_MAP", "ROWS", "Row",
           "ablation", "annotation_dropout", "attention_maps", "attention_scores", "build_grader",
           "clpi_data", "cross_domain", "discard_lesions", "generator_classifier",
           "generator_widths", "grade_scores", "grading_size", "majority_grades", "patch_scores",
           "pretrain_patches", "train_grader"]
