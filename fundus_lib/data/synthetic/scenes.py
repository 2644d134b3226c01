"""Scenes (everything about a synthetic image except its pixels) and the labels computed from
them with :mod:`fundus_lib.data.grading` (SYNTHETIC data). Deterministic per (seed, index).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fundus_lib.data.grading import (QUADRANTS, SEVERE_IHE_PER_QUADRANT, LesionInventory, grade,
                                     haex_fovea_distance_dd, lesion_counts, quadrant_counts)
from fundus_lib.data.manifest import LESIONS
from fundus_lib.data.synthetic.anatomy import Geometry, _sample_geometry
from fundus_lib.data.synthetic.domains import DOMAINS, Capture, Domain, DomainSpec, _resolve_domains, _sample_capture
from fundus_lib.data.synthetic.lesions import _sample_inventory
from fundus_lib.data.synthetic.prior import PriorSpec, resolve_prior


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
