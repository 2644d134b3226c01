"""Lesion inventories of synthetic images: where and how many lesions of each class to draw so
that the grading rules give a target (DR, DME) pair (SYNTHETIC data; no pixels here).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fundus_lib.data.grading import QUADRANTS, LesionInventory, make_inventory, quadrant_of
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.synthetic.anatomy import Geometry

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

    if dr == 0 and dme:
        # hard exudates alone are indirect evidence: DR 0, yet DME (grading.py)
        centres["HaEx"] = _exudate_points(rng, geo, dme)
    elif dr == 1:
        centres["MA"] = _draw_points(rng, 1 + min(int(rng.poisson(3.0)), 11), pole, keep)
    elif dr >= 2:
        # at least one MA, so exudates (with MA) are grade-2 evidence even without haemorrhages
        centres["MA"] = _draw_points(rng, 1 + min(int(rng.poisson(6.0)), 19), pole, keep)
        # DR3 evidence (always for DR3, in half of the DR4 eyes): CWS, 4-quadrant haemorrhages or both
        severe_signs = dr == 3 or (dr == 4 and rng.random() < 0.5)
        mode = str(rng.choice(["cws", "ihe", "both"], p=[0.45, 0.3, 0.25])) if severe_signs else "none"
        severe = mode in ("ihe", "both")
        # without exudates, grade-2 evidence (which CWS needs to give DR3) is a haemorrhage
        minimum = 1 if dme == 0 else 0
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
