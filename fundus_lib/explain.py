"""Saliency maps for any layer of any model, and their evaluation against true lesion masks.

**Maps.** For a layer with activations ``A`` (B, K, h, w) every method forms the raw map
``L = sum_k w_k A^k`` (B, h, w) with per-image channel weights ``w``:

* ``"cam"`` — CAM (Zhou et al., CVPR 2016): ``w_k`` are the weights of the linear layer (``head``)
  that reads the global average of ``A``; defined only for such GAP + linear heads.
* ``"gradcam"`` — Grad-CAM (Selvaraju et al., ICCV 2017): ``w_k = mean_ij dy/dA^k_ij``. On a
  GAP + linear head this is CAM divided by ``h * w``, so both give the same normalised map.
* ``"gradcam++"`` — Grad-CAM++ (Chattopadhay et al., WACV 2018, Eq. 19 with the exponential score
  of their Sec. 3.2): ``w_k = sum_ij relu(g_ij) a_ij`` with ``g = dy/dA^k`` and
  ``a_ij = g_ij^2 / (2 g_ij^2 + sum_ab A^k_ab g_ij^3 + 1e-6)`` (``a = 0`` where ``g = 0``). The
  weights of ELLG's Eq. 1.

``y`` is the *score*: :func:`select_score` picks it from the model's output (a dict: the caller
names the key). A scalar regression output is the score itself, as ELLG Sec. 2.2 does for the o_O
net ("treated the output cell as the result of a specific class ... without softmax layer"); for
class logits the caller names the class (default: each image's predicted class).

**From raw maps to heat maps** (ELLG, Lin et al., IJCAI-W 2020, Sec. 2.2):

* :func:`gate` — Eq. 1 ``relu(L)`` (``t = 0``) or the gate of Eq. 2 ``max(L, t)``, implemented as
  written (see :func:`gate` for its effect after normalisation);
* :func:`upsample` to the image size (bilinear, half-pixel centres) and :func:`normalise` each
  map to [0, 1] by min-max (:func:`heat_map` does gate, resize and normalisation for one layer);
* :func:`fuse` — Eq. 3: the mean of the normalised maps of several layers,
  ``L = (norm(L_low) + norm(L_high)) / 2`` for ELLG's two layers (no normalisation after it:
  ELLG's Eq. 4 normalises again before thresholding).

:func:`saliency` runs the whole chain for any method and layers; :func:`gmsm` is ELLG's gated
multi-layer saliency map (Grad-CAM++, ``t = 1.00``, two layers).

**Same definitions as pytorch-grad-cam** (``grad-cam`` 1.5.5, jacobgil/pytorch-grad-cam at commit
084273b3f30b54ad0c64cf8020a4337d979a66e0; ``base_cam.py``, ``grad_cam.py``,
``grad_cam_plus_plus.py``, ``utils/image.py``): the same Grad-CAM / Grad-CAM++ weights and
epsilon, ReLU of the raw map, per-map min-max with ``1e-7`` and bilinear resizing in the same
order (normalise, resize, normalise: :func:`heat_map`), so ``saliency(model, x, [layer], method=...)``
equals ``GradCAM(model, [layer])(x, targets)`` up to float rounding. With several layers the
package averages maps normalised *before* resizing and normalises the mean; here each layer is
normalised again after resizing so that both layers span [0, 1] as Eq. 3 asks, and the mean is
not renormalised: the two agree wherever the resized maps keep their extremes. Unlike the package,
gradients are taken with ``torch.autograd.grad`` on the recorded activations (parameters' ``.grad``
are left untouched) and the model's train/eval mode is left as it is.

**Call ``model.eval()`` first**: in training mode BatchNorm couples the images of a batch and
dropout randomises the maps. The score is summed over the batch before differentiating, which
gives every image its own gradients only when images do not interact.

**Reuse (DeepMT-DR, issue 12)**: Grad-CAM maps from a grader's four stages feeding a trained
attention link. :func:`gradient_maps` takes any (B,) score (e.g. DeepMT-DR's ``dr_score``) and
the stage activations of a forward pass the model makes anyway (from a :class:`LayerRecorder`
or from a backbone that returns its stages), and returns each stage's raw map at its own
resolution; ``differentiable="activations"`` keeps the maps differentiable through the
activations with the weights as constants (the authors' code), ``"full"`` also through the
weights (second order). ``normalise(gate(m))`` gives the per-stage ReLU'd, min-max maps::

    with LayerRecorder(grader, ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]) as rec:
        outputs = grader(x)
    raw = gradient_maps(dr_score(outputs["dr"]), rec.activations, "gradcam", differentiable="activations")
    stage_maps = [normalise(gate(m)) for m in raw.values()]

**Scoring maps against true masks** (the paper could only show maps by eye): per image, with an
optional field-of-view mask restricting every metric — :func:`pointing_game` (Zhang et al., ECCV
2016), :func:`saliency_auc` (scikit-learn's ``roc_auc_score``), :func:`saliency_iou` at a threshold
and :func:`energy_inside` (the share of the map's mass on the lesions, Wang et al.'s
energy-based pointing game, CVPR-W 2020); :func:`saliency_scores` returns all four as a table.
Images without lesion pixels give NaN: there is nothing to point at. A uniformly random map scores
the lesion area fraction on the pointing game and the energy, 0.5 AUC.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from fundus_lib.metrics import ArrayLike, as_numpy

Method = Literal["cam", "gradcam", "gradcam++"]
METHODS: tuple[str, ...] = ("cam", "gradcam", "gradcam++")
GradientMethod = Literal["gradcam", "gradcam++"]
Differentiable = Literal["none", "activations", "full"]
DIFFERENTIABLE: tuple[str, ...] = ("none", "activations", "full")
LayerRef = str | nn.Module
Target = int | Sequence[int] | Tensor | None

#: The gate threshold of ELLG's Eq. 2 (Sec. 3.1: "The hyper parameter t in Eq. (2) is set to 1.00").
GMSM_T = 1.0
#: Epsilon of the min-max normalisation (pytorch-grad-cam's ``scale_cam_image``).
NORM_EPS = 1e-7
#: Epsilon of the Grad-CAM++ denominator (pytorch-grad-cam's ``GradCAMPlusPlus``).
GRADCAM_PP_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# recording layers and choosing the score
# --------------------------------------------------------------------------------------------

def resolve_layers(model: nn.Module, layers: LayerRef | Iterable[LayerRef]) -> dict[str, nn.Module]:
    """``{dotted name: module}`` for layers given as dotted names (``"features.block2"``) or modules of ``model``."""
    refs = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    names = {id(module): name for name, module in model.named_modules()}
    resolved: dict[str, nn.Module] = {}
    for ref in refs:
        if isinstance(ref, str):
            try:
                module = model.get_submodule(ref)
            except AttributeError:
                raise ValueError(f"layers: the model has no submodule {ref!r}") from None
            name = ref
        elif isinstance(ref, nn.Module) and id(ref) in names:
            name, module = names[id(ref)], ref
        else:
            raise ValueError(f"layers must be dotted names or submodules of the model, got {type(ref).__name__}")
        if name in resolved:
            raise ValueError(f"layers: {name!r} is named twice")
        resolved[name] = module
    if not resolved:
        raise ValueError("layers must name at least one layer")
    return resolved


class LayerRecorder:
    """Context manager recording the outputs of named layers with forward hooks.

    ``activations`` maps each layer name to its output in the most recent forward pass (graph
    kept, so gradients can be taken). The hooks are removed on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module, layers: LayerRef | Iterable[LayerRef]) -> None:
        self.layers = resolve_layers(model, layers)
        self.activations: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            if not isinstance(output, Tensor) or output.ndim != 4:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(f"layers: {name!r} must output a (B, K, h, w) feature map, got {shape}")
            self.activations[name] = output
        return record

    def __enter__(self) -> "LayerRecorder":
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _output_tensor(outputs: Tensor | Mapping[str, Tensor], output: str | None) -> Tensor:
    """The named model output as (B, C) scores; a (B,) regression output becomes (B, 1)."""
    if isinstance(outputs, Mapping):
        if output is None:
            if len(outputs) != 1:
                raise ValueError(f"output must name one of the model's outputs {sorted(outputs)}")
            output = next(iter(outputs))
        if output not in outputs:
            raise ValueError(f"output {output!r} is not among the model's outputs {sorted(outputs)}")
        outputs = outputs[output]
    if not isinstance(outputs, Tensor) or outputs.ndim not in (1, 2):
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"output must be a (B,) score or (B, C) logits, got {shape}")
    return outputs[:, None] if outputs.ndim == 1 else outputs


