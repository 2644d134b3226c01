"""CLPI patch labels from pixel-level lesion masks (Yang et al., IEEE T-Cyb 2022, Sec. III-A, IV-A).

CLPI's lesion attention generator is a fully convolutional patch classifier: on a 1024 x 1024
image each unit of its 16 x 16 output sees one 68 x 68 window, the windows sliding with stride
64 (so each window is its stride cell plus 2 px on every side). Its four classes are

    0 = none of the target lesions, 1 = microaneurysm, 2 = haemorrhage, 3 = exudate.

The paper labels a patch by "the lesion type located in the center of this patch; if different
lesion regions share the same center, the most severe lesion", severity exudate > haemorrhage >
MA. Because the class ids grow with severity, "most severe" is simply the maximum class id.

Lesion vocabulary (:data:`~fundus_lib.data.manifest.LESIONS`) -> CLPI class, :data:`PATCH_LESIONS`:
MA -> 1; iHE (intraretinal haemorrhage, IDRiD's "HE") -> 2; HaEx (hard exudate) and CWS (soft
exudate / cotton-wool spot) -> 3. The paper trains on IDRiD, whose lesion masks are MA, HE, hard
and soft exudates, and names only "exudates", so both exudate kinds map to class 3 (a reading of
the paper, not stated in it). vHE, pHE, NV and FiP are not CLPI targets and count as background.

Two ways to turn masks into labels:

* :func:`grid_patch_labels` labels every window of the sliding grid at once (the dense target of
  the generator's 16 x 16 output map); this is what ``FundusDataset`` yields as ``patch_labels``.
* :func:`lesion_patch_centres` + :func:`crop_patches` reproduce the paper's patch set: one
  68 x 68 box centred on every lesion region (Table III counts these boxes).
  :func:`lesion_patch_set` applies them to a whole manifest, adding negatives from No-DR images;
  :func:`patch_count_table` counts the result like Table III; :class:`PatchLoader` serves it to
  ``fit`` in class-balanced batches for the generator's patch pre-training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from fundus_lib.data.batch_augment import BatchAugment
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

#: Names of the CLPI patch classes, indexed by class id.
PATCH_CLASSES: tuple[str, ...] = ("background", "microaneurysm", "haemorrhage", "exudate")

#: Lesion (from :data:`LESIONS`) -> CLPI class id; a higher id is a more severe lesion.
PATCH_LESIONS: dict[str, int] = {"MA": 1, "iHE": 2, "HaEx": 3, "CWS": 3}

#: Window side and stride of CLPI's generator (Table II: receptive field 68, output stride 64).
PATCH_WINDOW = 68
PATCH_STRIDE = 64


def _as_masks(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.ndim not in (3, 4) or masks.shape[-3] != len(LESIONS):
        raise ValueError(f"masks must be ({len(LESIONS)}, H, W) or (B, {len(LESIONS)}, H, W) in LESIONS order "
                         f"{LESIONS}, got shape {tuple(masks.shape)}")
    return masks


def _check_lesion_classes(lesion_classes: Mapping[str, int]) -> None:
    unknown = sorted(set(lesion_classes) - set(LESIONS))
    if unknown:
        raise ValueError(f"lesion_classes names unknown lesions {unknown}; expected names from {LESIONS}")
    bad = {k: v for k, v in lesion_classes.items() if not isinstance(v, (int, np.integer)) or v < 1}
    if bad:
        raise ValueError(f"lesion_classes must map lesions to class ids >= 1 (0 is background), got {bad}")


def class_map(masks: torch.Tensor | np.ndarray, lesion_classes: Mapping[str, int] = PATCH_LESIONS) -> torch.Tensor:
    """Per-pixel CLPI class: the most severe target lesion covering the pixel, 0 where none.

    ``masks``: (8, H, W) or (B, 8, H, W), any dtype, non-zero = lesion. Returns long (H, W) or (B, H, W).
    """
    masks = _as_masks(masks)
    _check_lesion_classes(lesion_classes)
    ids = torch.zeros(len(LESIONS), dtype=torch.long, device=masks.device)
    for lesion, class_id in lesion_classes.items():
        ids[LESIONS.index(lesion)] = int(class_id)
    return ((masks != 0).long() * ids.view(-1, 1, 1)).amax(dim=-3)


def grid_patch_labels(masks: torch.Tensor | np.ndarray, window: int = PATCH_WINDOW, stride: int = PATCH_STRIDE,
                      centre: int | None = None,
                      lesion_classes: Mapping[str, int] = PATCH_LESIONS) -> torch.Tensor:
    """Label every ``window`` x ``window`` patch of a sliding grid with step ``stride``.

    The grid matches CLPI's generator: an H x W image gives (H // stride) x (W // stride)
    windows, window (i, j) starting at ``(stride * i - p, stride * j - p)`` with
    ``p = (window - stride) // 2`` (zero padding outside the image). A window's label is the most
    severe target lesion in its central ``centre`` x ``centre`` region.

    ``centre=None`` (default) uses ``centre = stride``: the window's own cell of the stride grid, so
    every lesion pixel is counted by exactly one window. This is the dense counterpart of the
    paper's lesion-centred boxes, whose lesions lie anywhere in that cell at inference time.
    ``centre=2`` is the literal "lesion at the centre pixel(s)" rule of the paper's text (the
    centre of an even-sized window is its middle 2 x 2 pixels); tiny lesions such as
    microaneurysms then rarely produce a positive window.

    Returns long (H // stride, W // stride), or (B, ...) for batched masks.
    """
    masks = _as_masks(masks)
    if not (isinstance(window, int) and isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(f"need ints with 1 <= stride <= window, got window={window!r}, stride={stride!r}")
    centre = stride if centre is None else centre
    if not isinstance(centre, int) or not 1 <= centre <= window:
        raise ValueError(f"centre must be an int in 1..window={window}, got {centre!r}")
    height, width = masks.shape[-2:]
    if height < stride or width < stride:
        raise ValueError(f"masks of size {height}x{width} are smaller than one patch stride ({stride})")
    rows, cols = height // stride, width // stride
    labels = class_map(masks, lesion_classes)
    batch_shape = labels.shape[:-2]
    # First pixel of window 0's central region; the region of window i starts stride * i later.
    offset = (window - centre) // 2 - (window - stride) // 2
    before = max(0, -offset)
    after_h = max(0, stride * (rows - 1) + offset + centre - height)
    after_w = max(0, stride * (cols - 1) + offset + centre - width)
    padded = F.pad(labels.reshape(-1, 1, height, width).float(), (before, after_w, before, after_h))
    start = offset + before
    pooled = F.max_pool2d(padded[..., start:, start:], kernel_size=centre, stride=stride)
    return pooled[:, 0, :rows, :cols].long().reshape(*batch_shape, rows, cols)


def lesion_patch_centres(masks: torch.Tensor | np.ndarray,
                         lesion_classes: Mapping[str, int] = PATCH_LESIONS) -> tuple[np.ndarray, np.ndarray]:
    """The paper's patch set for one image: one box centre per connected lesion region.

    Each 8-connected region of a target lesion gives a centre at its centroid (rounded). The
    label is the most severe lesion "located in the center": the region's own class or any
    target lesion covering the centre pixel, whichever is more severe; regions sharing a centre
    give one patch. ``masks``: (8, H, W). Returns ``centres`` (N, 2) int64 (row, col) and
    ``labels`` (N,) int64, sorted by (row, col).
    """
    masks = _as_masks(masks)
    if masks.ndim != 3:
        raise ValueError(f"lesion_patch_centres takes one image's masks (8, H, W), got {tuple(masks.shape)}")
    pixel_classes = class_map(masks, lesion_classes).numpy()
    binary = (masks != 0).numpy()
    centres, labels = [], []
    for lesion, class_id in lesion_classes.items():
        regions, count = ndimage.label(binary[LESIONS.index(lesion)], structure=np.ones((3, 3)))
        if count == 0:
            continue
        found = np.rint(ndimage.center_of_mass(binary[LESIONS.index(lesion)], regions, np.arange(1, count + 1)))
        found = found.astype(np.int64).reshape(-1, 2)
        centres.append(found)
        labels.append(np.maximum(class_id, pixel_classes[found[:, 0], found[:, 1]]))
    if not centres:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    all_centres, all_labels = np.concatenate(centres), np.concatenate(labels)
    unique, inverse = np.unique(all_centres, axis=0, return_inverse=True)
    merged = np.zeros(len(unique), dtype=np.int64)
    np.maximum.at(merged, inverse.reshape(-1), all_labels)
    return unique, merged


def crop_patches(image: torch.Tensor, centres: np.ndarray | torch.Tensor, size: int = PATCH_WINDOW) -> torch.Tensor:
    """Cut ``size`` x ``size`` patches centred on ``centres`` (N, 2) (row, col) from a (C, H, W)
    image; parts outside the image are zero. Returns (N, C, size, size).

    For an even ``size`` the centre pixel sits at index ``size // 2`` of the patch.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    centres = torch.as_tensor(np.asarray(centres), dtype=torch.long).reshape(-1, 2)
    height, width = image.shape[-2:]
    outside = (centres[:, 0] < 0) | (centres[:, 0] >= height) | (centres[:, 1] < 0) | (centres[:, 1] >= width)
    if outside.any():
        raise ValueError(f"centres must lie inside the {height}x{width} image, got {centres[outside][:3].tolist()}")
    padded = F.pad(image, (size, size, size, size))
    steps = torch.arange(size) - size // 2 + size
    rows = centres[:, 0, None] + steps  # (N, size) indices into the padded image
    cols = centres[:, 1, None] + steps
    patches = padded[:, rows[:, :, None], cols[:, None, :]]  # (C, N, size, size)
    return patches.permute(1, 0, 2, 3).contiguous()


#: Brightest-channel level in [0, 1] above which a pixel counts as inside the field of view (the
#: black surround of a fundus photograph stays far below it); negatives are centred on such pixels.
FOV_LEVEL = 0.1


def lesion_patch_set(manifest: pd.DataFrame, *, image_size: int | None = None, negatives_per_image: int = 8,
                     seed: int = 0, lesion_classes: Mapping[str, int] = PATCH_LESIONS) -> dict[str, Any]:
    """The paper's patch training set from a manifest (Sec. IV-A, Table III; Sec. V for the negatives).

    Positives: a :data:`PATCH_WINDOW` box on every connected target-lesion region of every image
    with at least one target-lesion mask, labelled by :func:`lesion_patch_centres` (most severe
    lesion at the centre). Negatives (class 0): ``negatives_per_image`` boxes centred on random
    field-of-view pixels of every No-DR image (``dr_grade == 0``) — never taken from lesion images,
    whose unannotated lesions would become false negatives (why the paper's generator is robust
    to missing annotations, Fig. 8). Images are read at ``image_size`` (None: as stored).

    Returns ``{"image": uint8 (N, 3, 68, 68), "patch_labels": int64 (N,), "image_id": N str}``.
    """
    from fundus_lib.data.datasets import FundusDataset  # datasets imports this module

    if isinstance(negatives_per_image, bool) or not isinstance(negatives_per_image, int) or negatives_per_image < 0:
        raise ValueError(f"negatives_per_image must be an int >= 0, got {negatives_per_image!r}")
    _check_lesion_classes(lesion_classes)
    positive = manifest[[f"mask_{lesion}" for lesion in lesion_classes]].notna().any(axis=1).to_numpy()
    negative = (manifest["dr_grade"] == 0).fillna(False).to_numpy(dtype=bool) & (negatives_per_image > 0)
    keep = positive | negative
    if not keep.any():
        raise ValueError("the manifest has no image with a target-lesion mask and no No-DR image: no patches")
    rows = manifest[keep].reset_index(drop=True)
    dataset = FundusDataset(rows, tasks=("masks",), image_size=image_size, normalize=False)
    rng = np.random.default_rng(seed)
    patches, labels, image_ids = [], [], []
    for index, (is_positive, is_negative) in enumerate(zip(positive[keep], negative[keep])):
        sample = dataset[index]
        image = (sample["image"] * 255).round().to(torch.uint8)
        found: list[tuple[np.ndarray, np.ndarray]] = []
        if is_positive:
            found.append(lesion_patch_centres(sample["masks"], lesion_classes))
        if is_negative:
            inside = np.argwhere(sample["image"].amax(dim=0).numpy() > FOV_LEVEL)
            if len(inside) == 0:
                raise ValueError(f"No-DR image {rows.at[index, 'image_id']!r} has no field-of-view pixel "
                                 f"(brightest channel > {FOV_LEVEL}) to centre negatives on")
            centres = inside[rng.integers(0, len(inside), negatives_per_image)]
            found.append((centres, np.zeros(negatives_per_image, dtype=np.int64)))
        for centres, classes in found:
            patches.append(crop_patches(image, centres))
            labels.append(classes)
            image_ids += [str(rows.at[index, "image_id"])] * len(classes)
    return {"image": torch.cat(patches), "patch_labels": torch.from_numpy(np.concatenate(labels)),
            "image_id": image_ids}


def patch_count_table(patch_sets: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Table III's layout for patch sets by name (e.g. ``{"train": ..., "test": ...}``).

    Columns: ``lesion images`` (images giving at least one lesion patch) and the patch count of
    each class of :data:`PATCH_CLASSES` (``background`` = the negatives, which Table III omits).
    """
    table = {}
    for name, patch_set in patch_sets.items():
        labels = torch.as_tensor(patch_set["patch_labels"])
        counts = torch.bincount(labels, minlength=len(PATCH_CLASSES)).tolist()
        lesion_images = {image_id for image_id, label in zip(patch_set["image_id"], labels.tolist()) if label > 0}
        table[name] = {"lesion images": len(lesion_images), **dict(zip(PATCH_CLASSES, counts))}
    return pd.DataFrame.from_dict(table, orient="index")


@dataclass
class PatchLoader:
    """Batches of a :func:`lesion_patch_set` for :func:`fundus_lib.train.fit` (patch pre-training).

    Yields ``{"image": float (B, 3, 68, 68), "patch_labels": (B,)}``, the image in [0, 1] and then
    ImageNet-normalised like ``FundusDataset`` (``normalize``), so the generator sees patches as it
    later sees whole images. ``per_class``: each epoch draws that many patches of every class
    present (without replacement where a class has enough, with replacement otherwise): balanced
    classes although exudate patches outnumber the rest (Table III). ``None``: every patch once,
    shuffled when ``shuffle``. ``augment``: a :class:`BatchAugment` (the paper augments patches
    as it does images, Sec. IV-B).
    """

    patch_set: Mapping[str, Any]
    batch_size: int
    per_class: int | None = None
    shuffle: bool = True
    augment: BatchAugment | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    normalize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.per_class is not None and (not isinstance(self.per_class, int) or self.per_class < 1):
            raise ValueError(f"per_class must be a positive int or None, got {self.per_class!r}")
        if len(self.patch_set["patch_labels"]) == 0:
            raise ValueError("the patch set is empty")

    def _rows(self) -> int:
        labels = self.patch_set["patch_labels"]
        return len(labels) if self.per_class is None else self.per_class * len(labels.unique())

    def __len__(self) -> int:
        return -(-self._rows() // self.batch_size)

    def _order(self) -> torch.Tensor:
        labels = self.patch_set["patch_labels"]
        if self.per_class is None:
            return torch.randperm(len(labels), generator=self.generator) if self.shuffle else torch.arange(len(labels))
        picks = []
        for label in labels.unique():
            members = (labels == label).nonzero().flatten()
            if len(members) >= self.per_class:
                picks.append(members[torch.randperm(len(members), generator=self.generator)[:self.per_class]])
            else:
                picks.append(members[torch.randint(len(members), (self.per_class,), generator=self.generator)])
        order = torch.cat(picks)
        return order[torch.randperm(len(order), generator=self.generator)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            images = self.patch_set["image"][index].float().div_(255)
            if self.augment is not None:
                images, _ = self.augment(images, generator=self.generator)
            yield {"image": normalize(images, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else images,
                   "patch_labels": self.patch_set["patch_labels"][index]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What decides the next epoch's draw and augmentation (saved in ``fit``'s checkpoints)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
