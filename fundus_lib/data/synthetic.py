"""SynthFundus: a procedural fundus-photograph generator with complete, exact ground truth.

SYNTHETIC DATA. The real datasets cannot ship with the course, yet every notebook must run on a
fresh laptop and students must see learning happen. This module draws fundus-like images with
every label the five papers need at once — DR and DME grades, pixel masks for the 8 L-Net/SiAN
lesions, lesion counts per quadrant, disc and fovea positions, camera domain, capture quality —
and LR/HR pairs for super-resolution. Results on it are results on synthetic data, never a
reproduction of a paper's table.

How one image is made (everything is sized relative to the field-of-view radius R, so any
resolution works):

1. **Scene** (:func:`sample_scenes`, no pixels): pick the camera domain, the eye, the geometry
   (FOV, optic disc ~1/6.5 of the FOV diameter on the nasal side, fovea ~2.5 disc diameters
   temporal), a target (DR, DME) pair from the class prior, a lesion inventory consistent with
   that target, and the capture settings (blur, exposure, noise, JPEG).
2. **Render** (:func:`render`): background colour with low-frequency texture and vignetting,
   disc with a brighter cup, darker fovea, artery and vein trees (superior / inferior arcades
   around the macula, branching with decreasing width), the lesions with their binary masks,
   the camera's FOV shape and capture effects. Drawing is OpenCV anti-aliased primitives and
   whole-array NumPy, no per-pixel Python.
3. **Labels** (:func:`scene_labels`): computed from the inventory that was drawn with the pure
   rules of :mod:`fundus_lib.data.grading` — right by construction, never assumed.

Determinism: image ``i`` of a call with ``seed`` draws from ``SeedSequence(seed, spawn_key=(i,))``
(one child stream for the scene, one for rendering), so the same parameters give identical bytes
whatever the chunking, the ``start`` offset or the number of worker processes.

Default class prior: the IDRiD DR x DME joint distribution of CANet (Li et al., TMI 2020,
Table III), :data:`IDRID_PRIOR`. DR 0-1 with DME > 0 is impossible under the rules (DME needs a
hard exudate, which is DR2 evidence) and IDRiD has none either.

Domains (:data:`DOMAINS`): ``cam_a`` (full circular field, warm orange), ``cam_b`` (field cut flat
at top and bottom, darker and more saturated, mild JPEG), ``cam_c`` (notched rim like
``skimage.data.retina()``, paler yellow-orange, lower effective resolution, some noise) and
``low_quality`` (cam_a's optics with at least one capture defect per image: blur, under- or
over-exposure, noise, plus a colour cast and strong JPEG).

On disk (:func:`write_dataset`): ``<id>.png`` (RGB), ``<id>_<LESION>.png`` (8-bit, 255 = lesion)
written ONLY for lesions present in that image, as in IDRiD (a missing file means an empty mask;
every synthetic image annotates all 8 lesions), ``labels.csv`` and ``generator.json`` (the
parameters). :func:`fundus_lib.data.sources.synthetic.load_synthetic` turns the folder into a
manifest.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from fundus_lib.data.grading import (QUADRANTS, SEVERE_IHE_PER_QUADRANT, Lesion, LesionInventory, grade,
                                     haex_fovea_distance_dd, lesion_counts, make_inventory, quadrant_counts,
                                     quadrant_of)
from fundus_lib.data.manifest import LESIONS

#: A domain argument: one name of :data:`DOMAINS`, a list of names (uniform) or {name: weight}.
DomainSpec = Union[str, Sequence[str], Mapping[str, float]]
#: A prior argument: "idrid", "balanced" or a 5x3 DR x DME weight table.
PriorSpec = Union[str, Sequence[Sequence[float]], np.ndarray]

# --------------------------------------------------------------------------------------------
# Class prior
# --------------------------------------------------------------------------------------------

#: IDRiD label counts, rows DR 0-4, columns DME 0-2 (CANet paper, Table III; 516 images).
IDRID_PRIOR: np.ndarray = np.array([[134, 0, 0],
                                    [18, 0, 0],
                                    [36, 24, 140],
                                    [5, 4, 116],
                                    [4, 2, 33]], dtype=float)
IDRID_PRIOR.setflags(write=False)

#: Which (DR, DME) cells the grading rules can produce: DME > 0 needs HaEx, which means DR >= 2.
FEASIBLE_CELLS: np.ndarray = np.ones((5, 3), dtype=bool)
FEASIBLE_CELLS[:2, 1:] = False
FEASIBLE_CELLS.setflags(write=False)

#: ``"balanced"`` prior: each DR grade 1/5; within DR 2-4 the three DME grades equally likely.
BALANCED_PRIOR: np.ndarray = np.array([[3, 0, 0], [3, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=float)
BALANCED_PRIOR.setflags(write=False)


def resolve_prior(prior: PriorSpec) -> np.ndarray:
    """The (5, 3) DR x DME probability table for ``prior``: ``"idrid"``, ``"balanced"`` or weights.

    Weights must be finite, non-negative, not all zero, and zero on the impossible cells
    (DR 0-1 with DME 1-2).
    """
    if isinstance(prior, str):
        tables = {"idrid": IDRID_PRIOR, "balanced": BALANCED_PRIOR}
        if prior not in tables:
            raise ValueError(f"prior must be one of {sorted(tables)} or a 5x3 DR x DME weight table, got {prior!r}")
        table = np.array(tables[prior])
    else:
        table = np.asarray(prior, dtype=float)
    if table.shape != (5, 3):
        raise ValueError(f"prior must have shape (5, 3) (DR 0-4 x DME 0-2), got {table.shape}")
    if not np.all(np.isfinite(table)) or np.any(table < 0) or table.sum() <= 0:
        raise ValueError("prior weights must be finite, non-negative and not all zero")
    if np.any(table[~FEASIBLE_CELLS] > 0):
        raise ValueError("prior puts weight on DR 0-1 with DME 1-2, which the grading rules cannot produce "
                         "(DME needs a hard exudate, and a hard exudate makes DR >= 2)")
    return table / table.sum()


# --------------------------------------------------------------------------------------------
# Camera domains and capture
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """A camera-like capture domain. Lengths are fractions of the FOV radius R.

    ``fov_radius`` is R as a fraction of half the image side; ``cut`` keeps ``|y - cy| <= cut R``
    (flat top and bottom) or None; ``notch`` adds a small square tab on the rim (as in
    ``skimage.data.retina()``). ``base_rgb`` is the fundus colour at the centre, ``vignette`` the
    fraction of brightness lost at the rim, ``texture`` the amplitude of the choroidal texture,
    ``resolution`` the effective sampling (1 = full). Ranges are sampled per image: ``blur``
    (Gaussian sigma / R), ``noise`` (std in 0-255 units), ``gain`` (exposure), ``jpeg`` (quality,
    None = lossless), ``cast`` (max per-channel colour-cast deviation). ``low_quality`` domains
    add at least one capture defect per image.
    """

    name: str
    fov_radius: float
    cut: float | None
    notch: bool
    base_rgb: tuple[float, float, float]
    vignette: float
    texture: float
    resolution: float
    blur: tuple[float, float]
    noise: tuple[float, float]
    gain: tuple[float, float]
    jpeg: tuple[int, int] | None
    cast: float
    low_quality: bool = False


DOMAINS: dict[str, Domain] = {
    "cam_a": Domain("cam_a", fov_radius=0.95, cut=None, notch=False, base_rgb=(0.93, 0.38, 0.27),
                    vignette=0.3, texture=0.05, resolution=1.0, blur=(0.0, 0.0015), noise=(0.0, 1.5),
                    gain=(0.94, 1.06), jpeg=None, cast=0.03),
    "cam_b": Domain("cam_b", fov_radius=1.02, cut=0.84, notch=False, base_rgb=(0.74, 0.24, 0.10),
                    vignette=0.5, texture=0.08, resolution=1.0, blur=(0.0, 0.002), noise=(0.5, 2.5),
                    gain=(0.94, 1.06), jpeg=(80, 95), cast=0.03),
    "cam_c": Domain("cam_c", fov_radius=0.92, cut=None, notch=True, base_rgb=(0.88, 0.52, 0.32),
                    vignette=0.25, texture=0.04, resolution=0.6, blur=(0.0, 0.0015), noise=(1.0, 3.0),
                    gain=(0.94, 1.06), jpeg=None, cast=0.04),
}
#: cam_a's optics and colour with capture defects: one seed gives the same eyes in both domains.
DOMAINS["low_quality"] = replace(DOMAINS["cam_a"], name="low_quality", blur=(0.006, 0.014), noise=(7.0, 14.0),
                                 jpeg=(25, 60), cast=0.15, low_quality=True)

#: Exposure gains drawn for the under- / over-exposed defect of low-quality images.
UNDER_EXPOSURE: tuple[float, float] = (0.40, 0.62)
OVER_EXPOSURE: tuple[float, float] = (1.5, 1.9)

#: Thresholds of the quality flags (fixed, whatever the domain): blur sigma / R, gain, noise std.
QUALITY_THRESHOLDS: dict[str, float] = {"blur": 0.005, "under": 0.7, "over": 1.4, "noise": 6.0}


@dataclass(frozen=True)
class Capture:
    """Capture settings of one image: blur sigma (fraction of R), noise std (0-255), exposure gain,
    per-channel colour cast, JPEG quality (None = lossless)."""

    blur: float
    noise: float
    gain: float
    cast: tuple[float, float, float]
    jpeg: int | None

    def flags(self) -> dict[str, int]:
        """Quality flags from :data:`QUALITY_THRESHOLDS` (1 = defect present), plus ``quality_ok``."""
        flags = {"quality_blur": int(self.blur >= QUALITY_THRESHOLDS["blur"]),
                 "quality_underexposed": int(self.gain <= QUALITY_THRESHOLDS["under"]),
                 "quality_overexposed": int(self.gain >= QUALITY_THRESHOLDS["over"]),
                 "quality_noise": int(self.noise >= QUALITY_THRESHOLDS["noise"])}
        flags["quality_ok"] = int(not any(flags.values()))
        return flags


def _sample_capture(rng: np.random.Generator, domain: Domain) -> Capture:
    """Draw the capture settings; a low-quality domain always gets at least one defect."""
    blur = float(rng.uniform(*domain.blur))
    noise = float(rng.uniform(*domain.noise))
    gain = float(rng.uniform(*domain.gain))
    if domain.low_quality:
        defects = rng.random(4) < 0.4
        if not defects.any():
            defects[rng.integers(4)] = True
        blur_on, under_on, over_on, noise_on = defects
        if under_on and over_on:
            over_on = False
        blur = blur if blur_on else float(rng.uniform(0.0, 0.002))
        noise = noise if noise_on else float(rng.uniform(0.5, 3.0))
        if under_on:
            gain = float(rng.uniform(*UNDER_EXPOSURE))
        elif over_on:
            gain = float(rng.uniform(*OVER_EXPOSURE))
    cast = tuple(float(v) for v in 1.0 + rng.uniform(-domain.cast, domain.cast, 3))
    jpeg = None if domain.jpeg is None else int(rng.integers(domain.jpeg[0], domain.jpeg[1] + 1))
    return Capture(blur=blur, noise=noise, gain=gain, cast=cast, jpeg=jpeg)


def _resolve_domains(domain: DomainSpec) -> tuple[list[str], np.ndarray]:
    """Domain names and their per-image probabilities from a name, a list of names or {name: weight}."""
    if isinstance(domain, str):
        names, weights = [domain], np.ones(1)
    elif isinstance(domain, Mapping):
        names, weights = list(domain), np.asarray(list(domain.values()), dtype=float)
    else:
        names = list(domain)
        weights = np.ones(len(names))
    unknown = [name for name in names if name not in DOMAINS]
    if not names or unknown:
        raise ValueError(f"domain must name one or more of {sorted(DOMAINS)}, got {domain!r}")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"domain weights must be non-negative and not all zero, got {domain!r}")
    return names, weights / weights.sum()


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Where things are in one image (pixels, x right, y down).

    The temporal arcades follow the sideways parabola ``v = a * sqrt(u)`` in a frame at the disc
    centre whose u axis points to the fovea and whose v axis points down, both in disc diameters
    (superior arcade: ``v < 0``).
    """

    size: int
    cx: float
    cy: float
    radius: float
    cut: float | None
    notch: bool
    eye: str
    fovea: tuple[float, float]
    disc: tuple[float, float]
    disc_diameter: float
    arcade_a: tuple[float, float]  # (superior, inferior) parabola widths

    @property
    def temporal_axis(self) -> np.ndarray:
        """Unit vector from the disc centre towards the fovea."""
        vector = np.subtract(self.fovea, self.disc)
        return vector / np.hypot(*vector)

    @property
    def inferior_axis(self) -> np.ndarray:
        """Unit vector perpendicular to :attr:`temporal_axis`, pointing down the image."""
        t = self.temporal_axis
        normal = np.array([-t[1], t[0]])
        return normal if normal[1] > 0 else -normal

    def arcade(self, side: int, w: np.ndarray) -> np.ndarray:
        """Points (N, 2) of the temporal arcade, ``side`` -1 superior / +1 inferior, at ``w = sqrt(u)``."""
        a = self.arcade_a[0] if side < 0 else self.arcade_a[1]
        w = np.asarray(w, dtype=float)
        u, v = w * w, side * a * w
        return (np.asarray(self.disc) + self.disc_diameter * (u[:, None] * self.temporal_axis
                                                              + v[:, None] * self.inferior_axis))

    def visible(self, points: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether points (N, 2) lie in the field of view at least ``margin`` R inside its edge."""
        dx = points[:, 0] - self.cx
        dy = points[:, 1] - self.cy
        inside = np.hypot(dx, dy) <= (1.0 - margin) * self.radius
        if self.cut is not None:
            inside &= np.abs(dy) <= (self.cut - margin) * self.radius
        return inside


def _sample_geometry(rng: np.random.Generator, size: int, domain: Domain) -> Geometry:
    """FOV, eye, disc and fovea. The disc is nasal (right eye: image right), the fovea 2.3-2.6 disc
    diameters temporal and a little lower, the disc centre at most 0.76 R from the FOV centre."""
    radius = domain.fov_radius * size / 2.0 * rng.uniform(0.98, 1.02)
    cx, cy = size / 2.0 + rng.normal(0.0, 0.01 * radius, 2)
    eye = "right" if rng.random() < 0.5 else "left"
    nasal = 1.0 if eye == "right" else -1.0
    disc_diameter = 2.0 * radius / rng.uniform(6.2, 7.0)
    spacing = rng.uniform(2.3, 2.6) * disc_diameter
    drop = rng.uniform(0.1, 0.35) * disc_diameter
    temporal_shift = max(0.0, spacing - 0.76 * radius) + rng.uniform(0.0, 0.06) * radius
    fovea = (cx - nasal * temporal_shift, cy + rng.uniform(-0.04, 0.06) * radius)
    dx = np.sqrt(spacing ** 2 - drop ** 2)
    disc = (fovea[0] + nasal * dx, fovea[1] - drop)
    arcade_a = tuple(float(v) for v in rng.uniform(1.15, 1.45, 2))
    return Geometry(size=size, cx=float(cx), cy=float(cy), radius=float(radius), cut=domain.cut,
                    notch=domain.notch, eye=eye, fovea=(float(fovea[0]), float(fovea[1])),
                    disc=(float(disc[0]), float(disc[1])), disc_diameter=float(disc_diameter),
                    arcade_a=arcade_a)


# --------------------------------------------------------------------------------------------
# Lesion inventory (sampled to hit a target DR / DME pair)
# --------------------------------------------------------------------------------------------

#: Lesion sizes as (low, high) fractions of R: the radius (pHE: half-width, FiP: half-length).
LESION_SIZES: dict[str, tuple[float, float]] = {
    "MA": (0.006, 0.011), "iHE": (0.015, 0.04), "HaEx": (0.006, 0.016), "CWS": (0.035, 0.065),
    "vHE": (0.25, 0.42), "pHE": (0.07, 0.14), "NV": (0.08, 0.14), "FiP": (0.15, 0.28),
}
#: Smallest drawn size in pixels, so small lesions stay visible at low resolution.
MIN_PIXELS: dict[str, float] = {"MA": 1.0, "iHE": 1.5, "HaEx": 1.0, "CWS": 2.0, "vHE": 6.0, "pHE": 3.0,
                                "NV": 3.0, "FiP": 4.0}

#: How strongly ``difficulty`` in [0, 1] shrinks lesions and lowers their contrast.
DIFFICULTY_SIZE_DROP: float = 0.4
DIFFICULTY_CONTRAST_DROP: float = 0.6

_MARGIN = 0.07          # lesions keep their centres this far (in R) inside the FOV edge
_DISC_CLEARANCE = 0.8   # ... and this far (in disc diameters) from the disc centre


def _sizes(rng: np.random.Generator, lesion: str, n: int, geo: Geometry, difficulty: float) -> np.ndarray:
    low, high = LESION_SIZES[lesion]
    scale = (1.0 - DIFFICULTY_SIZE_DROP * difficulty) * geo.radius
    return np.maximum(rng.uniform(low, high, n) * scale, MIN_PIXELS[lesion])


def _keep(points: np.ndarray, geo: Geometry, avoid_disc: bool = True) -> np.ndarray:
    """Rows of ``points`` that are visible with margin (and off the disc)."""
    ok = geo.visible(points, _MARGIN)
    if avoid_disc:
        ok &= np.hypot(points[:, 0] - geo.disc[0], points[:, 1] - geo.disc[1]) > _DISC_CLEARANCE * geo.disc_diameter
    return points[ok]


def _draw_points(rng: np.random.Generator, n: int, propose: Callable[[int], np.ndarray],
                 accept: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``n`` points from ``propose(k)`` filtered by ``accept`` (rejection sampling, vectorised)."""
    found: list[np.ndarray] = [np.zeros((0, 2))]
    total = 0
    for _ in range(200):
        if total >= n:
            return np.concatenate(found)[:n]
        batch = accept(propose(max(16, 3 * (n - total))))
        found.append(batch)
        total += len(batch)
    raise RuntimeError("synthetic: could not place lesions inside the field of view (geometry too small?)")


def _uniform_in_fov(rng: np.random.Generator, geo: Geometry, k: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, k)
    rho = geo.radius * np.sqrt(rng.uniform(0, 1, k))
    return np.column_stack([geo.cx + rho * np.cos(angle), geo.cy + rho * np.sin(angle)])


def _near_arcades(rng: np.random.Generator, geo: Geometry, k: int, w_range: tuple[float, float],
                  spread_dd: float) -> np.ndarray:
    """Points around the temporal arcades ("near vessels")."""
    sides = np.where(rng.random(k) < 0.5, -1, 1)
    w = rng.uniform(*w_range, k)
    points = np.where((sides < 0)[:, None], geo.arcade(-1, w), geo.arcade(1, w))
    return points + rng.normal(0.0, spread_dd * geo.disc_diameter, (k, 2))


def _posterior_pole(rng: np.random.Generator, geo: Geometry, k: int) -> np.ndarray:
    """Points around the macula, half near the arcades."""
    around_fovea = np.asarray(geo.fovea) + rng.normal(0.0, 1.6 * geo.disc_diameter, (k, 2))
    arcades = _near_arcades(rng, geo, k, (0.5, 2.3), 0.4)
    return np.where((rng.random(k) < 0.5)[:, None], around_fovea, arcades)


def _sample_ihe_counts(rng: np.random.Generator, severe: bool, minimum: int, k: int) -> np.ndarray:
    """iHE count per quadrant (QUADRANTS order): all >= k when ``severe``, else at least one < k."""
    if severe:
        return k + rng.poisson(2.0, 4)
    counts = rng.multinomial(minimum + int(rng.poisson(3.0)), np.full(4, 0.25))
    if np.all(counts >= k):
        counts[rng.integers(4)] = rng.integers(0, k)
    return counts


def _ihe_points(rng: np.random.Generator, geo: Geometry, counts: np.ndarray) -> np.ndarray:
    """Place ``counts[q]`` haemorrhage centres in each quadrant q (QUADRANTS order)."""
    def in_quadrant(quadrant: str) -> Callable[[np.ndarray], np.ndarray]:
        def accept(points: np.ndarray) -> np.ndarray:
            points = _keep(points, geo)
            return points[quadrant_of(points[:, 0], points[:, 1], geo.fovea, geo.disc) == quadrant]
        return accept

    placed = [_draw_points(rng, int(count), lambda k: _uniform_in_fov(rng, geo, k), in_quadrant(quadrant))
              for quadrant, count in zip(QUADRANTS, counts)]
    return np.concatenate(placed)


def _exudate_points(rng: np.random.Generator, geo: Geometry, dme: int) -> np.ndarray:
    """Hard-exudate centres in clusters or rings: DME 1 all beyond 1 DD of the fovea, DME 2 at
    least one within it."""
    dd = geo.disc_diameter
    fovea = np.asarray(geo.fovea)
    for _ in range(100):
        if dme == 2:
            angle = rng.uniform(0, 2 * np.pi)
            centres = [fovea + rng.uniform(0, 0.6) * dd * np.array([np.cos(angle), np.sin(angle)])]
            if rng.random() < 0.4:
                centres.append(_posterior_pole(rng, geo, 1)[0])
        else:
            angles = rng.uniform(0, 2 * np.pi, rng.integers(1, 3))
            reach = rng.uniform(1.7, 3.2, len(angles)) * dd
            centres = list(fovea + reach[:, None] * np.column_stack([np.cos(angles), np.sin(angles)]))
        clusters = []
        for centre in centres:
            m = int(rng.integers(3, 16))
            if rng.random() < 0.3:  # circinate ring
                theta = rng.uniform(0, 2 * np.pi, m)
                ring = rng.uniform(0.3, 0.7) * dd * (1 + rng.normal(0, 0.08, m))
                clusters.append(centre + ring[:, None] * np.column_stack([np.cos(theta), np.sin(theta)]))
            else:
                clusters.append(centre + rng.normal(0, rng.uniform(0.15, 0.45) * dd, (m, 2)))
        points = _keep(np.concatenate(clusters), geo)
        near = np.hypot(*(points - fovea).T) <= dd
        if dme == 1:
            points = points[~near]
        elif not near.any():
            angle = rng.uniform(0, 2 * np.pi)
            points = np.vstack([points, fovea + rng.uniform(0.1, 0.9) * dd * np.array([np.cos(angle), np.sin(angle)])])
        if len(points):
            return points
    raise RuntimeError("synthetic: could not place hard exudates for the requested DME grade")


def _proliferative(rng: np.random.Generator, geo: Geometry) -> dict[str, np.ndarray]:
    """Centres of the DR4 lesions: a non-empty mix of NV (at the disc or elsewhere), vHE and pHE,
    plus FiP along an arcade in half of the eyes with NV."""
    chosen = rng.random(3) < np.array([0.7, 0.3, 0.35])
    if not chosen.any():
        chosen[rng.integers(3)] = True
    out: dict[str, np.ndarray] = {}
    if chosen[0]:
        n = int(rng.integers(1, 3))
        at_disc = np.asarray(geo.disc) + rng.normal(0, 0.15 * geo.disc_diameter, (1, 2))
        elsewhere = _draw_points(rng, n, lambda k: _near_arcades(rng, geo, k, (0.8, 2.2), 0.3),
                                 lambda p: _keep(p, geo))
        out["NV"] = np.vstack([at_disc, elsewhere[1:]]) if rng.random() < 0.4 else elsewhere
        if rng.random() < 0.5:
            out["FiP"] = _draw_points(rng, 1, lambda k: _near_arcades(rng, geo, k, (0.8, 1.9), 0.0),
                                      lambda p: _keep(p, geo))
    if chosen[1]:
        def propose(k: int) -> np.ndarray:
            points = _uniform_in_fov(rng, geo, k)
            points = np.column_stack([geo.cx + 0.6 * (points[:, 0] - geo.cx), geo.cy + 0.6 * (points[:, 1] - geo.cy)])
            lower = rng.random(k) < 0.7  # blood settles: mostly in the inferior field
            points[lower, 1] = geo.cy + np.abs(points[lower, 1] - geo.cy)
            return points
        out["vHE"] = _draw_points(rng, 1, propose, lambda p: _keep(p, geo, avoid_disc=False))
    if chosen[2]:
        out["pHE"] = _draw_points(rng, int(rng.integers(1, 3)),
                                  lambda k: _near_arcades(rng, geo, k, (0.8, 2.2), 0.3), lambda p: _keep(p, geo))
    return out


def _sample_inventory(rng: np.random.Generator, geo: Geometry, dr: int, dme: int, difficulty: float,
                      severe_k: int) -> LesionInventory:
    """Lesions consistent with the target (dr, dme) under :mod:`fundus_lib.data.grading`."""
    centres: dict[str, np.ndarray] = {}

    def pole(k: int) -> np.ndarray:
        return _posterior_pole(rng, geo, k)

    def keep(points: np.ndarray) -> np.ndarray:
        return _keep(points, geo)

    if dr == 1:
        centres["MA"] = _draw_points(rng, 1 + min(int(rng.poisson(3.0)), 11), pole, keep)
    elif dr >= 2:
        centres["MA"] = _draw_points(rng, min(int(rng.poisson(6.0)), 20), pole, keep)
        # DR3 evidence (always for DR3, in half of the DR4 eyes): CWS, 4-quadrant haemorrhages or both
        severe_signs = dr == 3 or (dr == 4 and rng.random() < 0.5)
        mode = str(rng.choice(["cws", "ihe", "both"], p=[0.45, 0.3, 0.25])) if severe_signs else "none"
        severe = mode in ("ihe", "both")
        # a DR2 eye without exudates needs at least one haemorrhage to be DR2
        minimum = 1 if (dr == 2 and dme == 0) else 0
        centres["iHE"] = _ihe_points(rng, geo, _sample_ihe_counts(rng, severe, minimum, severe_k))
        if mode in ("cws", "both"):
            centres["CWS"] = _draw_points(rng, int(rng.integers(1, 5)),
                                          lambda k: _near_arcades(rng, geo, k, (0.6, 2.3), 0.35), keep)
        if dme:
            centres["HaEx"] = _exudate_points(rng, geo, dme)
        if dr == 4:
            centres.update(_proliferative(rng, geo))
    items = []
    for lesion in LESIONS:
        points = centres.get(lesion)
        if points is not None and len(points):
            sizes = _sizes(rng, lesion, len(points), geo, difficulty)
            items.extend((lesion, x, y, s) for (x, y), s in zip(points, sizes))
    return make_inventory(items, fovea=geo.fovea, disc=geo.disc, disc_diameter=geo.disc_diameter)


# --------------------------------------------------------------------------------------------
# Scenes and labels
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scene:
    """Everything about one image except its pixels: the inputs of :func:`render` and labels."""

    seed: int
    index: int
    domain: Domain
    geometry: Geometry
    inventory: LesionInventory
    capture: Capture
    difficulty: float
    severe_ihe_per_quadrant: int
    target: tuple[int, int]  # the (DR, DME) cell drawn from the prior; labels are computed, not copied

    @property
    def image_id(self) -> str:
        return image_id(self.index)


def image_id(index: int) -> str:
    """File stem of synthetic image ``index``."""
    return f"synth_{index:06d}"


def _streams(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (scene, render) random streams of image ``index``."""
    scene_ss, render_ss = np.random.SeedSequence(seed, spawn_key=(index,)).spawn(2)
    return np.random.default_rng(scene_ss), np.random.default_rng(render_ss)


def _check_common(n: int, size: int, seed: int, difficulty: float, severe_ihe_per_quadrant: int, start: int) -> None:
    for name, value, low in (("n", n, 0), ("size", size, 32), ("seed", seed, 0), ("start", start, 0),
                             ("severe_ihe_per_quadrant", severe_ihe_per_quadrant, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty!r}")


def sample_scenes(n: int, size: int = 256, seed: int = 0, *, domain: DomainSpec = "cam_a",
                  prior: PriorSpec = "idrid", difficulty: float = 0.0,
                  severe_ihe_per_quadrant: int = SEVERE_IHE_PER_QUADRANT, start: int = 0) -> list[Scene]:
    """Scenes of images ``start .. start+n-1`` without rendering them (fast: for label statistics).

    ``generate`` with the same arguments renders exactly these scenes.
    """
    _check_common(n, size, seed, difficulty, severe_ihe_per_quadrant, start)
    table = resolve_prior(prior)
    names, weights = _resolve_domains(domain)
    scenes = []
    for index in range(start, start + n):
        rng, _ = _streams(seed, index)
        chosen = DOMAINS[names[rng.choice(len(names), p=weights)]]
        geo = _sample_geometry(rng, size, chosen)
        cell = int(rng.choice(table.size, p=table.ravel()))
        dr, dme = divmod(cell, 3)
        inventory = _sample_inventory(rng, geo, dr, dme, float(difficulty), int(severe_ihe_per_quadrant))
        scenes.append(Scene(seed=seed, index=index, domain=chosen, geometry=geo, inventory=inventory,
                            capture=_sample_capture(rng, chosen), difficulty=float(difficulty),
                            severe_ihe_per_quadrant=int(severe_ihe_per_quadrant), target=(dr, dme)))
    return scenes


def scene_labels(scene: Scene) -> dict[str, object]:
    """The label row of a scene, computed from its lesion inventory by the grading rules.

    Columns: ids and provenance (``image_id, index, seed, size, domain, eye, difficulty,
    severe_ihe_per_quadrant``), grades (``dr_grade, dme_grade, referable``), geometry in pixels
    (``disc_x, disc_y, fovea_x, fovea_y, disc_diameter, fov_x, fov_y, fov_radius``),
    ``haex_fovea_dd`` (nearest exudate centre to the fovea in disc diameters, NaN without
    exudates), per lesion ``lesion_<L>`` (0/1), ``count_<L>`` and ``count_<L>_<Q>`` for the
    quadrants ``ST, SN, IN, IT``, and capture (``blur_sigma`` in px, ``noise_std``,
    ``exposure_gain``, ``jpeg_quality`` (0 = lossless), ``quality_*`` flags).
    """
    geo, inventory, capture = scene.geometry, scene.inventory, scene.capture
    grades = grade(inventory, scene.severe_ihe_per_quadrant)
    counts = lesion_counts(inventory)
    by_quadrant = quadrant_counts(inventory)
    distance = haex_fovea_distance_dd(inventory)
    row: dict[str, object] = {
        "image_id": scene.image_id, "index": scene.index, "seed": scene.seed, "size": geo.size,
        "domain": scene.domain.name, "eye": geo.eye, "difficulty": scene.difficulty,
        "severe_ihe_per_quadrant": scene.severe_ihe_per_quadrant,
        "dr_grade": grades.dr, "dme_grade": grades.dme, "referable": int(grades.referable),
        "disc_x": geo.disc[0], "disc_y": geo.disc[1], "fovea_x": geo.fovea[0], "fovea_y": geo.fovea[1],
        "disc_diameter": geo.disc_diameter, "fov_x": geo.cx, "fov_y": geo.cy, "fov_radius": geo.radius,
        "haex_fovea_dd": distance if np.isfinite(distance) else np.nan,
    }
    row.update({f"lesion_{lesion}": int(counts[lesion] > 0) for lesion in LESIONS})
    row.update({f"count_{lesion}": counts[lesion] for lesion in LESIONS})
    row.update({f"count_{lesion}_{q}": by_quadrant[lesion][q] for lesion in LESIONS for q in QUADRANTS})
    row.update({"blur_sigma": capture.blur * geo.radius, "noise_std": capture.noise,
                "exposure_gain": capture.gain, "jpeg_quality": capture.jpeg or 0})
    row.update(capture.flags())
    return row


def sample_labels(n: int, size: int = 256, seed: int = 0, **options) -> pd.DataFrame:
    """The labels table of :func:`generate` without rendering (same arguments, same rows)."""
    return pd.DataFrame([scene_labels(scene) for scene in sample_scenes(n, size, seed, **options)])


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_SHIFT = 4                 # OpenCV sub-pixel bits: coordinates are drawn at 1/16 pixel
_ONE = 1 << _SHIFT


def _fix(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> OpenCV fixed point int32."""
    return np.round(np.asarray(points) * _ONE).astype(np.int32)


def _work_size(size: int) -> int:
    """Resolution of the smooth background (colour, light, disc, fovea): a quarter of the image,
    at least 128 px; it is enlarged to full size, which is much cheaper than computing it there."""
    return min(size, max(128, size // 4))


@lru_cache(maxsize=8)
def _grid(work: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution pixel coordinates (x, y) of the centres of a ``work`` x ``work`` grid that
    ``cv2.resize`` maps onto a ``size`` x ``size`` image; float32, cached, read-only."""
    axis = ((np.arange(work, dtype=np.float32) + 0.5) * np.float32(size / work) - 0.5).astype(np.float32)
    xx, yy = np.meshgrid(axis, axis)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


def _enlarge(array: np.ndarray, size: int) -> np.ndarray:
    return array if array.shape[0] == size else cv2.resize(array, (size, size), interpolation=cv2.INTER_LINEAR)


def _background(geo: Geometry, domain: Domain, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fundus colour without vessels or lesions, and the light map, both at full size.

    Light = vignetting (bright centre, darker rim) x low-frequency choroidal texture (three
    octaves of smoothly interpolated noise). Colour = per-image tone x light, then the optic
    disc (soft-edged bright yellowish ellipse with a brighter cup) and the darker fovea inside a
    slightly darker macula.
    """
    work = _work_size(geo.size)
    xx, yy = _grid(work, geo.size)
    rn2 = ((xx - np.float32(geo.cx)) ** 2 + (yy - np.float32(geo.cy)) ** 2) / np.float32(geo.radius ** 2)
    rn2 = np.minimum(rn2, 1.3)
    light = 1.0 - domain.vignette * (0.6 * rn2 + 0.4 * rn2 * rn2)
    texture = sum(weight * cv2.resize(rng.standard_normal((cells, cells)).astype(np.float32), (work, work),
                                      interpolation=cv2.INTER_CUBIC)
                  for cells, weight in ((5, 1.0), (18, 0.5), (60, 0.25)))
    light = (light * (1.0 + domain.texture * texture)).astype(np.float32)
    tone = np.array(domain.base_rgb, np.float32) * (1.0 + rng.normal(0.0, 0.04, 3)).astype(np.float32)
    image = light[..., None] * tone

    dd = geo.disc_diameter
    half_w, half_h = dd / 2 * rng.uniform(0.93, 1.0), dd / 2 * rng.uniform(1.0, 1.1)
    dx, dy = xx - np.float32(geo.disc[0]), yy - np.float32(geo.disc[1])
    rho = np.sqrt((dx / half_w) ** 2 + (dy / half_h) ** 2)
    alpha = (np.clip((1.0 - rho) / 0.2 + 0.5, 0.0, 1.0) * 0.85)[..., None]
    disc_colour = np.array([1.0, 0.74, 0.46], np.float32) * np.float32(rng.uniform(0.95, 1.05))
    image += alpha * (disc_colour * light[..., None] - image)
    cup = rng.uniform(0.3, 0.5)
    shift = geo.temporal_axis * 0.15 * dd
    rho_cup = np.sqrt(((dx - shift[0]) / (cup * half_w)) ** 2 + ((dy - shift[1]) / (cup * half_h)) ** 2)
    alpha_cup = (np.clip((1.0 - rho_cup) / 0.6 + 0.5, 0.0, 1.0) * 0.7)[..., None]
    image += alpha_cup * (np.array([1.0, 0.9, 0.72], np.float32) * light[..., None] - image)

    d2 = (xx - np.float32(geo.fovea[0])) ** 2 + (yy - np.float32(geo.fovea[1])) ** 2
    spot = np.exp(-d2 / np.float32(2 * (0.33 * dd) ** 2))[..., None]
    macula = np.exp(-d2 / np.float32(2 * (0.95 * dd) ** 2))[..., None]
    image *= 1.0 - np.float32(rng.uniform(0.8, 1.2)) * (spot * np.array([0.2, 0.4, 0.33], np.float32)
                                                        + macula * np.array([0.05, 0.1, 0.08], np.float32))
    return _enlarge(image, geo.size), _enlarge(light, geo.size)


def _multiply_by(image: np.ndarray, cover: np.ndarray, table: np.ndarray) -> None:
    """image *= table[cover] per channel (``table`` (256, 3) float32), inside the box of ``cover``.

    A look-up table indexed by the 8-bit coverage turns "alpha-blend a colour" into one fast
    OpenCV pass instead of several full-size NumPy temporaries.
    """
    x, y, w, h = cv2.boundingRect(cover)
    if w == 0:
        return
    patch = cover[y:y + h, x:x + w]
    factor = cv2.LUT(cv2.merge([patch, patch, patch]), table.reshape(1, 256, 3))
    region = image[y:y + h, x:x + w]
    cv2.multiply(region, factor, dst=region)


def _transmission_table(strength: float, transmission: np.ndarray) -> np.ndarray:
    """(256, 3) factors 1 - alpha (1 - transmission) for coverage 0..255 at peak alpha ``strength``."""
    alpha = np.arange(256, dtype=np.float32)[:, None] * np.float32(strength / 255.0)
    return (1.0 - alpha * (1.0 - np.asarray(transmission, np.float32))).astype(np.float32)


# Vessels ------------------------------------------------------------------------------------

_ARTERY_WIDTH = 0.045  # trunk widths in disc diameters (veins wider)
_VEIN_WIDTH = 0.062
_VESSEL_TRANSMISSION = {"artery": np.array([0.92, 0.72, 0.78], np.float32),
                        "vein": np.array([0.80, 0.50, 0.58], np.float32)}
_BEND = 0.25            # heading random walk, radians per square-root disc diameter of length
_STEPS = 32             # segments per vessel path
_MIN_WIDTH = 0.5        # px: thinner vessels are not drawn
#: Side-branch generations: (children per parent low, high), (reach low, high) as a fraction of
#: the parent's length beyond the branch point.
_GENERATIONS = (((3, 5), (0.6, 1.0)), ((1, 3), (0.5, 0.9)), ((0, 2), (0.4, 0.8)))


class _Vessels(NamedTuple):
    """A set of vessel paths: ``paths`` (P, _STEPS + 1, 2), ``counts`` (P,) valid leading points,
    ``widths`` (P,) in pixels."""

    paths: np.ndarray
    counts: np.ndarray
    widths: np.ndarray


def _walks(rng: np.random.Generator, geo: Geometry, starts: np.ndarray, headings: np.ndarray,
           lengths: np.ndarray) -> np.ndarray:
    """Smooth random curves (K, _STEPS + 1, 2), one per start: the heading drifts as a random
    walk scaled to the step length, so curvature does not depend on the resolution."""
    step = lengths / _STEPS
    drift = rng.standard_normal((len(starts), _STEPS)) * (_BEND * np.sqrt(step / geo.disc_diameter))[:, None]
    heading = headings[:, None] + np.cumsum(drift, axis=1)
    moves = step[:, None, None] * np.stack([np.cos(heading), np.sin(heading)], axis=2)
    return np.concatenate([starts[:, None], starts[:, None] + np.cumsum(moves, axis=1)], axis=1)


def _clipped(paths: np.ndarray, widths: np.ndarray, geo: Geometry) -> _Vessels:
    """Cut each path where it leaves the FOV or enters the avascular zone round the fovea."""
    outside = np.hypot(paths[..., 0] - geo.cx, paths[..., 1] - geo.cy) > 1.02 * geo.radius
    foveal = np.hypot(paths[..., 0] - geo.fovea[0], paths[..., 1] - geo.fovea[1]) < 0.4 * geo.disc_diameter
    stop = outside | foveal
    stop[:, 0] = False
    counts = np.where(stop.any(axis=1), stop.argmax(axis=1), paths.shape[1])
    keep = counts >= 3
    return _Vessels(paths[keep], counts[keep], widths[keep])


def _side_branches(rng: np.random.Generator, geo: Geometry, parents: _Vessels, children: tuple[int, int],
                   reach: tuple[float, float]) -> _Vessels:
    """One generation of branches for all ``parents`` at once: ``children`` per parent, leaving
    at 25-65 degrees with 55-80 % of the parent's width, reaching ``reach`` times the parent's
    length beyond the branch point (at least one disc diameter)."""
    able = (parents.widths * 0.55 >= _MIN_WIDTH) & (parents.counts >= 6)
    per_parent = rng.integers(children[0], children[1] + 1, len(able)) * able
    parent = np.repeat(np.arange(len(able)), per_parent)
    k = len(parent)
    index = 1 + (rng.random(k) * (parents.counts[parent] - 3)).astype(int)
    paths = parents.paths
    tangent = paths[parent, index + 1] - paths[parent, index - 1]
    headings = np.arctan2(tangent[:, 1], tangent[:, 0]) + rng.choice([-1.0, 1.0], k) * rng.uniform(0.45, 1.1, k)
    along = np.concatenate([np.zeros((len(able), 1)), np.cumsum(np.hypot(*np.diff(paths, axis=1).T).T, axis=1)], axis=1)
    total = along[np.arange(len(able)), parents.counts - 1]
    remaining = np.maximum(total[parent] - along[parent, index], geo.disc_diameter)
    walks = _walks(rng, geo, paths[parent, index], headings, remaining * rng.uniform(*reach, k))
    return _clipped(walks, parents.widths[parent] * rng.uniform(0.55, 0.8, k), geo)


def _trunks(geo: Geometry, rng: np.random.Generator, width: float) -> _Vessels:
    """Main vessels leaving the disc: superior and inferior temporal arcades (the parabola of
    :class:`Geometry`, gently wobbling), two nasal trunks, one small papillomacular vessel."""
    dd = geo.disc_diameter
    disc = np.asarray(geo.disc)
    arcades = []
    for side in (-1, 1):
        w = np.linspace(0.05, 2.9, _STEPS + 1) * rng.uniform(0.97, 1.03)
        wobble = 0.05 * dd * np.sin(w[:, None] * rng.uniform(2, 5) + rng.uniform(0, 2 * np.pi, 2))
        arcades.append(geo.arcade(side, w) + wobble)
    turn = rng.uniform(0.6, 1.1, 2)  # nasal trunks turn this far up / down from the nasal direction
    directions = [np.cos(t) * -geo.temporal_axis + side * np.sin(t) * geo.inferior_axis
                  for t, side in zip(turn, (-1, 1))] + [geo.temporal_axis]
    headings = np.array([np.arctan2(d[1], d[0]) for d in directions]) + np.array([0, 0, rng.uniform(-0.3, 0.3)])
    starts = np.stack([disc - 0.2 * dd * geo.inferior_axis, disc + 0.2 * dd * geo.inferior_axis, disc])
    walks = _walks(rng, geo, starts, headings, np.array([1.2 * geo.radius, 1.2 * geo.radius, 2.0 * dd]))
    paths = np.concatenate([np.stack(arcades), walks])
    return _clipped(paths, width * np.array([1.0, 1.0, 0.8, 0.8, 0.35]), geo)


def _vessel_trees(geo: Geometry, rng: np.random.Generator) -> dict[str, list[_Vessels]]:
    """Artery and vein trees: the trunks and three generations of side branches each."""
    trees: dict[str, list[_Vessels]] = {}
    for kind, trunk_width in (("artery", _ARTERY_WIDTH), ("vein", _VEIN_WIDTH)):
        generations = [_trunks(geo, rng, trunk_width * geo.disc_diameter)]
        for children, reach in _GENERATIONS:
            generations.append(_side_branches(rng, geo, generations[-1], children, reach))
        trees[kind] = generations
    return trees


def _stroke(canvas: np.ndarray, generations: list[_Vessels]) -> None:
    """Anti-aliased strokes tapering along each vessel (three pieces at 100/85/70 % width);
    strokes thinner than a pixel are 1 px wide and proportionally fainter.

    Strokes are grouped by (intensity, thickness) so OpenCV draws each group in one call, faint
    groups first so that a faint branch never lightens the vessel it leaves.
    """
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for vessels in generations:
        fixed = _fix(vessels.paths)
        last = vessels.counts - 1
        tapered = vessels.widths > 1.5
        # piece boundaries (P, 4): thirds of each path, or the whole path when it is thin
        bounds = np.where(tapered[:, None], np.round(last[:, None] * np.arange(4) / 3).astype(int),
                          np.array([0, 0, 0, 1]) * last[:, None])
        widths = vessels.widths[:, None] * np.array([1.0, 0.85, 0.7])
        thickness = np.maximum(1, np.round(widths)).astype(int)
        intensity = np.where(widths < 1, np.round(255 * widths / 16).astype(int) * 16, 255)
        for p, j in zip(*np.nonzero((widths >= _MIN_WIDTH) & (bounds[:, 1:] > bounds[:, :-1]))):
            key = (int(intensity[p, j]), int(thickness[p, j]))
            groups.setdefault(key, []).append(fixed[p, bounds[p, j]:bounds[p, j + 1] + 1])
    for (intensity, thickness), lines in sorted(groups.items()):
        cv2.polylines(canvas, lines, False, intensity, thickness, cv2.LINE_AA, _SHIFT)


def _draw_vessels(image: np.ndarray, geo: Geometry, rng: np.random.Generator) -> None:
    for kind, generations in _vessel_trees(geo, rng).items():
        canvas = np.zeros((geo.size, geo.size), np.uint8)
        _stroke(canvas, generations)
        _multiply_by(image, canvas, _transmission_table(1.0, _VESSEL_TRANSMISSION[kind]))


# Lesions ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Look:
    """How a lesion class is composited: ``dark`` lesions multiply the image by a per-channel
    transmission, bright ones blend towards a colour (scaled by the local light)."""

    dark: bool
    colour: tuple[float, float, float]
    strength: float
    mask_level: int = 128  # mask = shape coverage >= this (0-255), before any softening blur


_LOOKS: dict[str, _Look] = {
    "MA": _Look(True, (0.66, 0.30, 0.36), 0.95),
    "iHE": _Look(True, (0.66, 0.28, 0.34), 0.95),
    "HaEx": _Look(False, (1.0, 0.90, 0.42), 0.92),
    "CWS": _Look(False, (0.93, 0.88, 0.80), 0.7),
    "vHE": _Look(True, (0.50, 0.10, 0.10), 0.85),
    "pHE": _Look(True, (0.58, 0.16, 0.2), 0.92),
    "NV": _Look(True, (0.74, 0.46, 0.52), 0.9, mask_level=1),
    "FiP": _Look(False, (0.92, 0.88, 0.82), 0.6),
}
#: Drawing order, back to front: membranes and new vessels first, vitreous blood last.
_DRAW_ORDER: tuple[str, ...] = ("FiP", "NV", "HaEx", "CWS", "MA", "iHE", "pHE", "vHE")


def _polygon(rng: np.random.Generator, centre: tuple[float, float], radius: float, vertices: int,
             irregularity: float, aspect: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """An irregular star-convex polygon (vertices, 2) around ``centre``."""
    theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False) + rng.normal(0, 0.15, vertices)
    rho = radius * (1.0 + irregularity * rng.uniform(-1, 1, vertices))
    x, y = rho * np.cos(theta) * aspect, rho * np.sin(theta)
    c, s = np.cos(angle), np.sin(angle)
    return np.column_stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y])


def _shape_ma(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    for item in items:
        cv2.circle(canvas, tuple(_fix((item.x, item.y))), int(round(item.size * _ONE)), 255, -1, cv2.LINE_AA, _SHIFT)


def _shape_ihe(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    """Dot/blot haemorrhages (irregular polygons) and flame haemorrhages (ellipses along the
    nerve fibres, i.e. pointing away from the disc)."""
    for item in items:
        if rng.random() < 0.35:
            radial = np.arctan2(item.y - geo.disc[1], item.x - geo.disc[0])
            aspect = rng.uniform(2.2, 3.5)
            polygon = _polygon(rng, (item.x, item.y), item.size / aspect, 10, 0.15, aspect=aspect, angle=radial)
        else:
            polygon = _polygon(rng, (item.x, item.y), item.size * 0.8, 9, 0.3)
        cv2.fillPoly(canvas, [_fix(polygon)], 255, cv2.LINE_AA, _SHIFT)


def _shape_haex(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    for item in items:
        cv2.fillPoly(canvas, [_fix(_polygon(rng, (item.x, item.y), item.size, 6, 0.35))], 255, cv2.LINE_AA, _SHIFT)


def _shape_cws(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    """Fluffy patches: a few overlapping ellipses (softened later)."""
    for item in items:
        for _ in range(int(rng.integers(3, 6))):
            offset = rng.normal(0, 0.3 * item.size, 2)
            radius = item.size * rng.uniform(0.45, 0.7)
            polygon = _polygon(rng, (item.x + offset[0], item.y + offset[1]), radius, 10, 0.15,
                               aspect=rng.uniform(1.0, 1.6), angle=rng.uniform(0, np.pi))
            cv2.fillPoly(canvas, [_fix(polygon)], 255, cv2.LINE_AA, _SHIFT)


def _shape_phe(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    """Boat-shaped: the lower half of an ellipse, so the upper edge is flat (the fluid level)."""
    for item in items:
        depth = item.size * rng.uniform(0.5, 0.75)
        top = (item.x, item.y - depth / 2)
        axes = (int(round(item.size * _ONE)), int(round(depth * _ONE)))
        cv2.ellipse(canvas, tuple(_fix(top)), axes, 0, 0, 180, 255, -1, cv2.LINE_AA, _SHIFT)


def _shape_nv(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    """Tangles of fine vessel loops."""
    thickness = max(1, int(round(0.006 * geo.radius)))
    for item in items:
        loops = []
        for _ in range(int(rng.integers(6, 12))):
            offset = rng.uniform(-0.55, 0.55, 2) * item.size
            loops.append(_fix(_polygon(rng, (item.x + offset[0], item.y + offset[1]),
                                       item.size * rng.uniform(0.15, 0.4), 10, 0.3)))
        cv2.polylines(canvas, loops, True, 255, thickness, cv2.LINE_AA, _SHIFT)


def _shape_fip(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    """A whitish band along the nearest temporal arcade, ``size`` either side of the centre."""
    w = np.linspace(0.05, 3.0, 240)
    arcades = {side: geo.arcade(side, w) for side in (-1, 1)}
    for item in items:
        distances = {side: np.hypot(*(points - (item.x, item.y)).T) for side, points in arcades.items()}
        side = min(distances, key=lambda s: distances[s].min())
        band = arcades[side][distances[side] <= item.size]
        thickness = max(2, int(round(rng.uniform(0.15, 0.3) * geo.disc_diameter)))
        cv2.polylines(canvas, [_fix(band)], False, 255, thickness, cv2.LINE_AA, _SHIFT)


def _shape_vhe(canvas: np.ndarray, items: Sequence[Lesion], geo: Geometry, rng: np.random.Generator) -> None:
    for item in items:
        cv2.fillPoly(canvas, [_fix(_polygon(rng, (item.x, item.y), item.size, 14, 0.3))], 255, cv2.LINE_AA, _SHIFT)


_SHAPES: dict[str, Callable] = {"MA": _shape_ma, "iHE": _shape_ihe, "HaEx": _shape_haex, "CWS": _shape_cws,
                                "vHE": _shape_vhe, "pHE": _shape_phe, "NV": _shape_nv, "FiP": _shape_fip}


def _soften(cover: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a coverage map, computed only around its non-zero pixels."""
    x, y, w, h = cv2.boundingRect(cover)
    pad = int(3 * sigma) + 2
    rows = slice(max(0, y - pad), min(cover.shape[0], y + h + pad))
    cols = slice(max(0, x - pad), min(cover.shape[1], x + w + pad))
    out = np.zeros_like(cover)
    out[rows, cols] = cv2.GaussianBlur(cover[rows, cols], (0, 0), sigma)
    return out


def _coverage(lesion: str, items: Sequence[Lesion], geo: Geometry,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(alpha coverage uint8, binary mask) of one lesion class.

    The mask is the drawn shape (coverage >= the class's ``mask_level``) before any softening,
    so soft lesions (CWS, FiP, vHE) have masks at their visible core, not their faint halo.
    vHE is drawn at quarter resolution and blurred heavily there (a haze), then enlarged.
    """
    size = geo.size
    if lesion == "vHE":
        small = max(8, size // 4)
        scale = small / size
        canvas = np.zeros((small, small), np.uint8)
        scaled = [Lesion(item.lesion, item.x * scale, item.y * scale, item.size * scale, item.quadrant)
                  for item in items]
        _shape_vhe(canvas, scaled, geo, rng)
        canvas = _soften(canvas, max(1.0, 0.3 * min(item.size for item in scaled)))
        cover = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR)
        mask = cover >= 128
        _mark_centres(mask, items)
        return cover, mask
    canvas = np.zeros((size, size), np.uint8)
    _SHAPES[lesion](canvas, items, geo, rng)
    mask = canvas >= _LOOKS[lesion].mask_level
    if lesion != "NV":  # NV is a tangle of lines, its centre need not lie on one
        _mark_centres(mask, items)
    soft = {"CWS": 0.3, "FiP": 0.25, "iHE": 0.08}.get(lesion)
    if soft:
        canvas = _soften(canvas, max(0.6, soft * float(np.mean([item.size for item in items]))))
    return canvas, mask


def _mark_centres(mask: np.ndarray, items: Sequence[Lesion]) -> None:
    """Put each instance's centre pixel in the mask: a lesion smaller than a pixel still has a
    non-empty mask, and a DME-2 exudate has a mask pixel within 1 DD (+ half a pixel) of the fovea."""
    size = mask.shape[0]
    xs = np.clip(np.floor([item.x + 0.5 for item in items]).astype(int), 0, size - 1)
    ys = np.clip(np.floor([item.y + 0.5 for item in items]).astype(int), 0, size - 1)
    mask[ys, xs] = True


def _blend_towards(image: np.ndarray, light: np.ndarray, cover: np.ndarray, strength: float,
                   colour: np.ndarray) -> None:
    """image += alpha (colour * light - image) inside the box of ``cover`` (bright lesions)."""
    x, y, w, h = cv2.boundingRect(cover)
    if w == 0:
        return
    alpha = np.arange(256, dtype=np.float32)[:, None] * np.float32(strength / 255.0)
    patch = cover[y:y + h, x:x + w]
    patch3 = cv2.merge([patch, patch, patch])
    keep = cv2.LUT(patch3, np.repeat(1.0 - alpha, 3, axis=1).reshape(1, 256, 3))
    add = cv2.LUT(patch3, (alpha * colour).astype(np.float32).reshape(1, 256, 3))
    region = image[y:y + h, x:x + w]
    cv2.multiply(region, keep, dst=region)
    region += add * light[y:y + h, x:x + w, None]


def _draw_lesions(image: np.ndarray, light: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Composite the lesions back to front; return their masks (8, H, W) in LESIONS order."""
    geo = scene.geometry
    masks = np.zeros((len(LESIONS), geo.size, geo.size), dtype=bool)
    contrast = 1.0 - DIFFICULTY_CONTRAST_DROP * scene.difficulty
    for lesion in _DRAW_ORDER:
        items = scene.inventory.of(lesion)
        if not items:
            continue
        cover, mask = _coverage(lesion, items, geo, rng)
        look = _LOOKS[lesion]
        colour = np.array(look.colour, np.float32)
        if look.dark:
            _multiply_by(image, cover, _transmission_table(look.strength * contrast, colour))
        else:
            _blend_towards(image, light, cover, look.strength * contrast, colour)
        masks[LESIONS.index(lesion)] = mask
    return masks


# Field of view and capture ------------------------------------------------------------------

def _fov_alpha(geo: Geometry) -> np.ndarray:
    """Anti-aliased field-of-view coverage (H, W) float32: circle, optional flat cut and notch tab."""
    axis = np.arange(geo.size, dtype=np.float32)
    dx2 = (axis - np.float32(geo.cx)) ** 2
    dy = axis - np.float32(geo.cy)
    alpha = np.clip(np.float32(geo.radius + 0.5) - np.sqrt(dx2[None, :] + (dy * dy)[:, None]), 0.0, 1.0)
    if geo.cut is not None:
        alpha = np.minimum(alpha, np.clip(np.float32(geo.cut * geo.radius + 0.5) - np.abs(dy), 0.0, 1.0)[:, None])
    if geo.notch:
        half = 0.05 * geo.radius
        angle = np.deg2rad(-42.0)  # upper right, like skimage.data.retina()
        reach = geo.radius + 0.6 * half
        rows, cols = _roi(geo.size, (geo.cx + reach * np.cos(angle), geo.cy + reach * np.sin(angle)), half)
        alpha[rows, cols] = 1.0
    return alpha


def _roi(size: int, centre: tuple[float, float], half: float) -> tuple[slice, slice]:
    """Row and column slices of the square of half-side ``half`` around ``centre``, clipped."""
    x0, x1 = int(max(0, centre[0] - half)), int(min(size, centre[0] + half + 1))
    y0, y1 = int(max(0, centre[1] - half)), int(min(size, centre[1] + half + 1))
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _gaussian_table() -> np.ndarray:
    """(256,) float32 normal quantiles with unit variance: maps uniform bytes to Gaussian noise
    through ``cv2.LUT``, several times faster than drawing normal floats."""
    quantiles = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], np.float32)
    return quantiles / quantiles.std()


_GAUSSIAN = _gaussian_table()


def _capture(image: np.ndarray, fov: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Camera effects, then 8-bit: resolution loss, FOV, blur, exposure and cast, noise, JPEG."""
    geo, capture, domain = scene.geometry, scene.capture, scene.domain
    size = geo.size
    if domain.resolution < 1.0:
        low = max(8, int(round(size * domain.resolution)))
        image = cv2.resize(cv2.resize(image, (low, low), interpolation=cv2.INTER_AREA), (size, size),
                           interpolation=cv2.INTER_LINEAR)
    fov3 = cv2.merge([fov, fov, fov])
    exposure = np.array(capture.cast, np.float32) * np.float32(capture.gain * 255.0)
    sigma = capture.blur * geo.radius
    if sigma >= 0.3:  # blur after masking, so the rim of the field softens as in a real camera
        image = cv2.GaussianBlur(image * fov3, (0, 0), sigma)
    image = image * exposure
    if capture.noise > 0:
        noise = cv2.LUT(rng.integers(0, 256, image.shape, dtype=np.uint8), _GAUSSIAN.reshape(1, 256))
        image += noise * np.float32(capture.noise)
    image *= fov3  # noise-free black surround
    np.maximum(image, 0.0, out=image)
    out = cv2.convertScaleAbs(image)  # rounds and saturates at 255; input is non-negative
    if capture.jpeg is not None:
        ok, encoded = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, capture.jpeg])
        out = np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])
    return out


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a scene: (image (H, W, 3) uint8 RGB, masks (8, H, W) bool in LESIONS order).

    Masks are clipped to the field of view; a lesion class has a non-empty mask exactly when
    the inventory holds one of its instances.
    """
    geo = scene.geometry
    _, rng = _streams(scene.seed, scene.index)
    image, light = _background(geo, scene.domain, rng)
    _draw_vessels(image, geo, rng)
    masks = _draw_lesions(image, light, scene, rng)
    fov = _fov_alpha(geo)
    masks &= (fov > 0.5)[None]
    return _capture(image, fov, scene, rng), masks


# --------------------------------------------------------------------------------------------
# Public API: in memory, on disk, LR/HR pairs
# --------------------------------------------------------------------------------------------

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