def _target_classes(logits: Tensor, target: Target) -> Tensor:
    """(B,) class indices: the predicted class when ``target`` is None, else ``target`` (one or one per image)."""
    n, c = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    classes = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if classes.numel() == 1:
        classes = classes.expand(n)
    if classes.numel() != n or classes.min() < 0 or classes.max() >= c:
        raise ValueError(f"target must be a class in [0, {c}) or one per image ({n}), got {target!r}")
    return classes


def select_score(outputs: Tensor | Mapping[str, Tensor], output: str | None = None, target: Target = None) -> Tensor:
    """The (B,) score a saliency map explains.

    ``outputs`` is the model's output, a tensor or a dict from which ``output`` names the tensor
    (optional when the dict has one entry). A (B,) or (B, 1) regression output is the score
    (ELLG Sec. 2.2); for (B, C) logits the score is the logit of class ``target`` (an int, or one
    per image; None: each image's predicted class, as pytorch-grad-cam does).
    """
    logits = _output_tensor(outputs, output)
    return logits.gather(1, _target_classes(logits, target)[:, None])[:, 0]


# --------------------------------------------------------------------------------------------
# raw maps  L = sum_k w_k A^k
# --------------------------------------------------------------------------------------------

def channel_weights(activations: Tensor, gradients: Tensor, method: GradientMethod) -> Tensor:
    """(B, K) Grad-CAM or Grad-CAM++ weights from (B, K, h, w) activations and the score's gradients."""
    if method == "gradcam":
        return gradients.mean(dim=(2, 3))
    if method == "gradcam++":
        g2 = gradients ** 2
        g3 = g2 * gradients
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3 + GRADCAM_PP_EPS)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (alpha * gradients.clamp_min(0)).sum(dim=(2, 3))
    raise ValueError(f"method must be 'gradcam' or 'gradcam++' for gradient weights, got {method!r}")


