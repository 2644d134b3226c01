"""Torch datasets over a manifest: one class, each model asks for the sample keys it needs.

``FundusDataset(manifest, tasks=("dr", "masks"), transform=train_transform(224))`` yields dicts
with ``image`` and ``meta`` always and one entry per requested task (see :data:`TASKS`):

==================  ======================  ===============================================
key                 shape / dtype           meaning
==================  ======================  ===============================================
``image``           (3, H, W) float32       the network input; ImageNet-normalised by default
                                            (``normalize=False`` keeps it in [0, 1])
``dr``              () int64                DR grade (``dr_grade``)
``dme``             () int64                DME grade (``dme_grade``)
``masks``           (8, H, W) float32       lesion masks {0, 1} in :data:`LESIONS` order,
                                            moved with the image by the transform
``mask_valid``      (8,) float32            1 where the lesion is annotated for this image (comes
                                            with ``masks`` and ``lesion_present``)
``lesion_present``  (8,) float32            image-level presence ``lesion_<L>`` (NA -> 0); an
                                            augmentation crop does not change it
``patch_labels``    (H//64, W//64) int64    CLPI patch classes of the final masks (patches.py)
``hr_image``        (3, H, W) float32       the final image in [0, 1], not normalised (SR target)
``lr_image``        (3, H/r, W/r) float32   bicubic down-sample of ``hr_image`` by ``lr_scale``,
                                            in [0, 1] (DeepMT-DR's low-resolution input)
``meta``            dict                    ``image_id``, ``source``, ``split`` (str, "" if NA),
                                            ``index`` (row position)
==================  ======================  ===============================================

Per lesion L the manifest gives a mask path ``mask_<L>`` and a presence flag ``lesion_<L>``:

* path given                -> the mask file, read with the row's ``mask_rule``; valid
* no path, ``lesion_<L>=0``  -> annotated and absent: zeros; valid
* no path, ``lesion_<L>=1``  -> present but not outlined: zeros; **not** valid (mask unknown)
* no path, ``lesion_<L>=NA`` -> not annotated in this dataset: zeros; not valid
* path given, ``lesion_<L>=NA`` -> rejected at construction (sources set the flag with the mask)

Losses and metrics multiply by ``mask_valid`` so unannotated lesions never count as negatives.
Requested labels must exist: a requested task whose column is NA for some row raises a
:class:`~fundus_lib.data.manifest.ManifestError` at construction naming the column and the first
image ids (filter the manifest first), never a silent -1.

Everything the dataset holds is plain Python / NumPy / torch, so it pickles into DataLoader
workers (``num_workers > 0``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from fundus_lib.data.manifest import (LESIONS, MASK_COLUMNS, PRESENCE_COLUMNS, ManifestError, check_photo_shape,
                                      read_image, read_mask, validate_manifest)
from fundus_lib.data.patches import PATCH_LESIONS, PATCH_STRIDE, PATCH_WINDOW, grid_patch_labels
from fundus_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize as normalize_image
from fundus_lib.data.transforms import resize_arrays, to_tv_tensors

#: Task names a dataset can be asked for, each adding the sample keys documented above.
TASKS: tuple[str, ...] = ("dr", "dme", "masks", "lesion_present", "patch_labels", "hr_image", "lr_image")

_LABEL_COLUMNS = {"dr": "dr_grade", "dme": "dme_grade"}
_MASK_TASKS = ("masks", "patch_labels")


def _check_tasks(tasks: Iterable[str] | str) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks are {TASKS}")
    return tuple(dict.fromkeys(tasks))


def _first_ids(manifest: pd.DataFrame, rows: pd.Series, n: int = 5) -> list[str]:
    return manifest.loc[rows, "image_id"].astype(str).tolist()[:n]


class FundusDataset(Dataset):
    """Dict samples from a manifest (keys in the module docstring).

    Steps per sample: :func:`read_image` (a photo under 16 px or over 4:1 raises, see
    :func:`~fundus_lib.data.manifest.check_photo_shape`; and the masks the tasks need) -> resize to
    ``image_size`` x ``image_size`` when given (:func:`resize_arrays`; non-square photographs are
    stretched, so crop the field of view first, e.g. in the cache) -> ``transform(image, masks)``
    (v2 transforms on a uint8 :class:`tv_tensors.Image` and :class:`tv_tensors.Mask`; see
    transforms.py) -> float in [0, 1] -> patch labels, ``hr_image`` / ``lr_image`` from the final
    picture -> ImageNet normalisation of ``image`` when ``normalize``.

    Parameters: ``tasks`` from :data:`TASKS`; ``lr_scale`` the down-sampling factor of
    ``lr_image`` (DeepMT-DR: 4); ``patch_window`` / ``patch_stride`` / ``patch_centre`` /
    ``patch_lesions`` as in :func:`~fundus_lib.data.patches.grid_patch_labels`.
    """

    def __init__(self, manifest: pd.DataFrame, tasks: Iterable[str] | str = ("dr",), transform: Any = None,
                 image_size: int | None = None, lr_scale: int = 4, *, normalize: bool = True,
                 patch_window: int = PATCH_WINDOW, patch_stride: int = PATCH_STRIDE,
                 patch_centre: int | None = None, patch_lesions: Mapping[str, int] = PATCH_LESIONS) -> None:
        validate_manifest(manifest)
        if len(manifest) == 0:
            raise ManifestError("FundusDataset got an empty manifest")
        self.tasks = _check_tasks(tasks)
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, int) or lr_scale < 1:
            raise ValueError(f"lr_scale must be a positive int, got {lr_scale!r}")
        if "lr_image" in self.tasks and image_size is not None and image_size % lr_scale:
            raise ValueError(f"image_size={image_size} is not divisible by lr_scale={lr_scale}")
        if "patch_labels" in self.tasks and image_size is not None and image_size < patch_stride:
            raise ValueError(f"image_size={image_size} is smaller than patch_stride={patch_stride}: no patch fits")
        self.manifest = manifest.reset_index(drop=True)
        self.transform = transform
        self.image_size = image_size
        self.lr_scale = lr_scale
        self.normalize = normalize
        self.patch_options = {"window": patch_window, "stride": patch_stride, "centre": patch_centre,
                              "lesion_classes": dict(patch_lesions)}
        if "patch_labels" in self.tasks:  # a dry run on one empty cell rejects bad patch options now
            grid_patch_labels(torch.zeros(len(LESIONS), patch_stride, patch_stride), **self.patch_options)
        self._check_labels()
        frame = self.manifest
        self._image_paths = frame["image_path"].astype(str).tolist()
        self._mask_paths = [[None if pd.isna(p) else str(p) for p in row]
                            for row in frame[list(MASK_COLUMNS)].itertuples(index=False)]
        self._mask_rules = frame["mask_rule"].astype(str).tolist()
        self._labels = {task: frame[column].to_numpy(dtype=np.int64, na_value=-1)
                        for task, column in _LABEL_COLUMNS.items() if task in self.tasks}
        presence = frame[list(PRESENCE_COLUMNS)]
        has_path = frame[list(MASK_COLUMNS)].notna().to_numpy()
        self._present = presence.fillna(0).to_numpy(dtype=np.float32)
        self._valid = (has_path | (presence == 0).fillna(False).to_numpy()).astype(np.float32)
        self._meta = frame[["image_id", "source", "split"]].fillna("").astype(str).to_dict("records")
        # Lesions whose files must be read: all for "masks", the CLPI targets for "patch_labels".
        wanted = (set(LESIONS) if "masks" in self.tasks
                  else set(patch_lesions) if "patch_labels" in self.tasks else set())
        self._read_lesions = [i for i, lesion in enumerate(LESIONS) if lesion in wanted]

    def _check_labels(self) -> None:
        """Fail at construction, naming column and image ids, when a requested label is missing."""
        frame = self.manifest
        for task, column in _LABEL_COLUMNS.items():
            missing = frame[column].isna()
            if task in self.tasks and missing.any():
                raise ManifestError(f"task {task!r} needs {column}, which is NA for {int(missing.sum())} image(s), "
                                    f"e.g. {_first_ids(frame, missing)}; drop those rows or leave out {task!r}")
        if not {"masks", "lesion_present", "patch_labels"} & set(self.tasks):
            return
        for lesion in LESIONS:
            orphan = frame[f"mask_{lesion}"].notna() & frame[f"lesion_{lesion}"].isna()
            if orphan.any():
                raise ManifestError(f"mask_{lesion} is given but lesion_{lesion} is NA for image(s) "
                                    f"{_first_ids(frame, orphan)}; sources must set lesion_{lesion} with the mask")
        if "patch_labels" in self.tasks:
            for lesion in self.patch_options["lesion_classes"]:
                unknown = frame[f"mask_{lesion}"].isna() & (frame[f"lesion_{lesion}"] != 0).fillna(True)
                if unknown.any():
                    raise ManifestError(f"task 'patch_labels' needs the {lesion} mask, unknown (mask_{lesion} NA and "
                                        f"lesion_{lesion} not 0) for {int(unknown.sum())} image(s), "
                                        f"e.g. {_first_ids(frame, unknown)}; drop those rows or pass patch_lesions "
                                        f"without {lesion!r}")

    def __len__(self) -> int:
        return len(self._image_paths)

    def _read_masks(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        masks = np.zeros((len(LESIONS), *shape), dtype=bool)
        for lesion_index in self._read_lesions:
            path = self._mask_paths[index][lesion_index]
            if path is None:
                continue
            mask = read_mask(path, self._mask_rules[index])
            if mask.shape != shape:
                raise ManifestError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                                    f"{self._image_paths[index]} is {shape[0]}x{shape[1]}")
            masks[lesion_index] = mask
        return masks

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = check_photo_shape(read_image(self._image_paths[index]), self._image_paths[index])
        needs_masks = any(task in self.tasks for task in _MASK_TASKS)
        masks = self._read_masks(index, image.shape[:2]) if needs_masks else None
        if self.image_size is not None:
            image, masks = resize_arrays(image, masks, self.image_size)
        image_t, masks_t = to_tv_tensors(image, masks)
        if self.transform is not None:
            if masks_t is None:
                image_t = self.transform(image_t)
            else:
                image_t, masks_t = self.transform(image_t, masks_t)
        hr = TF.to_dtype(image_t, torch.float32, scale=True).as_subclass(torch.Tensor)
        sample: dict[str, Any] = {}
        if masks_t is not None:
            if masks_t.shape[-2:] != hr.shape[-2:]:
                raise ValueError(f"transform returned image {tuple(hr.shape)} and masks {tuple(masks_t.shape)} "
                                 "of different sizes; use joint v2 transforms")
            masks_f = masks_t.as_subclass(torch.Tensor).float()
            if "masks" in self.tasks:
                sample["masks"] = masks_f
            if "patch_labels" in self.tasks:
                sample["patch_labels"] = grid_patch_labels(masks_f, **self.patch_options)
        if "masks" in self.tasks or "lesion_present" in self.tasks:
            sample["mask_valid"] = torch.from_numpy(self._valid[index])
        if "lesion_present" in self.tasks:
            sample["lesion_present"] = torch.from_numpy(self._present[index])
        for task, labels in self._labels.items():
            sample[task] = torch.tensor(labels[index], dtype=torch.long)
        if "hr_image" in self.tasks:
            sample["hr_image"] = hr
        if "lr_image" in self.tasks:
            sample["lr_image"] = self._downsample(hr)
        sample["image"] = normalize_image(hr, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else hr
        sample["meta"] = {**self._meta[index], "index": index}
        return sample

    def _downsample(self, hr: torch.Tensor) -> torch.Tensor:
        """Bicubic (antialiased) down-sampling by ``lr_scale``, clamped back to [0, 1]."""
        height, width = hr.shape[-2:]
        if height % self.lr_scale or width % self.lr_scale:
            raise ValueError(f"image of size {height}x{width} is not divisible by lr_scale={self.lr_scale}; "
                             "choose image_size as a multiple of lr_scale")
        size = (height // self.lr_scale, width // self.lr_scale)
        lr = F.interpolate(hr[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
        return lr.clamp(0.0, 1.0)
