"""ELLG's experiments (Lin et al., IJCAI-W 2020): the o_O baseline, saliency against true lesion
masks (Figs. 2-4, measured), and iterative lesion generation (Tables 1-2 shape).

One function per table or figure, each over the seeds it is given, each returning a tidy frame
(``config, seed, metric, value``; see :mod:`fundus_lib.experiments.common`) with what the
figures need beside it:

* :func:`baseline` — the o_O regression net trained on the original images, thresholds fitted on
  the validation split (never the test split), scored on the test split; plus the majority class.
* :func:`saliency_table` — saliency maps of the baseline models scored against the true lesion masks
  of the test images with lesions (pointing game, AUC, IoU, energy), one row per map recipe:
  Grad-CAM (what CAM becomes for a net without a GAP head), Grad-CAM++ (Eq. 1), GMSM (Eqs. 2-3),
  single layers vs the fused pair (Fig. 3), and a random map as the floor. :func:`method_rows`
  and :func:`layer_rows` give the rows of the two tables.
* :func:`ellg_rounds` — iterative learning: from each baseline model, rounds on the original
  images or on original + generated images (:mod:`fundus_lib.generation`), as ``cfg.rounds``
  lists them; the same rounds on original images only are the control, so the comparison
  isolates the generated images from the extra training.

**Network size** (:func:`n_blocks_for`): the original solution trained 3 blocks on 112 px crops,
4 on 224 px and 5 on 448 px (:data:`fundus_lib.models.o_o.STAGES`); the net for an input size
has the blocks of the stage at that size. **GMSM layers** (:data:`GMSM_LAYERS`): at 448 px the
paper's three named blocks (27 x 27, 13 x 13, 6 x 6) are blocks 2-4; the GMSM fuses the finest
of them (block 2, the "lower layer") with the coarsest (block 4, the "higher layer"); the paper
does not name the pair, this is our reading. Smaller nets keep the roles: a low layer finer than
the high one (at 96-128 px block 2 is 5-7 px wide, coarser than block 3, so block 1 is the low
layer there).

**Schedules.** Baseline: Adam at ``cfg.lr`` for ``cfg.epochs`` (the paper's 250 epochs on
EyePACS), the epoch with the lowest validation loss kept. Each round: ``cfg.round_epochs`` epochs
at ``cfg.round_lr``, divided by 10 after each third of the round (the paper: 30 epochs, 3e-5 ->
3e-6 -> 3e-7 every 10 epochs). Thresholds are refitted on validation after every round.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor, nn

from fundus_lib import explain, generation, metrics
from fundus_lib.config import RunConfig
from fundus_lib.data import pipeline
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.manifest import make_manifest
from fundus_lib.data.transforms import normalize
from fundus_lib.experiments.common import majority_scores, run_seeds, tidy
from fundus_lib.models.o_o import OONet, apply_thresholds, fit_thresholds
from fundus_lib.stats import paired_bootstrap
from fundus_lib.train import fit, predict
from fundus_lib.utils import Timer, choose_device, seed_everything

BASELINE = "o_O baseline"
CONTROL = "o_O + original-only rounds"
ELLG = "ELLG"
MAJORITY = "majority class"
RANDOM = "random map"
ROUND_KINDS: tuple[str, ...] = ("original", "combined")
N_GRADES = 5
#: (low layer, high layer) of the GMSM for each number of o_O blocks (module docstring).
GMSM_LAYERS: dict[int, tuple[str, str]] = {
    3: ("features.block1", "features.block3"),
    4: ("features.block2", "features.block3"),
    5: ("features.block2", "features.block4"),
}
#: Saliency scores per image (fundus_lib.explain), all in [0, 1].
SALIENCY_METRICS: tuple[str, ...] = ("pointing_game", "auc", "iou", "energy")
#: A pixel belongs to the field of view when a channel exceeds this (the surround is black).
FOV_LEVEL = 10 / 255
#: Images per batch when computing saliency maps.
MAP_BATCH = 16


# --------------------------------------------------------------------------------------------
# the network and its data
# --------------------------------------------------------------------------------------------

def n_blocks_for(image_size: int) -> int:
    """Blocks of the original o_O stage at this input size: 3 below 224 px, 4 below 448 px, else 5."""
    return 3 if image_size < 224 else 4 if image_size < 448 else 5


def build_model(cfg: RunConfig) -> OONet:
    """The o_O net for ``cfg.image_size`` px inputs with ``cfg.width`` channels in block 1 (paper: 32)."""
    return OONet(n_blocks_for(cfg.image_size), cfg.image_size, cfg.width)


def gmsm_layers(model: OONet) -> tuple[str, str]:
    """(low, high) layer names of the GMSM for this net (see :data:`GMSM_LAYERS`)."""
    return GMSM_LAYERS[model.n_blocks]


def fov_masks(images: np.ndarray) -> np.ndarray:
    """(N, H, W) field-of-view masks of (N, H, W, 3) images in [0, 1]: bright pixels, holes filled."""
    bright = images.max(axis=-1) > FOV_LEVEL
    return np.stack([ndimage.binary_fill_holes(b) for b in bright])


@dataclass
class Pixels:
    """Images of one split as arrays: what saliency maps and generation work on."""

    ids: list[str]
    images: np.ndarray            # (N, H, W, 3) float32 in [0, 1]
    labels: np.ndarray            # (N,) DR grades
    fov: np.ndarray               # (N, H, W) bool
    masks: np.ndarray | None      # (N, 8, H, W) bool, None when the dataset has no lesion masks
    rows: pd.DataFrame            # the manifest rows, in the same order

    def __len__(self) -> int:
        return len(self.ids)

    def tensor(self, index: Sequence[int] | slice = slice(None)) -> Tensor:
        """ImageNet-normalised (n, 3, H, W) network input of the selected images."""
        x = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(0, 3, 1, 2)
        return normalize(x)


def load_pixels(manifest: pd.DataFrame, image_size: int, with_masks: bool, limit: int | None = None,
                seed: int = 0) -> Pixels:
    """The images (and masks) of ``manifest`` at ``image_size``; ``limit`` keeps a random subset."""
    rows = manifest.reset_index(drop=True)
    if limit is not None and len(rows) > limit:
        rows = rows.iloc[np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))].reset_index(drop=True)
    tasks = ("dr", "hr_image", "masks") if with_masks else ("dr", "hr_image")
    dataset = FundusDataset(rows, tasks=tasks, image_size=image_size, normalize=False)
    samples = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([s["hr_image"] for s in samples]).permute(0, 2, 3, 1).numpy().astype(np.float32)
    masks = torch.stack([s["masks"] for s in samples]).numpy() > 0 if with_masks else None
    return Pixels(rows["image_id"].astype(str).tolist(), images, rows["dr_grade"].to_numpy(dtype=int),
                  fov_masks(images), masks, rows)


@dataclass
class Data:
    """The manifest, its loaders and, when the dataset has lesion masks, the test images with masks."""

    manifest: pd.DataFrame
    loaders: dict
    has_masks: bool
    test: Pixels
    image_size: int

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)


def prepare(cfg: RunConfig, *, figure_images: int = 16) -> Data:
    """Manifest (:func:`fundus_lib.data.pipeline.load_dataset`), loaders for DR and the test images as
    arrays: all of them with masks on data that has lesion masks, else ``figure_images`` for figures."""
    manifest = pipeline.load_dataset(cfg)
    has_masks = pipeline.has_labels(manifest, "masks")
    loaders = pipeline.make_loaders(manifest, ("dr",), image_size=cfg.image_size, batch_size=cfg.batch_size,
                                    num_workers=cfg.num_workers, data_path=cfg.data_path, seed=cfg.seed)
    test = manifest[manifest["split"] == "test"]
    pixels = load_pixels(test, cfg.image_size, has_masks, None if has_masks else figure_images, cfg.seed)
    return Data(manifest, loaders, has_masks, pixels, cfg.image_size)


# --------------------------------------------------------------------------------------------
# training: regression + thresholds fitted on validation
# --------------------------------------------------------------------------------------------

def regression_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    """Mean squared error between the regressed severity and the DR grade (the o_O objective)."""
    return F.mse_loss(outputs["score"].float(), batch["dr"].float())


def round_schedule(round_epochs: int) -> Callable:
    """Scheduler factory for one round: the rate divided by 10 after each third of the round
    (the paper: 3e-5 -> 3e-6 -> 3e-7 every 10 of 30 epochs), stepped per epoch."""
    step = max(1, round_epochs // 3)
    return lambda optimizer, _steps: torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)


@dataclass
class Trained:
    """One model of one seed: weights, validation-fitted thresholds, history of every stage and test output."""

    name: str
    seed: int
    model: OONet
    thresholds: np.ndarray
    history: pd.DataFrame
    test_scores: np.ndarray
    seconds: float = 0.0

    def grades(self, scores: np.ndarray) -> np.ndarray:
        return apply_thresholds(scores, self.thresholds)


def _scores(model: nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    outputs, targets = predict(model, loader, device=device, keys=("score",), progress=False)
    return outputs["score"], targets["dr"].astype(int)


def _train(model: OONet, loaders: Mapping, cfg: RunConfig, *, epochs: int, lr: float, seed: int, desc: str,
           scheduler=None) -> pd.DataFrame:
    seed_everything(seed)
    return fit(model, regression_loss, loaders["train"], loaders["val"], epochs=epochs, lr=lr, scheduler=scheduler,
               device=choose_device(cfg.device), compile=bool(cfg.values.get("compile")), progress=False, desc=desc)


def _refit(trained: Trained, data: Data, device: torch.device) -> None:
    """Thresholds fitted on the validation split, then the test split predicted once."""
    val_scores, val_labels = _scores(trained.model, data.loaders["val"], device)
    trained.thresholds = (fit_thresholds(val_scores, val_labels, N_GRADES) if np.unique(val_labels).size > 1
                          else np.arange(1, N_GRADES) - 0.5)
    trained.test_scores, _ = _scores(trained.model, data.loaders["test"], device)


def test_metrics(trained: Trained, data: Data) -> dict[str, float]:
    """Quadratic kappa and accuracy of the thresholded scores on the test split."""
    truth = data.split("test")["dr_grade"].to_numpy(dtype=int)
    grades = trained.grades(trained.test_scores)
    kappa = metrics.quadratic_weighted_kappa(truth, grades, n_classes=N_GRADES)
    return {"kappa": float(np.nan_to_num(kappa)), "accuracy": metrics.accuracy(truth, grades)}


def train_baseline(cfg: RunConfig, data: Data, seed: int) -> Trained:
    """The o_O net trained on the original training images (``cfg.epochs`` at ``cfg.lr``)."""
    seed_everything(seed)
    model = build_model(cfg)
    with Timer() as timer:
        history = _train(model, data.loaders, cfg, epochs=cfg.epochs, lr=cfg.lr, seed=seed,
                         desc=f"baseline · seed {seed}")
        trained = Trained(BASELINE, seed, model, np.zeros(N_GRADES - 1), history.assign(stage="baseline"),
                          np.zeros(0))
        _refit(trained, data, choose_device(cfg.device))
    trained.seconds = timer.seconds
    return trained


@dataclass
class Result:
    """A tidy frame and what the figures need beside it."""

    frame: pd.DataFrame
    runs: dict[int, Trained] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def majority_frame(data: Data, seeds: Sequence[int]) -> pd.DataFrame:
    """The training split's majority grade scored on the test split, as rows for every seed."""
    scores = majority_scores(data.split("train")["dr_grade"].to_numpy(dtype=int),
                             data.split("test")["dr_grade"].to_numpy(dtype=int), N_GRADES)
    return run_seeds(lambda seed: scores, config=MAJORITY, seeds=seeds)


