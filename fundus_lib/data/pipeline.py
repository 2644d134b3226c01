"""From a notebook's configuration to data: one call for the manifest, one for the loaders.

* :func:`load_dataset` returns a manifest with train / val / test splits: the synthetic benchmark
  (generated once into ``data/generated/synthetic/<key>`` and reused) or a real dataset read by
  its source, given a validation split carved from its training images when it has none, cropped
  to its field of view and cached at the size a model trains at under ``data/generated/cache/<dataset>-<size>``.
* :func:`available_tasks` keeps the tasks a dataset labels (DR alone on APTOS) and says what it drops.
* :func:`make_loaders` serves each split either from memory (uint8 tensors, batches augmented
  on the training device) or through DataLoader workers, as :func:`choose_data_path` decides:
  augmentation for training, deterministic resizing for validation and test.

Notebooks call these two so that every paper notebook reads its data the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fundus_lib.config import DATA_PATHS, RunConfig
from fundus_lib.data.batch_augment import BatchAugment
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.in_memory import TensorData, TensorLoader, tensor_bytes
from fundus_lib.data.manifest import LESIONS, SPLITS, make_manifest
from fundus_lib.data.transforms import eval_transform, train_transform
from fundus_lib.utils import default_num_workers, seed_everything, seed_worker, usable_cores

#: Share of an official training set held out for validation when a dataset has no val split.
VALIDATION_SHARE = 0.15


def split_seed(seed: int, split: str) -> int:
    """A distinct, reproducible generator seed per split, derived from the run seed."""
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def generation_workers(n_images: int) -> int:
    """Processes for writing ``n_images`` synthetic images: one per core (up to 16), none for small sets.
    The images do not depend on it (write_dataset renders each image from its own seed)."""
    return max(1, min(16, usable_cores(), n_images // 64))


def synthetic_benchmark(n_train: int, n_val: int, n_test: int, image_size: int, seed: int, *,
                        root: str | Path, domain: str = "cam_a", difficulty: float = 0.0) -> pd.DataFrame:
    """The synthetic benchmark's train / val / test manifest, generating each split once.

    Each split is written by :func:`fundus_lib.data.synthetic.write_dataset` into
    ``root/<key>/<split>`` (the key encodes every parameter and the generator version, so a
    different size, seed or generator never reuses stale images) with its own seed, and read back by the synthetic source.
    """
    from fundus_lib.data.sources.synthetic import load_synthetic
    from fundus_lib.data.synthetic import GENERATOR_VERSION, write_dataset

    key = f"v{GENERATOR_VERSION}-{domain}-{image_size}px-d{difficulty:g}-seed{seed}-{n_train}-{n_val}-{n_test}"
    parts = []
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        folder = Path(root) / key / split
        if not (folder / "labels.csv").is_file():
            write_dataset(folder, n=count, size=image_size, seed=split_seed(seed, split), domain=domain,
                          difficulty=difficulty, workers=generation_workers(count))
        part = load_synthetic(folder)
        # Every split is its own draw (own seed) with ids restarting at 0: prefix them so each
        # image and each synthetic "patient" is unique across splits.
        for column in ("image_id", "patient_id"):
            part[column] = split + "/" + part[column].astype(str)
        part["split"] = split
        parts.append(part)
    return make_manifest(pd.concat(parts, ignore_index=True))


def load_dataset(cfg: RunConfig, image_size: int | None = None) -> pd.DataFrame:
    """The manifest a notebook trains and evaluates on, as its configuration asks.

    Synthetic (``dataset="synthetic"`` or no ``dataset`` parameter): :func:`synthetic_benchmark`
    with ``n_train / n_val / n_test / seed`` (and ``domain`` / ``difficulty`` when the notebook
    declares them). Real: the source named by ``dataset`` reads ``data_dir``; rows without a split
    are divided train / val / test, a missing val split is carved from train (grouped by patient,
    stratified by DR grade), then images are cropped to their field of view and cached.

    Images are made (synthetic) or cached (real) at ``image_size``, default ``cfg.image_size``:
    a notebook whose models train at different sizes (L-Net at ``seg_image_size``, the grader at
    ``image_size``) asks once per size, so no model trains on images resampled from another size.
    """
    values = cfg.as_dict()
    size = image_size or cfg.image_size
    if cfg.is_synthetic:
        missing = [name for name in ("n_train", "n_val", "n_test") if values.get(name) is None]
        if missing:
            raise ValueError(f"the synthetic benchmark needs {missing} (image counts per split)")
        return synthetic_benchmark(cfg.n_train, cfg.n_val, cfg.n_test, size, cfg.seed,
                                   root=cfg.generated_dir / "synthetic", domain=values.get("domain") or "cam_a",
                                   difficulty=values.get("difficulty") or 0.0)
    from fundus_lib.data.cache import build_cache
    from fundus_lib.data.sources import load_source
    from fundus_lib.data.splits import assign_splits
    from fundus_lib.preprocess import fov_crop_box

    if not values.get("data_dir"):
        raise ValueError(f"dataset={cfg.dataset!r} needs data_dir (the folder of the official download; "
                         "see data/README.md), or set FUNDUS_DATA_DIR")
    manifest = load_source(cfg.dataset, cfg.data_dir)
    if manifest["split"].isna().all():
        manifest = assign_splits(manifest, val=VALIDATION_SHARE, test=VALIDATION_SHARE, seed=cfg.seed)
    elif not (manifest["split"] == "val").any():
        manifest = assign_splits(manifest, val=VALIDATION_SHARE, test=0.0, seed=cfg.seed, source_split="train")
    # Crop to the square around the field of view first, so a 3:2 photograph is not stretched.
    return build_cache(manifest, cfg.generated_dir / "cache" / f"{cfg.dataset}-{size}", size, crop_box=fov_crop_box)


#: Manifest column(s) that hold each task's labels; a task is available when one of them has values.
_TASK_LABELS: dict[str, tuple[str, ...]] = {
    "dr": ("dr_grade",), "dme": ("dme_grade",),
    "masks": tuple(f"mask_{lesion}" for lesion in LESIONS),
    "lesion_present": tuple(f"lesion_{lesion}" for lesion in LESIONS),
}


def has_labels(manifest: pd.DataFrame, task: str) -> bool:
    """True when the dataset labels ``task`` at all ("dr", "dme", "masks" or "lesion_present"):
    APTOS and EyePACS have no DME grades, the grading datasets no lesion masks."""
    if task not in _TASK_LABELS:
        raise ValueError(f"has_labels: task must be one of {list(_TASK_LABELS)}, got {task!r}")
    return any(manifest[column].notna().any() for column in _TASK_LABELS[task] if column in manifest)


def available_tasks(manifest: pd.DataFrame, tasks: Sequence[str], data_label: str) -> tuple[str, ...]:
    """The ``tasks`` the dataset labels, in order; prints a note naming each task it drops.

    A notebook that grades DR and DME runs on a DR-only dataset (APTOS, EyePACS) with DR alone,
    saying so, instead of stopping at the first DME label it cannot find.
    """
    kept = tuple(task for task in tasks if has_labels(manifest, task))
    for task in tasks:
        if task not in kept:
            print(f"note: {data_label} has no {task.upper() if task in ('dr', 'dme') else task} labels, "
                  f"so the {task!r} task is left out of this run")
    if not kept:
        raise ValueError(f"{data_label} labels none of the tasks {list(tasks)}; choose a dataset that has them")
    return kept


#: Share of the machine's memory the in-memory path may take for one call of :func:`make_loaders`.
MEMORY_SHARE = 0.25


def _total_memory() -> int:
    """Physical memory in bytes (POSIX); 8 GiB when the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def choose_data_path(manifest: pd.DataFrame, tasks: Sequence[str], image_size: int, data_path: str = "auto") -> str:
    """``"memory"`` (uint8 tensors, augmentation on the device) or ``"stream"`` (DataLoader workers).

    ``"auto"`` picks memory when every split at ``image_size`` takes at most :data:`MEMORY_SHARE`
    of this machine's memory (all synthetic profiles, IDRiD, Messidor), else stream (EyePACS).
    """
    if data_path not in DATA_PATHS:
        raise ValueError(f"data_path must be one of {list(DATA_PATHS)}, got {data_path!r}")
    if data_path != "auto":
        return data_path
    return "memory" if tensor_bytes(len(manifest), image_size, tasks) <= MEMORY_SHARE * _total_memory() else "stream"


