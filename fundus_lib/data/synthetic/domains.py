"""Camera domains of the synthetic generator and the capture settings each draws per image
(blur, exposure, noise, JPEG; SYNTHETIC data): the knobs of domain-shift and robustness studies.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence, Union

import numpy as np

#: A domain argument: one name of :data:`DOMAINS`, a list of names (uniform) or {name: weight}.
DomainSpec = Union[str, Sequence[str], Mapping[str, float]]

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
