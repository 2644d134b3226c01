"""Resize (and optionally preprocess) a dataset once, to PNG files, and train from the copies.

Real fundus photographs are 2-4k pixels wide; decoding and resizing them in every epoch costs
more than a small network's forward pass. :func:`build_cache` writes each image and lesion mask
at the working size once and returns a manifest pointing at the copies, which
:class:`~fundus_lib.data.datasets.FundusDataset` reads like any other manifest.

Layout under ``root``::

    cache.json             parameters + one fingerprint per cached image (see below)
    images/<name>.png      resized (cropped, preprocessed) RGB image
    masks/<L>/<name>.png   resized mask of lesion L, 0 / 255 (rule "nonzero"); only where a mask exists

Guarantees: every file is written to a temporary name and moved into place with
:func:`os.replace`, so an interrupted build never leaves a truncated PNG under a final name.
Each finished image is recorded in ``cache.json`` (saved every few seconds and when the build
stops, by an error or Ctrl-C), so a build that was interrupted or met an unreadable photo
resumes where it stopped. An image that cannot be cached stops the build with a
:class:`CacheError` naming its ``image_id`` and file; a cache folder that cannot be written
raises a :class:`CacheError` naming the folder.
``cache.json`` records ``image_size`` and the identity of ``crop_box`` / ``preprocess``; calling
again with other parameters raises :class:`CacheError` (or wipes the cache when
``rebuild=True``). An image is rewritten only when its fingerprint (source paths, sizes and
modification times, mask rule) changed or a file is missing, so a second call writes nothing.

Columns ``disc_x`` ... ``disc_diameter`` keep referring to the original photograph, as the
manifest contract says.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from fundus_lib.data.manifest import (LESIONS, ManifestError, check_photo_shape, make_manifest, read_image, read_mask,
                                      validate_manifest)
from fundus_lib.data.transforms import resize_arrays
from fundus_lib.utils import atomic_write

CACHE_VERSION = 1
CACHE_FILE = "cache.json"
#: Seconds between saves of the finished images to ``cache.json`` during a build (what a
#: SIGKILL can lose at most, besides the images in flight).
SAVE_INTERVAL_S = 5.0

#: ``crop_box(image) -> (top, left, height, width)``; the box may extend past the borders (zero fill).
CropBox = Callable[[np.ndarray], tuple[int, int, int, int]]
#: ``preprocess(image) -> image``: (H, W, 3) uint8 in and out, same shape (Graham, CLAHE, ...).
Preprocess = Callable[[np.ndarray], np.ndarray]


class CacheError(ManifestError):
    """The cache folder does not match the requested parameters, or a hook misbehaved."""


def describe_callable(function: Callable | None, name: str) -> str | None:
    """A stable text identity of a hook for ``cache.json``: ``module.qualname``, with arguments
    for :func:`functools.partial`. Lambdas and local functions have no stable identity (two
    different lambdas look alike) and cannot be sent to worker processes, so they are refused."""
    if function is None:
        return None
    if isinstance(function, functools.partial):
        inner = describe_callable(function.func, name)
        return f"{inner}(*{function.args!r}, **{dict(sorted(function.keywords.items()))!r})"
    qualname = getattr(function, "__qualname__", None)
    if qualname is None:  # a callable object: its class plus its repr, which must be stable
        text = f"{type(function).__module__}.{type(function).__qualname__}:{function!r}"
        if " at 0x" in text:
            raise CacheError(f"{name} object {function!r} needs a __repr__ that describes its parameters")
        return text
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise CacheError(f"{name} must be a module-level function or a functools.partial of one, got {qualname}")
    return f"{function.__module__}.{qualname}"


def _file_name(image_id: str) -> str:
    """A file-system-safe, collision-free name for an image id."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
    return safe if safe == image_id else f"{safe}-{sha1(image_id.encode()).hexdigest()[:8]}"


def _stat(path: str) -> list[Any]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ManifestError(f"file not found while building the cache: {path}") from None
    return [path, info.st_size, info.st_mtime_ns]