def baseline(cfg: RunConfig, data: Data, seeds: Sequence[int]) -> Result:
    """Table 1-2's baseline row: one o_O net per seed (kappa, accuracy, best epoch, seconds) and the
    majority class. ``runs`` maps each seed to its :class:`Trained`."""
    if not seeds:
        raise ValueError("baseline(): seeds is empty; give at least one seed")
    runs, rows = {}, []
    for seed in seeds:
        trained = train_baseline(cfg, data, int(seed))
        runs[int(seed)] = trained
        measured = {**test_metrics(trained, data), "best_epoch": trained.history.attrs.get("best_epoch") or 0,
                    "seconds": trained.seconds}
        rows += [{"config": BASELINE, "seed": int(seed), "metric": m, "value": v} for m, v in measured.items()]
    return Result(pd.concat([tidy(rows), majority_frame(data, seeds)], ignore_index=True), runs)


# --------------------------------------------------------------------------------------------
# saliency maps scored against the true masks
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How to make one saliency map: a method, the layers it fuses (``"low"``/``"high"`` or names)
    and the gate ``t`` (None: ``cfg.gate_t``; 0: the ReLU of Eq. 1). ``method="random"``: the floor."""

    method: str
    layers: tuple[str, ...]
    t: float | None = 0.0


def method_rows() -> dict[str, Recipe]:
    """Fig. 2's comparison: CAM (as Grad-CAM), Grad-CAM++ (Eq. 1) on the high layer, GMSM, random."""
    return {"CAM (Grad-CAM)": Recipe("gradcam", ("high",)), "Grad-CAM++": Recipe("gradcam++", ("high",)),
            "GMSM": Recipe("gradcam++", ("low", "high"), None), RANDOM: Recipe("random", ("low",))}


