"""Eye geometry of one synthetic image: field of view, optic disc, fovea and eye side, all
sized relative to the field-of-view radius so every resolution works (SYNTHETIC data).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fundus_lib.data.synthetic.domains import Domain


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