def write_png_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG at ``path`` with :func:`~fundus_lib.utils.atomic_write`, so
    ``path`` is either the old file or the complete new one."""
    with atomic_write(path, "wb") as stream:
        Image.fromarray(array).save(stream, format="PNG", compress_level=1)


def _crop(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop axes 0 and 1 of an (H, W, ...) array to ``box`` = (top, left, height, width),
    zero-filling the parts of the box outside the array."""
    top, left, height, width = box
    out = np.zeros((height, width, *array.shape[2:]), dtype=array.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + height, array.shape[0]), min(left + width, array.shape[1])
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top:src_bottom - top, src_left - left:src_right - left] = array[src_top:src_bottom,
                                                                                     src_left:src_right]
    return out


@dataclass(frozen=True)
class _Job:
    """Everything one worker needs to cache one image (picklable)."""

    image_id: str
    image_path: str
    mask_paths: tuple[str | None, ...]
    mask_rule: str
    image_size: int
    crop_box: CropBox | None
    preprocess: Preprocess | None
    out_image: Path
    out_masks: tuple[Path | None, ...]


def _cache_one(job: _Job) -> str:
    """Cache one image (:func:`_cache_image`) and return its id; any failure becomes a
    :class:`CacheError` naming the image id and file (also across worker processes)."""
    try:
        _cache_image(job)
    except Exception as error:
        raise CacheError(f"cannot cache image {job.image_id!r} ({job.image_path}): {error}") from error
    return job.image_id


def _cache_image(job: _Job) -> None:
    """Read, crop, resize, preprocess and write one image and its masks."""
    image = check_photo_shape(read_image(job.image_path), job.image_path)
    present = [i for i, path in enumerate(job.mask_paths) if path is not None]
    masks = np.zeros((len(present), *image.shape[:2]), dtype=bool)
    for row, lesion_index in enumerate(present):
        mask = read_mask(job.mask_paths[lesion_index], job.mask_rule)
        if mask.shape != image.shape[:2]:
            raise ManifestError(f"mask {job.mask_paths[lesion_index]} is {mask.shape} but its image "
                                f"{job.image_path} is {image.shape[:2]}")
        masks[row] = mask
    if job.crop_box is not None:
        box = tuple(int(v) for v in job.crop_box(image))
        if len(box) != 4 or box[2] < 1 or box[3] < 1:
            raise CacheError(f"crop_box must return (top, left, height, width) with positive sizes, got {box}")
        image = _crop(image, box)
        masks = _crop(masks.transpose(1, 2, 0), box).transpose(2, 0, 1)
    image, masks = resize_arrays(image, masks, job.image_size)
    if job.preprocess is not None:
        processed = job.preprocess(image)
        if not isinstance(processed, np.ndarray) or processed.shape != image.shape or processed.dtype != np.uint8:
            raise CacheError(f"preprocess must return a {image.shape} uint8 array, got "
                             f"{getattr(processed, 'shape', type(processed))} {getattr(processed, 'dtype', '')}")
        image = processed
    write_png_atomic(job.out_image, image)
    for row, lesion_index in enumerate(present):
        write_png_atomic(job.out_masks[lesion_index], masks[row].astype(np.uint8) * 255)


def _read_state(root: Path, params: dict[str, Any], rebuild: bool) -> dict[str, Any]:
    """Load ``cache.json`` when its parameters match; otherwise raise, or wipe when ``rebuild``."""
    state_path = root / CACHE_FILE
    if not state_path.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise CacheError(f"{root} is not empty and has no {CACHE_FILE}: refusing to write a cache into it")
        return {"params": params, "entries": {}}
    state = json.loads(state_path.read_text())
    if state.get("params") == params:
        return state
    if not rebuild:
        raise CacheError(f"cache {root} was built with {state.get('params')}, not {params}; "
                         "use another root or build_cache(..., rebuild=True) to replace it")
    for folder in ("images", "masks"):
        shutil.rmtree(root / folder, ignore_errors=True)
    return {"params": params, "entries": {}}


def _write_state(root: Path, state: dict[str, Any]) -> None:
    """Replace ``cache.json`` atomically (:func:`~fundus_lib.utils.atomic_write`)."""
    with atomic_write(root / CACHE_FILE) as stream:
        json.dump(state, stream, indent=1, sort_keys=True)


def _prepare(root: Path, state: dict[str, Any]) -> None:
    """Create the cache folders, remove temporary files left by a killed build and save the
    state; a folder that cannot be written raises a :class:`CacheError` naming it."""
    try:
        for folder in (root / "images", *(root / "masks" / lesion for lesion in LESIONS)):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*.tmp"):  # left by a killed process; never a final name
                stale.unlink()
        _write_state(root, state)
    except OSError as error:
        raise CacheError(f"cannot write the cache folder {root}: {error.strerror or error}; "
                         "choose a writable root for build_cache") from error