def layer_rows() -> dict[str, Recipe]:
    """Fig. 3's comparison: the gated Grad-CAM++ map of the low layer, the high layer, both fused."""
    return {"low layer": Recipe("gradcam++", ("low",), None), "high layer": Recipe("gradcam++", ("high",), None),
            "fused (GMSM)": Recipe("gradcam++", ("low", "high"), None), RANDOM: Recipe("random", ("low",))}


def _layer_names(model: OONet, layers: Sequence[str]) -> list[str]:
    low, high = gmsm_layers(model)
    return [{"low": low, "high": high}.get(layer, layer) for layer in layers]


def saliency_maps(model: OONet, x: Tensor, recipe: Recipe, t: float, *, seed: int = 0) -> np.ndarray:
    """(N, H, W) heat maps in [0, 1] of the normalised images ``x`` (batches of :data:`MAP_BATCH`).

    ``random``: uniform noise at the first layer's resolution, resized like a saliency map."""
    model.eval()
    names = _layer_names(model, recipe.layers)
    gate = t if recipe.t is None else recipe.t
    device = next(model.parameters()).device
    maps = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(x), MAP_BATCH):
        batch = x[start:start + MAP_BATCH].to(device)
        if recipe.method == "random":
            with torch.no_grad(), explain.LayerRecorder(model, names[:1]) as recorder:
                model(batch)
            size = recorder.activations[names[0]].shape[-2:]
            noise = torch.rand((len(batch), *size), generator=generator)
            maps.append(explain.fuse([noise], batch.shape[-2:]).numpy())
        else:
            maps.append(explain.saliency(model, batch, names, method=recipe.method, t=gate, output="score")
                        .detach().cpu().numpy())
    return np.concatenate(maps)