def weighted_sum(activations: Tensor, weights: Tensor) -> Tensor:
    """The raw map ``sum_k w_k A^k``: (B, K, h, w) activations and (B, K) weights -> (B, h, w)."""
    return torch.einsum("bk,bkhw->bhw", weights, activations)


def _check_differentiable(differentiable: str) -> None:
    if differentiable not in DIFFERENTIABLE:
        raise ValueError(f"differentiable must be one of {DIFFERENTIABLE}, got {differentiable!r}")


def _combine(activations: Tensor, weights: Tensor, differentiable: Differentiable) -> Tensor:
    """:func:`weighted_sum`, detached (``"none"``), with constant weights (``"activations"``) or as is (``"full"``)."""
    if differentiable == "none":
        activations = activations.detach()
    if differentiable != "full":
        weights = weights.detach()
    return weighted_sum(activations, weights)


def gradient_maps(score: Tensor, activations: Mapping[str, Tensor], method: GradientMethod = "gradcam++",
                  differentiable: Differentiable = "none") -> dict[str, Tensor]:
    """Raw Grad-CAM / Grad-CAM++ maps (B, h, w) of ``score`` (B,) for each layer's (B, K, h, w) activations.

    ``differentiable``: ``"none"`` detaches the maps; ``"activations"`` keeps them differentiable
    through the activations, the weights being constants; ``"full"`` also differentiates the
    weights (a second-order graph). Raises a ValueError naming a layer the score does not depend on.
    """
    _check_differentiable(differentiable)
    names = list(activations)
    gradients = torch.autograd.grad(score.sum(), [activations[n] for n in names], retain_graph=True,
                                    create_graph=differentiable == "full", allow_unused=True)
    maps: dict[str, Tensor] = {}
    for name, gradient in zip(names, gradients):
        if gradient is None:
            raise ValueError(f"layers: the score does not depend on {name!r}")
        acts = activations[name]
        weights = channel_weights(acts if differentiable == "full" else acts.detach(), gradient, method)
        maps[name] = _combine(acts, weights, differentiable)
    return maps