def make_loaders(manifest: pd.DataFrame, tasks: Sequence[str], *, image_size: int, batch_size: int,
                 num_workers: int | None = None, seed: int = 0, augment: bool = True,
                 splits: Sequence[str] = SPLITS, data_path: str = "auto") -> dict[str, DataLoader | TensorLoader]:
    """One loader per split present in ``manifest``, yielding the requested ``tasks``.

    ``data_path`` (see :func:`choose_data_path`): ``"memory"`` reads each split once into uint8
    tensors and serves batches with :class:`~fundus_lib.data.in_memory.TensorLoader`, augmented
    per image on the training device (:class:`~fundus_lib.data.batch_augment.BatchAugment`);
    ``"stream"`` wraps :class:`~fundus_lib.data.datasets.FundusDataset` in DataLoaders with
    :func:`~fundus_lib.data.transforms.train_transform` in worker processes (pinned memory and
    prefetching on CUDA; persistent workers for validation and test — training workers start
    afresh each epoch, seeded from the loader's generator, so a resumed run replays exactly).
    Both use the same augmentation settings; training shuffles with a generator seeded from
    ``seed`` (``augment=False``: no augmentation); validation and test are deterministic.
    """
    path = choose_data_path(manifest, tasks, image_size, data_path)
    generator = seed_everything(seed)
    workers = default_num_workers(num_workers)
    loaders: dict[str, DataLoader | TensorLoader] = {}
    for split in splits:
        part = manifest[manifest["split"] == split].reset_index(drop=True)
        if part.empty:
            continue
        training = split == "train"
        # Every loader draws from its own generator, never from torch's global one: a DataLoader
        # iterator takes its worker seed from it, and a draw from the global generator would shift
        # dropout and initialisation after a resume.
        split_generator = generator if training else torch.Generator().manual_seed(split_seed(seed, split))
        if path == "memory":
            data = TensorData(FundusDataset(part, tasks=tasks, image_size=image_size))
            loaders[split] = TensorLoader(data, batch_size=batch_size, shuffle=training,
                                          augment=BatchAugment() if training and augment else None,
                                          generator=split_generator)
            continue
        transform = train_transform(image_size) if training and augment else eval_transform(image_size)
        dataset = FundusDataset(part, tasks=tasks, transform=transform, image_size=image_size)
        loaders[split] = DataLoader(dataset, batch_size=batch_size, shuffle=training, drop_last=False,
                                    num_workers=workers, worker_init_fn=seed_worker,
                                    generator=split_generator,
                                    pin_memory=torch.cuda.is_available(),
                                    prefetch_factor=4 if workers else None,
                                    persistent_workers=workers > 0 and not training)
    if "train" in splits and "train" not in loaders:
        raise ValueError("the manifest has no 'train' rows; check its split column")
    return loaders