def lesion_images(pixels: Pixels) -> np.ndarray:
    """Indices of the images with lesion pixels inside the field of view (the scored images)."""
    if pixels.masks is None:
        return np.zeros(0, dtype=int)
    return np.flatnonzero((pixels.masks.any(axis=1) & pixels.fov).any(axis=(1, 2)))


def saliency_table(cfg: RunConfig, data: Data, runs: Mapping[int, Trained], rows: Mapping[str, Recipe]) -> Result:
    """Every recipe of ``rows`` on every seed's model, scored on the test images with lesions.

    The frame holds per seed the mean of each score of :data:`SALIENCY_METRICS` over those images;
    ``extra["per_image"][(config, metric)]`` is the (seeds, images) array behind it, for
    :func:`versus_random`. Raises a ValueError on data without lesion masks (say so instead)."""
    if not data.has_masks:
        raise ValueError(f"saliency_table(): {cfg.data_label} has no lesion masks to score saliency against")
    index = lesion_images(data.test)
    if not index.size:
        raise ValueError("saliency_table(): no test image shows a lesion")
    x = data.test.tensor(index)
    masks, fov = data.test.masks[index].any(axis=1), data.test.fov[index]
    per_image: dict[tuple[str, str], list[np.ndarray]] = {}
    records = []
    for seed, trained in runs.items():
        for name, recipe in rows.items():
            maps = saliency_maps(trained.model, x, recipe, cfg.gate_t, seed=seed)
            scores = explain.saliency_scores(maps, masks, fov)
            for metric in SALIENCY_METRICS:
                values = scores[metric].to_numpy()
                per_image.setdefault((name, metric), []).append(values)
                records.append({"config": name, "seed": int(seed), "metric": metric, "value": float(np.nanmean(values))})
    stacked = {key: np.stack(values) for key, values in per_image.items()}
    return Result(tidy(records), dict(runs), {"per_image": stacked, "images": index})