def _run(jobs: list[_Job], workers: int, done: Callable[[str], None]) -> None:
    """Cache every job, in ``workers`` processes when > 1, calling ``done(image_id)`` as each
    finishes. The first failure cancels the jobs not yet started and is raised once the running
    ones have finished; those are reported to ``done`` too, so no finished image is forgotten."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done(_cache_one(job))
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_cache_one, job) for job in jobs]
        reported = set()
        try:
            for future in as_completed(futures):
                done(future.result())
                reported.add(future)
        finally:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
            for future in futures:
                if future not in reported and not future.cancelled() and future.exception() is None:
                    done(future.result())


def build_cache(manifest: pd.DataFrame, root: str | Path, image_size: int, preprocess: Preprocess | None = None, *,
                crop_box: CropBox | None = None, workers: int = 0, rebuild: bool = False,
                progress: bool = True) -> pd.DataFrame:
    """Cache every image of ``manifest`` under ``root`` at ``image_size`` x ``image_size``.

    Per image: read -> ``crop_box`` (optional; e.g. the square around the field of view, so the
    resize does not stretch a 3:2 photograph) -> :func:`resize_arrays` -> ``preprocess``
    (optional, image only, shape-preserving; runs at the cached size) -> PNG. Masks follow the
    crop and resize (nearest neighbour) and are stored as 0/255 with ``mask_rule="nonzero"``.
    ``workers > 1`` uses that many processes (hooks must then be module-level functions).
    Returns a new validated manifest with ``image_path``, ``mask_<L>`` and ``mask_rule``
    pointing at the cache; all other columns are kept.
    """
    validate_manifest(manifest)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    root = Path(root)
    params = {"version": CACHE_VERSION, "image_size": image_size,
              "crop_box": describe_callable(crop_box, "crop_box"),
              "preprocess": describe_callable(preprocess, "preprocess")}
    state = _read_state(root, params, rebuild)
    _prepare(root, state)

    jobs: list[_Job] = []
    fingerprints: dict[str, Any] = {}
    image_paths: list[str] = []
    mask_paths: dict[str, list[str | None]] = {lesion: [] for lesion in LESIONS}
    for row in manifest.itertuples(index=False):
        image_id, name = str(row.image_id), _file_name(str(row.image_id))
        sources = tuple(None if pd.isna(getattr(row, f"mask_{lesion}")) else str(getattr(row, f"mask_{lesion}"))
                        for lesion in LESIONS)
        out_image = root / "images" / f"{name}.png"
        out_masks = tuple(None if src is None else root / "masks" / lesion / f"{name}.png"
                          for lesion, src in zip(LESIONS, sources))
        fingerprint = {"image": _stat(str(row.image_path)), "rule": str(row.mask_rule),
                       "masks": [None if src is None else _stat(src) for src in sources]}
        fingerprints[image_id] = fingerprint
        complete = all(path.is_file() for path in (out_image, *out_masks) if path is not None)
        if state["entries"].get(image_id) != fingerprint or not complete:
            jobs.append(_Job(image_id, str(row.image_path), sources, str(row.mask_rule), image_size, crop_box,
                             preprocess, out_image, out_masks))
        image_paths.append(str(out_image))
        for lesion, path in zip(LESIONS, out_masks):
            mask_paths[lesion].append(None if path is None else str(path))

    bar = tqdm(total=len(jobs), desc=f"caching {len(jobs)} image(s) at {image_size}px",
               disable=not progress or not jobs)
    saved = time.monotonic()

    def done(image_id: str) -> None:
        nonlocal saved
        state["entries"][image_id] = fingerprints[image_id]
        bar.update()
        if time.monotonic() - saved > SAVE_INTERVAL_S:
            _write_state(root, state)
            saved = time.monotonic()

    try:
        _run(jobs, workers, done)
    finally:
        bar.close()
        _write_state(root, state)  # what finished is kept, also when the build failed
    out = manifest.copy()
    out["image_path"] = image_paths
    for lesion in LESIONS:
        out[f"mask_{lesion}"] = mask_paths[lesion]
    out["mask_rule"] = "nonzero"
    return make_manifest(out)
