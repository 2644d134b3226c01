"""ELLG's lesion generation (Lin et al., IJCAI-W 2020, Sec. 2.3): new DR images made from saliency maps.

From a correctly classified DR image (the *source*) and its normalised GMSM
(:func:`fundus_lib.explain.gmsm`), a new training image is made on another correctly classified
image (the *target*, a normal eye by default) in four steps:

1. **Lesion patch extraction** (Eq. 4, :func:`lesion_mask`, :func:`extract_patches`):
   ``M = L_norm > tau`` with ``tau`` drawn uniformly in [0.5, 0.8] (:data:`TAU_RANGE`); each
   connected region of ``M`` is one lesion patch (the source's pixels under it).
2. **Adaptive lesion transfer** (:func:`place_patches`, :func:`reinhard_transfer`): each patch is
   shifted at random, up to 100 tries (:data:`MAX_TRIES`), until it overlaps no patch placed
   before it; the source is recoloured to the target's tone by Reinhard et al.'s colour transfer
   (match each channel's mean and standard deviation in l-alpha-beta space).
3. **Blending** (Eq. 5, :func:`blend`): ``I_b = r I_s + (1 - r) I_o`` where the transferred lesion
   image ``I_s`` has a patch, else ``I_o`` (the target), with a random ratio ``r``.
4. **Label mixing** (Eq. 6, :func:`mix_label`): ``l_b = classify(r l_s + (1 - r) l_o)``, the
   mixed severity mapped to a grade by the grader's thresholds.

Choices the paper leaves open, made explicit here:

* ``r`` is drawn uniformly in :data:`R_RANGE` = [0.5, 1] ("mixup with a random ratio", Sec. 2.3;
  below 0.5 the pasted lesions would be mostly the target's own pixels).
* Eq. 5's condition "``I_s != 0``" is read as "inside a placed patch" (a mask travels with the
  pixels), so a transferred pixel that happens to be black still counts as a lesion pixel.
* Colour statistics are taken over each image's field of view when ``source_fov`` / ``target_fov``
  are given (the black surround would otherwise dominate the mean), over all pixels when not.
* Shifts keep a patch's bounding box inside the image; with ``allowed`` (the target's field of
  view) a shift that puts any patch pixel outside it counts as a failed try. When all 100 tries
  fail, the last try inside ``allowed`` is kept even though it overlaps (the paper: "until there is
  no overlap ... or the loop is over"); a patch with no such try is dropped and counted.
* Target images: correctly classified grade-0 ("normal") images, as the paper's overview says
  (Fig. 1, "blends them into randomly selected normal images"); :func:`choose_pairs` takes any
  grades for targets when asked.

**Provenance.** Every :class:`Generated` image carries its source and target ids, ``r``, ``tau``,
the shifts and tries of each patch, and the mixed label, so a student can audit it. On the
synthetic benchmark the true lesion masks travel with the pixels (:func:`transfer_masks`): the
masks under each placed patch are shifted with it and added to the target's, and
:func:`grade_from_masks` recomputes the generated image's DR grade with the rules of
:mod:`fundus_lib.data.grading`, to compare with the mixed label.

**Grades from masks** (:func:`grade_from_masks`): the grading rules read a lesion *inventory*
(class, centre, size, quadrant around the fovea), not masks. The inventory is rebuilt from the
masks: one lesion per 8-connected component of each lesion's mask, its centroid as centre and
the radius of a disc of the same area as size; the quadrants come from the target's fovea and disc
(pasted lesions land in the target's eye). Approximation: touching lesions of one class merge into
one component, and a lesion cut by a patch border counts once per piece, which can move the
haemorrhage counts of the DR3 quadrant rule. :func:`grade_from_masks` applied to the original,
unmodified images measures how often this reproduces their true grades (notebook 14 prints it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage import color

from fundus_lib.data.grading import SEVERE_IHE_PER_QUADRANT, dr_grade, make_inventory
from fundus_lib.data.manifest import LESIONS
from fundus_lib.models.o_o import DEFAULT_THRESHOLDS, apply_thresholds

#: Range of the extraction threshold tau of Eq. 4 (Sec. 3.1: "limited in [0.5, 0.8]").
TAU_RANGE: tuple[float, float] = (0.5, 0.8)
#: Random shifts tried per patch before giving up on a free place (Sec. 2.3: "100 in our setting").
MAX_TRIES = 100
#: Range of the blending ratio r of Eqs. 5-6 (not given by the paper; see the module docstring).
R_RANGE: tuple[float, float] = (0.5, 1.0)
#: Floor of the LMS values before the logarithm of Reinhard's transform (black pixels).
LMS_FLOOR = 1e-4

# Reinhard et al. (2001), Eq. 2 (XYZ -> LMS) and Eqs. 4 / 6 (log LMS <-> l-alpha-beta).
_XYZ_TO_LMS = np.array([[0.3897, 0.6890, -0.0787],
                        [-0.2298, 1.1834, 0.0464],
                        [0.0, 0.0, 1.0]])
_LMS_TO_XYZ = np.linalg.inv(_XYZ_TO_LMS)
_LOG_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2],
                                                                                          [1, -1, 0]])
_LAB_TO_LOG_LMS = np.linalg.inv(_LOG_LMS_TO_LAB)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def _check_image(image: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be an (H, W, 3) float RGB array in [0, 1], got {array.dtype} {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError(f"{name} must hold finite values in [0, 1]")
    return array.astype(np.float64)


def _check_mask(mask: np.ndarray | None, shape: tuple[int, int], name: str) -> np.ndarray | None:
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array.astype(bool)


def _check_range(value: float, bounds: tuple[float, float], name: str) -> float:
    if not np.isfinite(value) or not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must lie in [{bounds[0]}, {bounds[1]}], got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# 1. lesion patch extraction (Eq. 4)
# --------------------------------------------------------------------------------------------

def lesion_mask(saliency: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 4: the map min-max normalised to [0, 1], then ``> tau`` -> (H, W) bool mask.

    A constant map (nothing salient) gives an empty mask."""
    tau = _check_range(tau, (0.0, 1.0), "tau")
    s = np.asarray(saliency, dtype=np.float64)
    if s.ndim != 2 or not np.isfinite(s).all():
        raise ValueError(f"saliency must be a finite (H, W) map, got shape {s.shape}")
    span = s.max() - s.min()
    if span <= 0:
        return np.zeros(s.shape, dtype=bool)
    return (s - s.min()) / span > tau