def versus_random(result: Result, metric: str, configs: Sequence[str], *, n_resamples: int = 2000) -> pd.DataFrame:
    """Each config minus the random map on ``metric``: paired bootstrap over test images x seeds
    (:func:`fundus_lib.stats.paired_bootstrap`), with each config's own mean and 95 % interval."""
    per_image = result.extra["per_image"]
    floor = per_image[(RANDOM, metric)]
    rows = []
    for config in configs:
        values = per_image[(config, metric)]
        keep = np.isfinite(values).all(axis=0) & np.isfinite(floor).all(axis=0)
        a, b = values[:, keep], floor[:, keep]
        own = paired_bootstrap(a, np.zeros_like(a), names=(config, "0"), metric_name=metric, n_resamples=n_resamples)
        diff = paired_bootstrap(a, b, names=(config, RANDOM), metric_name=metric, n_resamples=n_resamples)
        rows.append({"config": config, "metric": metric, "mean": own.effect, "low": own.low, "high": own.high,
                     "random": float(b.mean()), "difference": diff.effect, "diff_low": diff.low,
                     "diff_high": diff.high, "images": int(keep.sum()), "seeds": a.shape[0], "verdict": diff.verdict()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# lesion generation and iterative learning
# --------------------------------------------------------------------------------------------

def generate_images(cfg: RunConfig, data: Data, trained: Trained, rng: np.random.Generator, *,
                    n: int) -> list[generation.Generated]:
    """Up to ``n`` ELLG images (at most one per training image) from the training split with the
    current model (module :mod:`fundus_lib.generation`).

    The candidates are a random subset of the training images (up to ``4 n``), predicted by the
    model; sources and targets are drawn among the correctly classified ones, the GMSM of each
    source uses the model's :func:`gmsm_layers` and ``cfg.gate_t``."""
    device = next(trained.model.parameters()).device
    train = data.split("train")
    n = min(n, len(train))  # never more generated than original images in a combined round
    pool = load_pixels(train, data.image_size, data.has_masks, limit=max(4 * n, 16), seed=int(rng.integers(2**31)))
    with torch.no_grad():
        trained.model.eval()
        scores = np.concatenate([trained.model(pool.tensor(slice(s, s + MAP_BATCH)).to(device))["score"].cpu().numpy()
                                 for s in range(0, len(pool), MAP_BATCH)])
    pairs = generation.choose_pairs(trained.grades(scores), pool.labels, n, rng)
    if not pairs:
        return []
    sources = sorted({s for s, _ in pairs})
    low, high = gmsm_layers(trained.model)
    maps = dict(zip(sources, saliency_maps(trained.model, pool.tensor(sources), Recipe("gradcam++", (low, high), None),
                                           cfg.gate_t)))
    out = []
    for s, o in pairs:
        row = pool.rows.iloc[o]
        grading = None
        if pool.masks is not None and pd.notna(row.get("fovea_x")):
            grading = {"fovea": (float(row["fovea_x"]), float(row["fovea_y"])),
                       "disc": (float(row["disc_x"]), float(row["disc_y"])),
                       "disc_diameter": float(row["disc_diameter"])}
            if pd.notna(row.get("severe_ihe_per_quadrant", np.nan)):
                grading["severe_ihe_per_quadrant"] = int(row["severe_ihe_per_quadrant"])
        out.append(generation.generate_one(
            pool.images[s].astype(np.float64), pool.images[o].astype(np.float64), maps[s], source_id=pool.ids[s],
            target_id=pool.ids[o], source_label=int(pool.labels[s]), target_label=int(pool.labels[o]), rng=rng,
            thresholds=trained.thresholds, source_fov=pool.fov[s], target_fov=pool.fov[o],
            source_masks=None if pool.masks is None else pool.masks[s],
            target_masks=None if pool.masks is None else pool.masks[o], grading=grading))
    return out


def write_generated(images: Sequence[generation.Generated], folder: Path, prefix: str) -> pd.DataFrame:
    """Write generated images as PNG files into ``folder``; their training manifest rows (split
    ``train``, ``dr_grade`` = the mixed label, provenance columns ``ellg_*``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, item in enumerate(images):
        image_id = f"{prefix}-{k:04d}"
        path = folder / f"{image_id.replace('/', '_')}.png"
        Image.fromarray(np.round(item.image * 255).astype(np.uint8)).save(path)
        rows.append({"image_id": image_id, "image_path": str(path), "split": "train", "source": "ellg",
                     "patient_id": image_id, "dr_grade": item.label,
                     **{f"ellg_{key}": value for key, value in item.provenance().items()}})
    return make_manifest(rows)


def _round(cfg: RunConfig, data: Data, trained: Trained, kind: str, number: int, rng: np.random.Generator,
           folder: Path) -> tuple[pd.DataFrame, list[generation.Generated]]:
    """One round of training on the original or the combined training images; thresholds refitted."""
    made: list[generation.Generated] = []
    loaders = data.loaders
    if kind == "combined":
        made = generate_images(cfg, data, trained, rng, n=cfg.n_generated)
        if made:
            extra = write_generated(made, folder / f"seed{trained.seed}-round{number}",
                                    f"ellg/seed{trained.seed}/round{number}")
            combined = pd.concat([data.manifest, extra], ignore_index=True)
            loaders = pipeline.make_loaders(make_manifest(combined), ("dr",), image_size=data.image_size,
                                            batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                            data_path=cfg.data_path, seed=trained.seed + number, splits=("train",))
            loaders = {**data.loaders, "train": loaders["train"]}
    history = _train(trained.model, loaders, cfg, epochs=cfg.round_epochs, lr=cfg.round_lr, seed=trained.seed + number,
                     desc=f"{trained.name} · round {number}", scheduler=round_schedule(cfg.round_epochs))
    _refit(trained, data, choose_device(cfg.device))
    return history.assign(stage=f"round {number} ({kind})", generated=len(made)), made


def ellg_rounds(cfg: RunConfig, data: Data, runs: Mapping[int, Trained], *, rounds: Sequence[str] | None = None,
                control: bool = True) -> Result:
    """Iterative learning from each seed's baseline model: ``rounds`` (default ``cfg.rounds``) of
    ``"original"`` or ``"combined"`` (original + ``cfg.n_generated`` images generated with the
    current model) training; with ``control`` the same rounds on original images only.

    Frame: per seed, config (:data:`ELLG`, :data:`CONTROL`) kappa and accuracy after the last round
    and ``kappa_round<k>`` after each. ``runs`` holds the ELLG models, ``extra["control"]`` the
    controls, ``extra["generated"]`` the provenance table of every generated image (seed, round)
    and ``extra["samples"]`` the generated images of the first seed's first combined round."""
    rounds = list(cfg.rounds if rounds is None else rounds)
    bad = [kind for kind in rounds if kind not in ROUND_KINDS]
    if not rounds or bad:
        raise ValueError(f"rounds must be a non-empty list of {ROUND_KINDS}, got {rounds!r}")
    folder = cfg.run_dir / "ellg_generated"
    arms = {ELLG: rounds, **({CONTROL: ["original"] * len(rounds)} if control else {})}
    records, provenance, finished = [], [], {name: {} for name in arms}
    samples: list[generation.Generated] = []
    for seed, start in runs.items():
        for name, schedule in arms.items():
            trained = Trained(name, seed, copy.deepcopy(start.model), start.thresholds.copy(), start.history,
                              start.test_scores)
            rng = np.random.default_rng([seed, 14])
            histories = [start.history]
            with Timer() as timer:
                for number, kind in enumerate(schedule, start=1):
                    history, made = _round(cfg, data, trained, kind, number, rng, folder)
                    histories.append(history)
                    provenance += [{"seed": seed, "round": number, **item.provenance()} for item in made]
                    if made and not samples:
                        samples = made
                    records.append({"config": name, "seed": seed, "metric": f"kappa_round{number}",
                                    "value": test_metrics(trained, data)["kappa"]})
            trained.history = pd.concat(histories, ignore_index=True)
            trained.seconds = timer.seconds
            records += [{"config": name, "seed": seed, "metric": m, "value": v}
                        for m, v in {**test_metrics(trained, data), "seconds": timer.seconds}.items()]
            finished[name][seed] = trained
    base = [{"config": BASELINE, "seed": s, "metric": m, "value": v} for s, t in runs.items()
            for m, v in test_metrics(t, data).items()]
    frame = tidy(base + records)
    return Result(frame, finished[ELLG], {"control": finished.get(CONTROL, {}), "generated": pd.DataFrame(provenance),
                                          "samples": samples})


def label_agreement(generated: pd.DataFrame) -> dict[str, float]:
    """How often the mixed label (Eq. 6) equals the grade recomputed from the travelling masks, and
    how often it is lower / higher (only images with a recomputed grade)."""
    known = generated.dropna(subset=["true_grade"]) if "true_grade" in generated else generated.iloc[:0]
    if known.empty:
        return {}
    mixed, true = known["mixed_label"].to_numpy(int), known["true_grade"].to_numpy(int)
    return {"agree": float(np.mean(mixed == true)), "mixed_lower": float(np.mean(mixed < true)),
            "mixed_higher": float(np.mean(mixed > true)), "images": float(len(known))}


__all__ = ["BASELINE", "CONTROL", "ELLG", "GMSM_LAYERS", "MAJORITY", "RANDOM", "Data", "Pixels", "Recipe", "Result",
           "Trained", "baseline", "build_model", "ellg_rounds", "fov_masks", "generate_images", "gmsm_layers",
           "label_agreement", "layer_rows", "load_pixels", "method_rows", "n_blocks_for", "prepare",
           "regression_loss", "round_schedule", "saliency_maps", "saliency_table", "test_metrics",
           "train_baseline", "versus_random", "write_generated"]