def _cam_weights(head: nn.Module, classes: Tensor, channels: int, name: str) -> Tensor:
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight.shape[1] != channels:
        raise ValueError(f"head must be the nn.Linear reading the global average of {name!r} "
                         f"({channels} channels), got {head!r}")
    if classes.max() >= weight.shape[0]:
        raise ValueError(f"head has {weight.shape[0]} outputs but the target class is {int(classes.max())}")
    return weight[classes]


def layer_maps(model: nn.Module, images: Tensor, layers: LayerRef | Iterable[LayerRef], *,
               method: Method = "gradcam++", output: str | None = None, target: Target = None,
               head: str | nn.Module | None = None, differentiable: Differentiable = "none") -> dict[str, Tensor]:
    """Raw maps ``sum_k w_k A^k`` (B, h, w) of each layer at its own resolution, before any ReLU / gate.

    Args:
        model: any module; its output is a tensor or a dict of tensors (``output`` names the key).
        images: (B, C, H, W) input.
        layers: dotted names or modules whose (B, K, h, w) outputs are explained.
        method: ``"cam"``, ``"gradcam"`` or ``"gradcam++"``.
        target: class for (B, C) logits (see :func:`select_score`); None for a regression score.
        head: for ``method="cam"`` only, the ``nn.Linear`` (or its dotted name) fed by the global
            average of the layer.
        differentiable: ``"none"``, ``"activations"`` or ``"full"``, see :func:`gradient_maps`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (method == "cam") != (head is not None):
        raise ValueError("head is required by method='cam' and used by no other method")
    _check_differentiable(differentiable)
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    # An input that requires grad gives gradients even when every parameter is frozen.
    x = images if images.requires_grad else images.detach().requires_grad_()
    with torch.enable_grad(), LayerRecorder(model, layers) as recorder:
        logits = _output_tensor(model(x), output)
    missing = [name for name in recorder.layers if name not in recorder.activations]
    if missing:
        raise ValueError(f"layers: {missing} did not run in the model's forward pass")
    classes = _target_classes(logits, target)
    if method != "cam":
        score = logits.gather(1, classes[:, None])[:, 0]
        return gradient_maps(score, recorder.activations, method, differentiable)
    module = model.get_submodule(head) if isinstance(head, str) else head
    return {name: _combine(acts, _cam_weights(module, classes, acts.shape[1], name), differentiable)
            for name, acts in recorder.activations.items()}


# --------------------------------------------------------------------------------------------
# gate, resize, normalise, fuse  (ELLG Eqs. 1-3)
# --------------------------------------------------------------------------------------------

def gate(maps: Tensor, t: float = 0.0) -> Tensor:
    """ELLG's gate ``max(L, t)`` (Eq. 2, implemented as written); ``t = 0`` is the ReLU of Eq. 1.

    Effect after min-max normalisation: every pixel at or below ``t`` becomes 0 and the rest is
    rescaled to ``(L - t) / (max L - t)`` (when some pixel is at or below ``t``). A map that stays
    below ``t`` everywhere — the slight fluctuations of a normal image, the optic disc of Fig. 2 —
    becomes all zero instead of being magnified to full range as with ReLU; a map whose minimum
    exceeds ``t`` is unchanged. ``t`` is in the units of the raw map, which depend on the model's
    output scale, the layer and the method: ELLG's ``t = 1.00`` (:data:`GMSM_T`) was set for its
    o_O net; look at the raw maps' range before choosing ``t`` for another model.
    """
    if not np.isfinite(t):
        raise ValueError(f"t must be a finite number, got {t!r}")
    return maps.clamp_min(t)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (B, h, w) maps to ``size`` (H, W), half-pixel centres, no antialiasing (= ``cv2.resize``)."""
    if len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size!r}")
    return F.interpolate(maps[:, None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[:, 0]


def normalise(maps: Tensor) -> Tensor:
    """Per-map min-max scaling of (..., h, w) maps to [0, 1]: ``(L - min) / (max - min + 1e-7)``.

    A constant map becomes 0."""
    shifted = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return shifted / (shifted.amax(dim=(-2, -1), keepdim=True) + NORM_EPS)


def heat_map(raw: Tensor, size: Sequence[int], t: float = 0.0) -> Tensor:
    """One layer's (B, h, w) raw map as a (B, H, W) heat map in [0, 1]: gate, resize, normalise.

    Normalised before resizing too, as pytorch-grad-cam does: a raw map whose range is close to
    the normalisation's 1e-7 (an untrained net, small regression gradients) would otherwise not
    reach 1. Min-max normalisation commutes with the (affine-equivariant) bilinear resize, so this
    is ``normalise(upsample(gate(raw, t)))`` for any map of a reasonable range.
    """
    return normalise(upsample(normalise(gate(raw, t)), size))


def fuse(maps: Iterable[Tensor], size: Sequence[int], t: float = 0.0) -> Tensor:
    """ELLG's Eq. 3 for any number of layers: the mean of the layers' :func:`heat_map` -> (B, H, W)."""
    heat = [heat_map(m, size, t) for m in maps]
    if not heat:
        raise ValueError("maps must hold at least one raw map")
    return torch.stack(heat).mean(dim=0)


def saliency(model: nn.Module, images: Tensor, layers: LayerRef | Iterable[LayerRef], *,
             method: Method = "gradcam++", t: float = 0.0, output: str | None = None, target: Target = None,
             head: str | nn.Module | None = None) -> Tensor:
    """(B, H, W) heat maps in [0, 1] at the input size: :func:`layer_maps` -> :func:`fuse` (gate ``t``).

    One layer with ``t = 0``: CAM / Grad-CAM / Grad-CAM++ as pytorch-grad-cam computes them.
    """
    raw = layer_maps(model, images, layers, method=method, output=output, target=target, head=head)
    return fuse(raw.values(), images.shape[-2:], t)


def gmsm(model: nn.Module, images: Tensor, low_layer: LayerRef, high_layer: LayerRef, *, t: float = GMSM_T,
         output: str | None = None, target: Target = None) -> Tensor:
    """ELLG's gated multi-layer saliency map (Sec. 2.2, Eqs. 1-3): Grad-CAM++ weights, gate ``t``, a
    high-resolution (low) and a deep (high) layer fused by Eq. 3. For the o_O net the paper's blocks
    are ``features.block2`` (27 x 27), ``features.block3`` (13 x 13) and ``features.block4`` (6 x 6)."""
    return saliency(model, images, [low_layer, high_layer], method="gradcam++", t=t, output=output, target=target)


# --------------------------------------------------------------------------------------------
# saliency against true lesion masks
# --------------------------------------------------------------------------------------------

def _metric_inputs(maps: ArrayLike, masks: ArrayLike,
                   fov: ArrayLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, H, W) float maps, bool masks restricted to the FOV, bool FOV (all True when not given)."""
    m = as_numpy(maps, "maps").astype(np.float64)
    if m.ndim != 3 or m.size == 0:
        raise ValueError(f"maps must be (N, H, W), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("maps contain NaN or infinite values")
    arrays = {}
    for name, value in (("masks", masks), ("fov", fov)):
        a = np.ones_like(m, dtype=bool) if value is None else as_numpy(value, name)
        if a.shape != m.shape:
            raise ValueError(f"{name} must have the maps' shape {m.shape}, got {a.shape}")
        if not np.all((a == 0) | (a == 1)):
            raise ValueError(f"{name} must be binary (0/1 or bool)")
        arrays[name] = a.astype(bool)
    return m, arrays["masks"] & arrays["fov"], arrays["fov"]


def _undefined_where_no_lesion(values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.where(masks.any(axis=(1, 2)), values, np.nan)


def pointing_game(maps: ArrayLike, masks: ArrayLike, fov: ArrayLike | None = None,
                  tolerance: float = 0.0) -> np.ndarray:
    """Per image 1.0 (hit) or 0.0 (miss): does the map's maximum point lie on a lesion?

    Pointing game of Zhang et al. (ECCV 2016): a hit when the maximum (inside the FOV; the first
    in raster order on ties) lies within ``tolerance`` pixels (Euclidean; they used 15) of a mask
    pixel. A map that is constant inside the FOV points nowhere: a miss. NaN without lesion pixels.
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    m, lesions, inside = _metric_inputs(maps, masks, fov)
    n, h, w = m.shape
    masked = np.where(inside, m, -np.inf).reshape(n, -1)
    peak = masked.argmax(axis=1)
    py, px = np.divmod(peak, w)
    yy, xx = np.mgrid[:h, :w]
    near = (yy[None] - py[:, None, None]) ** 2 + (xx[None] - px[:, None, None]) ** 2 <= tolerance ** 2
    lowest = np.where(inside, m, np.inf).reshape(n, -1).min(axis=1)
    hit = (near & lesions).any(axis=(1, 2)) & (masked.max(axis=1) > lowest)
    return _undefined_where_no_lesion(hit.astype(np.float64), lesions)


def saliency_auc(maps: ArrayLike, masks: ArrayLike, fov: ArrayLike | None = None) -> np.ndarray:
    """Per image ROC AUC of the map's values as a lesion-pixel detector (scikit-learn ``roc_auc_score``
    over the FOV pixels); NaN when the FOV has no lesion pixel or only lesion pixels."""
    m, lesions, inside = _metric_inputs(maps, masks, fov)
    aucs = np.full(m.shape[0], np.nan)
    for i in range(m.shape[0]):
        truth = lesions[i][inside[i]]
        if 0 < truth.sum() < truth.size:
            aucs[i] = roc_auc_score(truth, m[i][inside[i]])
    return aucs


def saliency_iou(maps: ArrayLike, masks: ArrayLike, fov: ArrayLike | None = None, threshold: float = 0.5) -> np.ndarray:
    """Per image intersection over union of ``map >= threshold`` and the lesions, inside the FOV.

    NaN without lesions."""
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    m, lesions, inside = _metric_inputs(maps, masks, fov)
    predicted = (m >= threshold) & inside
    intersection = (predicted & lesions).sum(axis=(1, 2))
    union = (predicted | lesions).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return _undefined_where_no_lesion(intersection / union, lesions)


def energy_inside(maps: ArrayLike, masks: ArrayLike, fov: ArrayLike | None = None) -> np.ndarray:
    """Per image share of the map's mass inside the FOV that lies on the lesions, in [0, 1].

    Maps must be non-negative (heat maps); a map with no mass scores 0; NaN without lesions.
    """
    m, lesions, inside = _metric_inputs(maps, masks, fov)
    if np.any(m < 0):
        raise ValueError("maps must be non-negative for the energy share (use the gated, normalised heat maps)")
    total = np.where(inside, m, 0.0).sum(axis=(1, 2))
    on_lesions = np.where(lesions, m, 0.0).sum(axis=(1, 2))
    share = np.divide(on_lesions, total, out=np.zeros_like(total), where=total > 0)
    return _undefined_where_no_lesion(share, lesions)


def saliency_scores(maps: ArrayLike, masks: ArrayLike, fov: ArrayLike | None = None, *,
                    threshold: float = 0.5, tolerance: float = 0.0) -> pd.DataFrame:
    """All four scores per image: columns ``pointing_game``, ``auc``, ``iou``, ``energy`` (NaN rows: no lesion)."""
    return pd.DataFrame({
        "pointing_game": pointing_game(maps, masks, fov, tolerance),
        "auc": saliency_auc(maps, masks, fov),
        "iou": saliency_iou(maps, masks, fov, threshold),
        "energy": energy_inside(maps, masks, fov),
    })
