"""Pixels of a synthetic fundus image: background and anatomy, vessel trees, lesions with their
exact masks, the camera's field of view and capture effects (SYNTHETIC data).

OpenCV anti-aliased primitives and whole-array NumPy, no per-pixel Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np

from fundus_lib.data.grading import Lesion
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.synthetic.anatomy import Geometry
from fundus_lib.data.synthetic.domains import Domain
from fundus_lib.data.synthetic.lesions import DIFFICULTY_CONTRAST_DROP
from fundus_lib.data.synthetic.scenes import Scene, _streams

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
