"""The generator's outputs: images in memory (:func:`generate`), a dataset folder on disk
(:func:`write_dataset`, written atomically) and low-resolution copies for super-resolution
pairs (:func:`make_lr`). SYNTHETIC data.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Mapping, NamedTuple

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from fundus_lib.data.grading import SEVERE_IHE_PER_QUADRANT
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.synthetic.domains import DomainSpec, _resolve_domains
from fundus_lib.data.synthetic.prior import PriorSpec, resolve_prior
from fundus_lib.data.synthetic.rendering import render
from fundus_lib.data.synthetic.scenes import _check_common, sample_scenes, scene_labels


class SyntheticBatch(NamedTuple):
    """Output of :func:`generate` (SYNTHETIC data)."""

    images: np.ndarray   # (n, H, W, 3) uint8 RGB
    masks: np.ndarray    # (n, 8, H, W) bool, LESIONS order
    labels: pd.DataFrame  # one row per image, columns of scene_labels()


def generate(n: int, size: int = 256, seed: int = 0, *, domain: DomainSpec = "cam_a",
             prior: PriorSpec = "idrid", difficulty: float = 0.0,
             severe_ihe_per_quadrant: int = SEVERE_IHE_PER_QUADRANT, start: int = 0) -> SyntheticBatch:
    """Render ``n`` synthetic fundus images (indices ``start .. start+n-1``) in memory.

    ``domain``: a name from :data:`DOMAINS`, a list of names (drawn uniformly per image) or
    ``{name: weight}``. ``prior``: ``"idrid"`` (default, CANet Table III), ``"balanced"`` or a 5x3
    DR x DME weight table. ``difficulty`` in [0, 1] shrinks lesions by up to 40 % and lowers their
    contrast by up to 60 %. ``severe_ihe_per_quadrant``: the DR3 haemorrhage count per quadrant
    (see :mod:`fundus_lib.data.grading`). Returns ``SyntheticBatch(images, masks, labels)``.

    One seed gives the same eyes and lesions under ``cam_a`` and ``low_quality`` (same optics;
    only the capture differs), which pairs images for robustness studies.
    """
    scenes = sample_scenes(n, size, seed, domain=domain, prior=prior, difficulty=difficulty,
                           severe_ihe_per_quadrant=severe_ihe_per_quadrant, start=start)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, len(LESIONS), size, size), bool)
    for i, scene in enumerate(scenes):
        images[i], masks[i] = render(scene)
    return SyntheticBatch(images, masks, pd.DataFrame([scene_labels(scene) for scene in scenes]))


#: Version of what the generator draws and labels: bumped whenever the same arguments would give
#: different images or labels, so cached benchmarks (named with it) are never stale.
GENERATOR_VERSION = 2

_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 3]


def _write_png(path: Path, array: np.ndarray) -> None:
    data = array[..., ::-1] if array.ndim == 3 else array
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(data), _PNG)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def _write_chunk(folder: str, indices: tuple[int, int], size: int, seed: int, options: dict) -> list[dict]:
    """Render images ``indices[0] .. indices[1]-1`` into ``folder``; return their label rows."""
    start, stop = indices
    rows = []
    for scene in sample_scenes(stop - start, size, seed, start=start, **options):
        image, masks = render(scene)
        _write_png(Path(folder) / f"{scene.image_id}.png", image)
        for lesion, mask in zip(LESIONS, masks):
            if mask.any():
                _write_png(Path(folder) / f"{scene.image_id}_{lesion}.png", mask.astype(np.uint8) * 255)
        rows.append(scene_labels(scene))
    return rows


def write_dataset(root: str | Path, n: int, size: int = 256, seed: int = 0, *,
                  domain: DomainSpec = "cam_a",
                  prior: PriorSpec = "idrid", difficulty: float = 0.0,
                  severe_ihe_per_quadrant: int = SEVERE_IHE_PER_QUADRANT, start: int = 0,
                  split: str | None = None, workers: int = 1, overwrite: bool = False) -> Path:
    """Write a SYNTHETIC dataset folder and return its path.

    Contents: ``<id>.png`` images, ``<id>_<LESION>.png`` masks (only for lesions present, as in
    IDRiD), ``labels.csv`` (:func:`scene_labels` columns, plus ``split`` when given) and
    ``generator.json`` (the arguments). The folder is built in a temporary sibling and renamed
    into place, so a crash never leaves a half-written dataset at ``root``. ``workers`` > 1
    renders in that many processes; the bytes do not depend on it. An existing ``root`` raises
    unless ``overwrite``.
    """
    root = Path(root)
    options = dict(domain=domain, prior=prior, difficulty=difficulty, severe_ihe_per_quadrant=severe_ihe_per_quadrant)
    _check_common(n, size, seed, difficulty, severe_ihe_per_quadrant, start)
    if n < 1:
        raise ValueError(f"write_dataset needs n >= 1 images, got {n}")
    resolve_prior(prior)
    _resolve_domains(domain)
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val', 'test' or None, got {split!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if root.exists() and not overwrite:
        raise FileExistsError(f"write_dataset: {root} exists; pass overwrite=True to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        bounds = np.linspace(start, start + n, min(max(n, 1), 4 * workers) + 1).astype(int)
        chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if workers == 1:
            results = [_write_chunk(str(temporary), chunk, size, seed, options) for chunk in chunks]
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_write_chunk, [str(temporary)] * len(chunks), chunks, [size] * len(chunks),
                                        [seed] * len(chunks), [options] * len(chunks)))
        labels = pd.DataFrame([row for rows in results for row in rows])
        if split is not None:
            labels.insert(1, "split", split)
        labels.to_csv(temporary / "labels.csv", index=False)
        prior_table = resolve_prior(prior).round(6).tolist()
        meta = {"generator": "fundus_lib.data.synthetic", "synthetic": True, "n": n, "size": size, "seed": seed,
                "start": start,
                "domain": (domain if isinstance(domain, str)
                           else dict(domain) if isinstance(domain, Mapping) else list(domain)),
                "prior": prior if isinstance(prior, str) else prior_table, "difficulty": difficulty,
                "severe_ihe_per_quadrant": severe_ihe_per_quadrant, "split": split,
                "mask_files": "written only for lesions present (IDRiD style)"}
        (temporary / "generator.json").write_text(json.dumps(meta, indent=2))
        os.chmod(temporary, 0o755)
        if root.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            os.replace(root, trash / root.name)
            os.replace(temporary, root)
            shutil.rmtree(trash)
        else:
            os.replace(temporary, root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return root


def make_lr(image: np.ndarray, scale: int = 4, blur: float = 0.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Low-resolution copy of an (H, W, 3) uint8 image for super-resolution pairs.

    Optional Gaussian blur (sigma in HR pixels), then bicubic down-sampling by ``scale`` with
    PIL (its bicubic filter widens with the scale factor, i.e. anti-aliased like MATLAB's
    ``imresize``, the usual SR protocol), then optional Gaussian noise (std in 0-255 units,
    seeded by ``seed``). H and W must be multiples of ``scale`` so LR pixels align with HR blocks.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    height, width = image.shape[:2]
    if height % scale or width % scale:
        raise ValueError(f"image size {width}x{height} is not a multiple of scale {scale}")
    if blur < 0 or noise < 0:
        raise ValueError(f"blur and noise must be >= 0, got blur={blur!r}, noise={noise!r}")
    if blur > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    low = np.asarray(Image.fromarray(image).resize((width // scale, height // scale), Image.Resampling.BICUBIC))
    if noise > 0:
        noisy = low.astype(np.float32) + np.random.default_rng(seed).normal(0.0, noise, low.shape).astype(np.float32)
        low = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(low)