def extract_patches(mask: np.ndarray) -> list[np.ndarray]:
    """The lesion patches of an Eq. 4 mask: one (H, W) bool mask per 8-connected region."""
    labelled, n = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3)))
    return [labelled == k for k in range(1, n + 1)]


# --------------------------------------------------------------------------------------------
# 2a. Reinhard colour transfer in l-alpha-beta
# --------------------------------------------------------------------------------------------

def rgb_to_lalphabeta(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) sRGB in [0, 1] -> Reinhard's l-alpha-beta: ``skimage.color.rgb2xyz`` (sRGB, D65),
    Reinhard's XYZ -> LMS matrix, log10 (LMS floored at :data:`LMS_FLOOR`), decorrelation."""
    lms = color.rgb2xyz(_check_image(rgb, "rgb")) @ _XYZ_TO_LMS.T
    return np.log10(np.maximum(lms, LMS_FLOOR)) @ _LOG_LMS_TO_LAB.T


def lalphabeta_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lalphabeta`, clipped to [0, 1] by ``skimage.color.xyz2rgb``."""
    lms = 10.0 ** (np.asarray(lab, dtype=np.float64) @ _LAB_TO_LOG_LMS.T)
    return color.xyz2rgb(lms @ _LMS_TO_XYZ.T)


def _statistics(lab: np.ndarray, region: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    pixels = lab.reshape(-1, 3) if region is None else lab[region]
    if len(pixels) < 2:
        raise ValueError(f"{name} holds fewer than 2 pixels: no colour statistics")
    return pixels.mean(axis=0), pixels.std(axis=0)


def reinhard_transfer(source: np.ndarray, target: np.ndarray, source_fov: np.ndarray | None = None,
                      target_fov: np.ndarray | None = None) -> np.ndarray:
    """Reinhard et al. (2001): recolour ``source`` so that each l-alpha-beta channel has the target's
    mean and standard deviation, ``l' = (l - mean_s) * std_t / std_s + mean_t``; returns RGB in [0, 1].

    Statistics are taken inside ``source_fov`` / ``target_fov`` when given (fundus photographs:
    the field of view, not the black surround). Every source pixel is transformed.
    """
    src, tgt = _check_image(source, "source"), _check_image(target, "target")
    lab_s, lab_t = rgb_to_lalphabeta(src), rgb_to_lalphabeta(tgt)
    mean_s, std_s = _statistics(lab_s, _check_mask(source_fov, src.shape[:2], "source_fov"), "source_fov")
    mean_t, std_t = _statistics(lab_t, _check_mask(target_fov, tgt.shape[:2], "target_fov"), "target_fov")
    scale = np.divide(std_t, std_s, out=np.ones(3), where=std_s > 0)
    return lalphabeta_to_rgb((lab_s - mean_s) * scale + mean_t)


# --------------------------------------------------------------------------------------------
# 2b. adaptive transfer: random shifts until no overlap
# --------------------------------------------------------------------------------------------

def shift(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``array`` (H, W, ...) moved by (dy, dx) pixels, zero-filled (nothing wraps around)."""
    out = np.zeros_like(array)
    h, w = array.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = array[ys, xs]
    return out


@dataclass(frozen=True)
class Placement:
    """Where one patch went: its shift, the tries it took, and whether it still overlaps or was dropped."""

    dy: int
    dx: int
    tries: int
    overlaps: bool
    dropped: bool = False


def place_patches(patches: Sequence[np.ndarray], rng: np.random.Generator, *, allowed: np.ndarray | None = None,
                  max_tries: int = MAX_TRIES) -> list[Placement]:
    """Random shifts, one patch after another, each redrawn up to ``max_tries`` times until the
    shifted patch overlaps no patch placed before it (and lies inside ``allowed`` when given).

    Shifts keep the patch's bounding box inside the image. See the module docstring for what
    happens when every try fails.
    """
    if not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be an int >= 1, got {max_tries!r}")
    placements: list[Placement] = []
    if not patches:
        return placements
    shape = patches[0].shape
    allowed = _check_mask(allowed, shape, "allowed")
    occupied = np.zeros(shape, dtype=bool)
    for patch in patches:
        if patch.shape != shape or not patch.any():
            raise ValueError(f"every patch must be a non-empty bool mask of shape {shape}")
        ys, xs = np.nonzero(patch)
        chosen: Placement | None = None
        fallback: tuple[int, int] | None = None
        for attempt in range(1, max_tries + 1):
            dy = int(rng.integers(-ys.min(), shape[0] - ys.max()))
            dx = int(rng.integers(-xs.min(), shape[1] - xs.max()))
            inside = allowed is None or bool(allowed[ys + dy, xs + dx].all())
            if not inside:
                continue
            fallback = (dy, dx)
            if not occupied[ys + dy, xs + dx].any():
                chosen = Placement(dy, dx, attempt, overlaps=False)
                break
        if chosen is None:
            chosen = (Placement(*fallback, max_tries, overlaps=True) if fallback is not None
                      else Placement(0, 0, max_tries, overlaps=False, dropped=True))
        if not chosen.dropped:
            occupied[ys + chosen.dy, xs + chosen.dx] = True
        placements.append(chosen)
    return placements


def transfer_masks(patches: Sequence[np.ndarray], placements: Sequence[Placement], masks: np.ndarray) -> np.ndarray:
    """The (C, H, W) true masks under each patch, shifted with it: what the pasted pixels show."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros_like(masks)
    for patch, where in zip(patches, placements):
        if not where.dropped:
            out |= shift((masks & patch).transpose(1, 2, 0), where.dy, where.dx).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------------------------
# 3-4. blending (Eq. 5) and label mixing (Eq. 6)
# --------------------------------------------------------------------------------------------

def blend(target: np.ndarray, lesion_image: np.ndarray, lesion_region: np.ndarray, r: float) -> np.ndarray:
    """Eq. 5: ``r * I_s + (1 - r) * I_o`` inside ``lesion_region`` (where ``I_s`` holds a lesion
    patch), ``I_o`` elsewhere; (H, W, 3) float images in [0, 1]."""
    r = _check_range(r, (0.0, 1.0), "r")
    tgt, les = _check_image(target, "target"), _check_image(lesion_image, "lesion_image")
    region = _check_mask(lesion_region, tgt.shape[:2], "lesion_region")
    return np.where(region[..., None], r * les + (1 - r) * tgt, tgt)


def mix_label(source_label: float, target_label: float, r: float,
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> int:
    """Eq. 6: ``classify(r l_s + (1 - r) l_o)``, the mixed severity mapped to a grade by ``thresholds``
    (the grader's ``classify()``: :func:`fundus_lib.models.o_o.apply_thresholds`)."""
    r = _check_range(r, (0.0, 1.0), "r")
    return int(apply_thresholds([r * float(source_label) + (1 - r) * float(target_label)], thresholds)[0])


# --------------------------------------------------------------------------------------------
# grades from masks (synthetic benchmark)
# --------------------------------------------------------------------------------------------

def grade_from_masks(masks: np.ndarray, *, fovea: tuple[float, float], disc: tuple[float, float],
                     disc_diameter: float, severe_ihe_per_quadrant: int = SEVERE_IHE_PER_QUADRANT) -> int:
    """The DR grade that :func:`fundus_lib.data.grading.dr_grade` gives the lesions of (8, H, W) masks
    (:data:`~fundus_lib.data.manifest.LESIONS` order): one lesion per 8-connected component
    (centroid, equal-area radius), quadrants around ``fovea``; see the module docstring."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[0] != len(LESIONS):
        raise ValueError(f"masks must be ({len(LESIONS)}, H, W) in LESIONS order, got shape {masks.shape}")
    items = []
    for lesion, mask in zip(LESIONS, masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if not n:
            continue
        index = np.arange(1, n + 1)
        areas = ndimage.sum_labels(mask, labelled, index)
        centres = ndimage.center_of_mass(mask, labelled, index)
        items += [(lesion, float(cx), float(cy), float(max(np.sqrt(area / np.pi), 0.5)))
                  for (cy, cx), area in zip(centres, areas)]
    inventory = make_inventory(items, fovea=fovea, disc=disc, disc_diameter=disc_diameter)
    return dr_grade(inventory, severe_ihe_per_quadrant)


# --------------------------------------------------------------------------------------------
# one generated image, and pairs of sources and targets
# --------------------------------------------------------------------------------------------

@dataclass
class Generated:
    """One ELLG image with its provenance (source, target, r, tau, placements, mixed label) and, on
    data with lesion masks, the masks that travelled with the pixels and the grade they give."""

    image: np.ndarray                 # (H, W, 3) float in [0, 1]
    lesion_region: np.ndarray         # (H, W) bool: where Eq. 5 blended
    label: int                        # Eq. 6
    source: str
    target: str
    source_label: int
    target_label: int
    r: float
    tau: float
    placements: list[Placement] = field(default_factory=list)
    masks: np.ndarray | None = None   # (8, H, W) bool: the target's lesions plus the pasted ones
    true_grade: int | None = None     # grade_from_masks(masks), when masks are known

    @property
    def n_patches(self) -> int:
        return sum(not p.dropped for p in self.placements)

    def provenance(self) -> dict[str, object]:
        """One flat row for a provenance table (no pixels)."""
        return {"source": self.source, "target": self.target, "source_label": self.source_label,
                "target_label": self.target_label, "r": self.r, "tau": self.tau, "mixed_label": self.label,
                "true_grade": self.true_grade, "patches": self.n_patches,
                "dropped": sum(p.dropped for p in self.placements),
                "overlapping": sum(p.overlaps for p in self.placements),
                "tries": sum(p.tries for p in self.placements), "lesion_pixels": int(self.lesion_region.sum())}


def generate_one(source: np.ndarray, target: np.ndarray, saliency: np.ndarray, *, source_id: str, target_id: str,
                 source_label: int, target_label: int, rng: np.random.Generator,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS, tau: float | None = None, r: float | None = None,
                 source_fov: np.ndarray | None = None, target_fov: np.ndarray | None = None,
                 source_masks: np.ndarray | None = None, target_masks: np.ndarray | None = None,
                 grading: dict | None = None) -> Generated:
    """Steps 1-4 of the module docstring for one (source, target) pair.

    ``saliency`` is the source's GMSM (H, W). ``tau`` and ``r`` are drawn from :data:`TAU_RANGE`
    and :data:`R_RANGE` unless given. ``target_fov`` also restricts where patches may land. With
    ``source_masks`` and ``target_masks`` ((8, H, W) true lesion masks) the result carries its
    masks, and with ``grading`` (``fovea``, ``disc``, ``disc_diameter`` of the target, optional
    ``severe_ihe_per_quadrant``) the grade they give (:func:`grade_from_masks`).
    """
    src, tgt = _check_image(source, "source"), _check_image(target, "target")
    if src.shape != tgt.shape:
        raise ValueError(f"source and target must have the same shape, got {src.shape} and {tgt.shape}")
    tau = float(rng.uniform(*TAU_RANGE)) if tau is None else _check_range(tau, (0.0, 1.0), "tau")
    r = float(rng.uniform(*R_RANGE)) if r is None else _check_range(r, (0.0, 1.0), "r")
    patches = extract_patches(lesion_mask(saliency, tau))
    placements = place_patches(patches, rng, allowed=target_fov)
    recoloured = reinhard_transfer(src, tgt, source_fov, target_fov)
    lesion_image = np.zeros_like(tgt)
    region = np.zeros(tgt.shape[:2], dtype=bool)
    for patch, where in zip(patches, placements):
        if where.dropped:
            continue
        moved = shift(patch, where.dy, where.dx)
        lesion_image[moved] = shift(recoloured * patch[..., None], where.dy, where.dx)[moved]
        region |= moved
    generated = Generated(blend(tgt, lesion_image, region, r), region,
                          mix_label(source_label, target_label, r, thresholds), source_id, target_id,
                          int(source_label), int(target_label), r, tau, placements)
    if source_masks is not None and target_masks is not None:
        generated.masks = np.asarray(target_masks, dtype=bool) | transfer_masks(patches, placements, source_masks)
        if grading is not None:
            generated.true_grade = grade_from_masks(generated.masks, **grading)
    return generated


def choose_pairs(predicted: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, *,
                 target_grades: Sequence[int] | None = (0,)) -> list[tuple[int, int]]:
    """``n`` (source, target) index pairs among the correctly classified images (``predicted == labels``):
    sources with grade >= 1, targets with a grade in ``target_grades`` (None: any grade), drawn with
    replacement. Empty when either pool is empty (nothing to generate from)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.ndim != 1:
        raise ValueError(f"predicted and labels must be 1-D of the same length, got {predicted.shape} and {labels.shape}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    correct = predicted == labels
    sources = np.flatnonzero(correct & (labels >= 1))
    target_ok = np.ones_like(correct) if target_grades is None else np.isin(labels, list(target_grades))
    targets = np.flatnonzero(correct & target_ok)
    if n == 0 or not sources.size or not targets.size:
        return []
    return list(zip(rng.choice(sources, n).tolist(), rng.choice(targets, n).tolist()))
