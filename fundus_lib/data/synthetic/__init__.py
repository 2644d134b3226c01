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
Table III), :data:`IDRID_PRIOR`. DR 1 with DME > 0 is impossible under the rules (DME needs a
hard exudate, and exudates beside microaneurysms are DR2 evidence); DR 0 with DME (exudates alone)
is possible, but IDRiD has none, so the default prior never draws it.

:data:`GENERATOR_VERSION` changes whenever the same arguments would give different images or
labels (v2: HaEx and CWS became indirect evidence in the DR rule); cached benchmarks carry it in
their folder name, so a stale one is never reused.

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

Modules, one job each: :mod:`.prior` (class prior), :mod:`.domains` (camera domains, capture
settings), :mod:`.anatomy` (eye geometry), :mod:`.lesions` (lesion inventories that hit a target
grade), :mod:`.scenes` (scenes and their labels), :mod:`.rendering` (pixels and masks),
:mod:`.writer` (in memory, on disk, LR/HR pairs). Everything public is importable from here.
"""
from fundus_lib.data.synthetic.anatomy import Geometry
from fundus_lib.data.synthetic.domains import (DOMAINS, OVER_EXPOSURE, QUALITY_THRESHOLDS, UNDER_EXPOSURE, Capture,
                                               Domain, DomainSpec)
from fundus_lib.data.synthetic.lesions import DIFFICULTY_CONTRAST_DROP, DIFFICULTY_SIZE_DROP, LESION_SIZES, MIN_PIXELS
from fundus_lib.data.synthetic.writer import GENERATOR_VERSION
from fundus_lib.data.synthetic.prior import BALANCED_PRIOR, FEASIBLE_CELLS, IDRID_PRIOR, PriorSpec, resolve_prior
# The rendering steps one by one, as notebook 02 walks through them:
from fundus_lib.data.synthetic.rendering import _background as _background
from fundus_lib.data.synthetic.rendering import _capture as _capture
from fundus_lib.data.synthetic.rendering import _draw_lesions as _draw_lesions
from fundus_lib.data.synthetic.rendering import _draw_vessels as _draw_vessels
from fundus_lib.data.synthetic.rendering import _fov_alpha as _fov_alpha
from fundus_lib.data.synthetic.rendering import render
from fundus_lib.data.synthetic.scenes import Scene, image_id, sample_labels, sample_scenes, scene_labels
from fundus_lib.data.synthetic.scenes import _streams as _streams
from fundus_lib.data.synthetic.writer import SyntheticBatch, generate, make_lr, write_dataset

__all__ = ["BALANCED_PRIOR", "Capture", "DIFFICULTY_CONTRAST_DROP", "DIFFICULTY_SIZE_DROP", "DOMAINS", "Domain",
           "DomainSpec", "FEASIBLE_CELLS", "GENERATOR_VERSION", "Geometry", "IDRID_PRIOR", "LESION_SIZES", "MIN_PIXELS", "OVER_EXPOSURE",
           "PriorSpec", "QUALITY_THRESHOLDS", "Scene", "SyntheticBatch", "UNDER_EXPOSURE", "generate", "image_id",
           "make_lr", "render", "resolve_prior", "sample_labels", "sample_scenes", "scene_labels", "write_dataset"]
