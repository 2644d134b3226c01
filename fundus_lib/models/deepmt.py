"""DeepMT-DR: super-resolution -> lesion segmentation -> DR grading, learned as one hierarchy (Wang et al., AAAI 2021).

Sources: the spec ``shared/spec/deepmt_dr.md`` (read from the authors' code, since the paper's text is
not in the seed) and the authors' released code. Where that code is broken or self-contradictory the
choice made here is stated at the place it matters ("authors' code: ..."). Where the spec and the
paper's README disagree (LR = HR / 4 in the README, / 8 in the authors' scripts), the paper wins.

The hierarchy (spec, "Networks"), with the output keys of each level (r = SR scale):

- low, super-resolution: :class:`SRNet` -> ``sr`` (B, 3, rh, rw) in [0, 1];
- mid, lesion segmentation: :class:`MultiScaleUNet` -> ``seg_logits`` (B, 5, rh, rw) and
  ``lesions`` (B, 4, rh, rw), the lesion probabilities;
- high, grading: :class:`SPPGrader` (ResNet-18 on SR RGB + the 4 lesion maps) -> ``dr`` (B, 5) logits;
- attention link: :func:`gradcam_stage_maps` of the grader's four stages, fused coarse to fine
  by :class:`AttentionFusion` -> ``attention`` (B, 1, rh, rw), the "pathological map".

Segmentation channels are :data:`SEG_CLASSES` = background, MA, HE (haemorrhage), EX (hard exudate),
SE (soft exudate), each a sigmoid (multi-label, as the authors train it: lesions may overlap);
``lesions`` are the four lesion probabilities. Authors' code puts background LAST; here it is first.

:class:`DeepMT` composes the three networks; :class:`SegmentGrade` is the part above SR, so the
same weights also run on HR images (the losses' HR reference pass, and stage 2 on HR as in the
authors' code). Link ablations are switches (``upsampler``, ``lesion_input``, ``attention``,
``feedback``); :func:`configure_stage` sets what each training stage trains, and
:class:`Stage1Loss`, :class:`Stage2Loss`, :class:`Stage3Loss` are the three stages' objectives
(spec, "Losses and stages"). :func:`parameter_counts` and :func:`layer_table` describe a model.
"""
from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from fundus_lib.data.manifest import LESIONS as PROJECT_LESIONS
from fundus_lib.explain import gradient_maps
from fundus_lib.losses import FocalLoss, soft_dice_loss, total_variation_loss
from fundus_lib.models.backbones import build_backbone

SEG_CLASSES: tuple[str, ...] = ("background", "MA", "HE", "EX", "SE")
LESIONS: tuple[str, ...] = SEG_CLASSES[1:]
#: DeepMT-DR's four lesions from the project's eight (:data:`fundus_lib.data.manifest.LESIONS`), the
#: first source of each group being the slot where real datasets keep that annotation (IDRiD and DDR
#: put their MA / HE / EX / SE masks in MA / iHE / HaEx / CWS, see ``fundus_lib.data.sources``). HE
#: is every haemorrhage: IDRiD's and DDR's haemorrhage masks outline all haemorrhages they see, with no
#: separate preretinal or vitreous class, so the synthetic benchmark's iHE, vHE and pHE are pooled.
#: EX = hard exudates (HaEx), SE = soft exudates = cotton-wool spots (CWS). Neovascularisation and
#: fibrous proliferation are not among the paper's lesions (DDR and IDRiD do not outline them) and
#: count as background, as they do in those datasets.
LESION_SOURCES: dict[str, tuple[str, ...]] = {"MA": ("MA",), "HE": ("iHE", "vHE", "pHE"), "EX": ("HaEx",),
                                              "SE": ("CWS",)}
GRADER_STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")  # fine -> coarse, strides 4 .. 32
UPSAMPLERS: tuple[str, ...] = ("sr", "bicubic", "identity")
PARTS: tuple[str, ...] = ("upsampler", "segmenter", "grader", "fusion")
#: Parts each training stage updates (spec "Losses and stages"; authors' train_stage1_1 / 1_2 / 2.py:
#: stage 3 leaves the segmenter and the fusion module as stage 2 left them).
STAGE_TRAINABLE: dict[int, tuple[str, ...]] = {1: ("upsampler", "segmenter"), 2: ("grader", "fusion"),
                                               3: ("upsampler", "grader")}
#: Deep-supervision head weights, coarse (bottleneck) to fine, from the authors' Seg_Net.forward
#: (eta1..eta4 = 0.4, 0.2, 0.2, 0.2; finest head 1). Their code adds only four of the five heads
#: (it drops the finest, a bug); all five are fused here, with these values as the initial weights.
HEAD_WEIGHTS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2, 1.0)
#: Weighted-CE class weights of the authors' code (about inverse class frequency), grades 0..4.
DDR_CLASS_WEIGHTS: tuple[float, ...] = (1.0, 10.0, 1.44, 25.0, 8.0)
IDRID_CLASS_WEIGHTS: tuple[float, ...] = (1.0, 6.7, 1.0, 1.81, 2.73)


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def upsampling_stages(scale: int) -> int:
    """Number of x2 transposed-convolution stages for ``scale`` (log2 of it); ``scale`` must be 2, 4, 8, ..."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2 or scale & (scale - 1):
        raise ValueError(f"scale must be a power of 2 >= 2 (the SR net up-samples by x2 stages), got {scale!r}")
    return int(math.log2(scale))


def deepmt_masks(masks: Tensor, mask_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The 4 DeepMT-DR lesion masks (B, 4, H, W) and their validity (B, 4) from the project's 8.

    ``masks`` (B, 8, H, W) and ``mask_valid`` (B, 8) in :data:`fundus_lib.data.manifest.LESIONS`
    order (what :class:`~fundus_lib.data.datasets.FundusDataset` yields). Each lesion of :data:`LESIONS`
    is the union of its :data:`LESION_SOURCES`; it is valid where its first source is annotated
    (a source not annotated contributes an empty mask: real datasets keep HE in the iHE slot).
    """
    if masks.ndim != 4 or masks.shape[1] != len(PROJECT_LESIONS):
        raise ValueError(f"masks must be (B, {len(PROJECT_LESIONS)}, H, W) in the order {PROJECT_LESIONS}, "
                         f"got shape {tuple(masks.shape)}")
    if mask_valid is None:
        mask_valid = masks.new_ones(masks.shape[:2])
    if tuple(mask_valid.shape) != tuple(masks.shape[:2]):
        raise ValueError(f"mask_valid must have shape {tuple(masks.shape[:2])}, got {tuple(mask_valid.shape)}")
    groups = [[PROJECT_LESIONS.index(name) for name in LESION_SOURCES[lesion]] for lesion in LESIONS]
    lesion_masks = torch.stack([masks[:, group].amax(dim=1) for group in groups], dim=1)
    valid = torch.stack([mask_valid[:, group[0]] for group in groups], dim=1)
    return lesion_masks, valid


# --------------------------------------------------------------------------- low level: super-resolution

class ResidualBlock(nn.Module):
    """conv3x3 - LeakyReLU - conv3x3 + identity skip (authors' ``res_``: its BatchNorms are defined but unused)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


@torch.no_grad()
def bilinear_upsampling_(conv: nn.ConvTranspose2d) -> nn.ConvTranspose2d:
    """Set a square transposed convolution (``in_channels == out_channels``) to channel-wise bilinear
    up-sampling by its stride, in place: weight ``w[c, c] = outer(f, f)`` with the triangle filter
    ``f(i) = 1 - |i - centre| / factor``, other channel pairs 0, bias 0 (FCN's ``get_upsampling_weight``).
    For kernel 3 and stride 2 the filter is (1/2, 1, 1/2): each new pixel is the mean of its two neighbours."""
    k = conv.kernel_size[0]
    if conv.in_channels != conv.out_channels or conv.groups != 1 or conv.kernel_size[1] != k:
        raise ValueError(f"bilinear_upsampling_ needs a square kernel and in_channels == out_channels, got {conv}")
    factor = (k + 1) // 2
    centre = factor - 1 if k % 2 else factor - 0.5
    f = 1 - (torch.arange(k, dtype=conv.weight.dtype) - centre).abs() / factor
    conv.weight.zero_()
    conv.weight[range(conv.in_channels), range(conv.in_channels)] = torch.outer(f, f)
    if conv.bias is not None:
        conv.bias.zero_()
    return conv


class SRNet(nn.Module):
    """SR net (spec "Networks", SR row): LR (B, 3, h, w) -> ``{"sr": (B, 3, scale*h, scale*w)}`` in [0, 1].

    Conv3x3 3->``width`` + LeakyReLU, ``n_blocks`` residual blocks, log2(``scale``) x
    [ConvTranspose 3x3, stride 2 (padding 1, output padding 1: exactly x2) + LeakyReLU],
    Conv3x3 ``width``->3 and ``(tanh + 1) / 2``. Paper setting: scale 4 (the authors' scripts: 8).

    The transposed convolutions start as channel-wise bilinear up-sampling
    (:func:`bilinear_upsampling_`, the FCN convention of Long et al. 2015); neither the paper nor the
    authors' code fixes their initialisation (the code keeps PyTorch's random default). It is a
    convention, not a measured gain: on the synthetic benchmark (LR 16 -> HR 64, 30 warm-up epochs)
    both starts reached about 29.1 dB test PSNR; it makes the untrained up-sampling stages interpolate.
    """

    def __init__(self, scale: int = 4, width: int = 32, n_blocks: int = 5) -> None:
        super().__init__()
        n_up = upsampling_stages(scale)
        _check_positive_int(width, "width")
        _check_positive_int(n_blocks, "n_blocks")
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(n_blocks)))
        self.upsample = nn.Sequential(*(nn.Sequential(nn.ConvTranspose2d(width, width, 3, stride=2, padding=1,
                                                                         output_padding=1), nn.LeakyReLU())
                                        for _ in range(n_up)))
        self.tail = nn.Conv2d(width, 3, 3, padding=1)
        for stage in self.upsample:
            bilinear_upsampling_(stage[0])

    def forward(self, lr: Tensor) -> dict[str, Tensor]:
        x = self.upsample(self.blocks(self.head(lr)))
        return {"sr": (torch.tanh(self.tail(x)) + 1) / 2}


class BicubicUpsampler(nn.Module):
    """Parameter-free baseline: bicubic up-sampling by ``scale``, clamped to [0, 1] (spec "Metrics": vs bicubic)."""

    def __init__(self, scale: int = 4) -> None:
        super().__init__()
        _check_positive_int(scale, "scale")
        self.scale = scale

    def forward(self, lr: Tensor) -> dict[str, Tensor]:
        up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return {"sr": up.clamp(0.0, 1.0)}


class IdentityUpsampler(nn.Module):
    """No up-sampling: the hierarchy runs on its input as given (grading on LR directly, or on HR: the upper bound)."""

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return {"sr": image}


# --------------------------------------------------------------------------- mid level: lesion segmentation

class MultiScaleConv(nn.Module):
    """Parallel 3x3 and 5x5 convolutions (``out_channels / 2`` each), concatenated, then BN-ReLU.

    The convolutions have no bias: BatchNorm follows (authors' code keeps a redundant bias).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels must be even (half go to each kernel size), got {out_channels}")
        self.conv3 = nn.Conv2d(in_channels, out_channels // 2, 3, padding=1, bias=False)
        self.conv5 = nn.Conv2d(in_channels, out_channels // 2, 5, padding=2, bias=False)
        self.norm = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.cat([self.conv3(x), self.conv5(x)], dim=1))


def multiscale_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """A U-Net block (spec, segmentation row): :class:`MultiScaleConv`, then Conv3x3-BN-ReLU."""
    return nn.Sequential(MultiScaleConv(in_channels, out_channels), Conv2dNormActivation(out_channels, out_channels, 3))


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Decoder up-sampling (authors' ``up_conv``): nearest x2, then :class:`MultiScaleConv`."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), MultiScaleConv(in_channels, out_channels))


class MultiScaleUNet(nn.Module):
    """Lesion segmentation U-Net (spec "Networks", segmentation row): ``{"seg_logits": (B, n_classes, H, W)}``.

    Encoder widths ``base_width * (1, 2, 4, 8, 16)`` (64-1024 by default), 2x2 max pooling between
    levels, each level a :func:`multiscale_block`; the decoder up-samples with :func:`up_block`,
    concatenates the skip map and applies a :func:`multiscale_block`. Deep supervision: a 1x1 head on
    the bottleneck and on every decoder level gives ``n_classes`` logits; the five heads, bilinearly
    resized to the input size (authors: nearest), are summed with learned weights initialised to
    :data:`HEAD_WEIGHTS`. H and W must be multiples of 16 (four poolings).
    """

    def __init__(self, in_channels: int = 3, n_classes: int = len(SEG_CLASSES), base_width: int = 64,
                 head_weights: Sequence[float] = HEAD_WEIGHTS) -> None:
        super().__init__()
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(n_classes, "n_classes")
        _check_positive_int(base_width, "base_width")
        widths = [base_width * 2 ** level for level in range(5)]
        if len(head_weights) != len(widths):
            raise ValueError(f"head_weights needs one weight per head ({len(widths)}, coarse to fine), "
                             f"got {tuple(head_weights)}")
        self.widths = tuple(widths)
        self.encoder = nn.ModuleList([multiscale_block(in_channels, widths[0])] +
                                     [multiscale_block(widths[k - 1], widths[k]) for k in range(1, 5)])
        # decoder levels, coarse to fine: up-sample widths[k] -> widths[k-1], merge with the skip of width widths[k-1]
        self.ups = nn.ModuleList(up_block(widths[k], widths[k - 1]) for k in range(4, 0, -1))
        self.decoder = nn.ModuleList(multiscale_block(2 * widths[k - 1], widths[k - 1]) for k in range(4, 0, -1))
        self.heads = nn.ModuleList(nn.Conv2d(width, n_classes, 1) for width in reversed(widths))
        self.head_weights = nn.Parameter(torch.tensor([float(w) for w in head_weights]))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"MultiScaleUNet needs H and W divisible by 16 (four 2x2 poolings), "
                             f"got {tuple(x.shape[-2:])}")
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        levels = [skips.pop()]  # bottleneck first, then each decoder level: coarse to fine, as the heads
        for up, block in zip(self.ups, self.decoder):
            levels.append(block(torch.cat([skips.pop(), up(levels[-1])], dim=1)))
        size = levels[-1].shape[-2:]
        logits = sum(weight * F.interpolate(head(level), size=size, mode="bilinear", align_corners=False)
                     for weight, head, level in zip(self.head_weights, self.heads, levels))
        return {"seg_logits": logits}


# --------------------------------------------------------------------------- high level: grading

def spatial_pyramid_pool(x: Tensor, levels: Sequence[int]) -> Tensor:
    """(B, C, h, w) -> (B, C * sum(l^2)): max pooling to an l x l grid per level, flattened and concatenated."""
    return torch.cat([F.adaptive_max_pool2d(x, level).flatten(1) for level in levels], dim=1)


class SPPGrader(nn.Module):
    """Grading net (spec "Networks", grading row): ``{"dr": (B, n_grades)}`` logits.

    torchvision ResNet-18 whose first convolution takes ``in_channels`` (7: SR RGB + 4 lesion
    probabilities; the RGB ImageNet filters are tiled when ``weights="imagenet"``, where the
    authors start that layer from scratch), spatial pyramid pooling of ``layer4`` over ``levels``
    (512 x 21 = 10752 features), Linear -> ``hidden``, Dropout, Linear -> ``n_grades``. As in the
    authors' ``dense_spp`` there is no non-linearity between the two linear layers.
    :meth:`features` exposes the four stages the attention link reads.
    """

    def __init__(self, n_grades: int = 5, in_channels: int = 3 + len(LESIONS), levels: Sequence[int] = (1, 2, 4),
                 hidden: int = 512, dropout: float = 0.5, weights: None | str = None) -> None:
        super().__init__()
        _check_positive_int(n_grades, "n_grades")
        _check_positive_int(hidden, "hidden")
        if not levels or any(isinstance(l, bool) or not isinstance(l, int) or l < 1 for l in levels):
            raise ValueError(f"levels must be positive ints, got {tuple(levels)!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.backbone = build_backbone("resnet18", weights=weights, in_channels=in_channels)
        self.levels = tuple(levels)
        n_features = self.backbone.out_channels * sum(level * level for level in self.levels)
        self.head = nn.Sequential(nn.Linear(n_features, hidden), nn.Dropout(dropout), nn.Linear(hidden, n_grades))

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Activations of :data:`GRADER_STAGES` (fine to coarse)."""
        return self.backbone(x, stages=GRADER_STAGES)

    def classify(self, last_stage: Tensor) -> Tensor:
        """DR-grade logits from the ``layer4`` activations."""
        return self.head(spatial_pyramid_pool(last_stage, self.levels))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"dr": self.classify(self.backbone(x)[GRADER_STAGES[-1]])}


# --------------------------------------------------------------------------- attention link

def dr_score(logits: Tensor) -> Tensor:
    """The score whose gradients weight the Grad-CAM maps, one per image (authors' ``FeatureExtractor``).

    When grade 0 (no DR) is predicted, the grade-0 logit; otherwise the sum of the logits of all DR
    grades 1..K-1 (evidence for "any DR", rather than only for the predicted grade).
    """
    no_dr = logits.argmax(dim=1) == 0
    return torch.where(no_dr, logits[:, 0], logits[:, 1:].sum(dim=1))


def gradcam_stage_maps(activations: Sequence[Tensor], score: Tensor) -> list[Tensor]:
    """Grad-CAM map of each activation (B, C, h, w) for ``score`` (B,): a list of (B, 1, h, w) in [0, 1].

    Grad-CAM (Selvaraju et al. 2017): ``alpha_k = mean_ij d score / d A_k(i, j)``,
    ``map = ReLU(sum_k alpha_k A_k)``, then min-max normalised per image (left unscaled when its
    maximum is 0), as in the authors' code. The raw maps come from the project's one Grad-CAM,
    :func:`fundus_lib.explain.gradient_maps` with ``differentiable="activations"``: gradients from
    :func:`torch.autograd.grad` (the parameters' ``.grad`` are untouched), the weights ``alpha`` are
    constants (no second-order graph) and the maps stay differentiable through the activations,
    which is how the attention terms of the losses reach the grader and, through its input, the SR
    net. The normalisation is the authors' (no epsilon: a map is exactly 1 at its peak), not
    :func:`fundus_lib.explain.normalise`. In train mode BatchNorm couples the images of a batch, so
    each map sees the summed score (as in the authors' code).
    """
    if score.ndim != 1:
        raise ValueError(f"score must be one value per image (B,), got shape {tuple(score.shape)}")
    raw = gradient_maps(score, {str(i): a for i, a in enumerate(activations)}, "gradcam",
                        differentiable="activations")
    maps = []
    for cam in raw.values():
        cam = F.relu(cam[:, None])
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)
        peak = cam.amax(dim=(2, 3), keepdim=True)
        maps.append(torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), cam))
    return maps


class AttentionFusion(nn.Module):
    """Fuse per-stage maps coarse to fine into one pathological map (spec "Networks", attention link).

    Starting from the coarsest map: up-sample to the next finer map's size (x2 for ResNet stages),
    concatenate with it, 1x1 conv (2 -> 1) + ReLU; the fused finest map is resized to ``size``.
    Bilinear interpolation keeps the ReLU'd maps non-negative (authors: PIL bicubic per image).
    ``n_maps - 1`` convolutions of 3 parameters each, initialised to the mean of their two inputs
    (weights 1/2, bias 0; the authors keep PyTorch's random init), so the untrained link already
    gives a map in [0, 1] and no ReLU starts dead.
    """

    def __init__(self, n_maps: int = len(GRADER_STAGES)) -> None:
        super().__init__()
        if isinstance(n_maps, bool) or not isinstance(n_maps, int) or n_maps < 2:
            raise ValueError(f"n_maps must be an int >= 2, got {n_maps!r}")
        self.n_maps = n_maps
        self.merges = nn.ModuleList(nn.Sequential(nn.Conv2d(2, 1, 1), nn.ReLU()) for _ in range(n_maps - 1))
        for merge in self.merges:
            nn.init.constant_(merge[0].weight, 0.5)
            nn.init.zeros_(merge[0].bias)

    def forward(self, maps: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        """``maps`` fine to coarse (the grader's stage order), each (B, 1, h, w) -> (B, 1, *size)."""
        if len(maps) != self.n_maps:
            raise ValueError(f"AttentionFusion expects {self.n_maps} maps (fine to coarse), got {len(maps)}")
        fused = maps[-1]
        for merge, finer in zip(self.merges, reversed(maps[:-1])):
            up = F.interpolate(fused, size=finer.shape[-2:], mode="bilinear", align_corners=False)
            fused = merge(torch.cat([up, finer], dim=1))
        return F.interpolate(fused, size=tuple(size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- the hierarchy

class SegmentGrade(nn.Module):
    """Segmentation -> grading -> attention on an image at HR size (everything of DeepMT above SR).

    Returns ``seg_logits``, ``lesions`` and, when ``grade``, ``dr`` and, when ``attention``, the
    fused ``attention`` map at the image size. Switches (attributes, changeable after building):

    - ``lesion_input``: the grader reads the 4 lesion probabilities besides RGB (the seg -> grading
      link); fixed at construction, it sets the grader's input channels (7 or 3);
    - ``grade``: run the grader at all (stage 1 does not need it);
    - ``attention``: compute the attention link (Grad-CAM of the grader + fusion);
    - ``cam_feedback``: let gradients of the attention map flow back into the grader's activations
      (and through them into its input); off, the fusion module alone learns from them (stage 2).

    The attention link needs autograd even in evaluation: it runs under ``torch.enable_grad`` and
    its outputs are detached again when the caller had gradients off (``torch.no_grad``). It cannot
    run under ``torch.inference_mode``.
    """

    def __init__(self, segmenter: MultiScaleUNet, grader: SPPGrader, fusion: AttentionFusion, *,
                 lesion_input: bool = True) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.grader = grader
        self.fusion = fusion
        self.lesion_input = lesion_input
        self.grade = True
        self.attention = True
        self.cam_feedback = True

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        seg_logits = self.segmenter(image)["seg_logits"]
        out = {"seg_logits": seg_logits, "lesions": torch.sigmoid(seg_logits[:, 1:])}
        if not self.grade:
            return out
        grader_input = torch.cat([image, out["lesions"]], dim=1) if self.lesion_input else image
        if self.attention:
            out.update(self._grade_with_attention(grader_input))
        else:
            out.update(self.grader(grader_input))
        return out

    def _grade_with_attention(self, grader_input: Tensor) -> dict[str, Tensor]:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("the DeepMT attention link needs autograd (Grad-CAM); run it under torch.no_grad(), "
                               "not torch.inference_mode(), or set attention=False")
        tracking = torch.is_grad_enabled()
        with torch.enable_grad():
            x = grader_input if tracking and grader_input.requires_grad else grader_input.detach().requires_grad_()
            stages = self.grader.features(x)
            logits = self.grader.classify(stages[GRADER_STAGES[-1]])
            maps = gradcam_stage_maps([stages[name] for name in GRADER_STAGES], dr_score(logits))
            if not self.cam_feedback:
                maps = [m.detach() for m in maps]
            attention = self.fusion(maps, grader_input.shape[-2:])
        out = {"dr": logits, "attention": attention}
        return out if tracking else {key: value.detach() for key, value in out.items()}


class DeepMT(nn.Module):
    """DeepMT-DR (spec "Idea", "Networks"): LR image -> dict of named outputs.

    ``sr`` (B, 3, scale*h, scale*w), ``seg_logits`` (B, 5, ...), ``lesions`` (B, 4, ...), ``dr``
    (B, n_grades) and ``attention`` (B, 1, ...) at SR size. ``h`` and ``w`` times ``scale`` must be
    multiples of 16 (the U-Net's four poolings).

    Ablations of the links (spec "Metrics": "each link removed", bicubic, LR, HR):

    - ``upsampler``: "sr" (the SR net), "bicubic" (no SR net) or "identity" (grade the input as
      given: LR directly, or HR as the upper bound);
    - ``lesion_input=False``: the grader sees RGB only (no seg -> grading link);
    - ``attention=False``: no attention link (no ``attention`` output; its loss terms must be 0);
    - ``feedback=False``: the SR image is detached before segmentation and grading, so the
      higher tasks' losses do not reach the SR net (no task-aware feedback).

    ``seg_width`` is the U-Net's first width (64 in the paper); ``grader_weights`` goes to
    :func:`~fundus_lib.models.backbones.build_backbone` (None, "imagenet" or a path).
    """

    def __init__(self, scale: int = 4, n_grades: int = 5, *, upsampler: Literal["sr", "bicubic", "identity"] = "sr",
                 lesion_input: bool = True, attention: bool = True, feedback: bool = True, seg_width: int = 64,
                 grader_weights: None | str = None) -> None:
        super().__init__()
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if upsampler == "sr":
            self.upsampler: nn.Module = SRNet(scale)
        elif upsampler == "bicubic":
            self.upsampler = BicubicUpsampler(scale)
        else:
            self.upsampler = IdentityUpsampler()
        in_channels = 3 + len(LESIONS) if lesion_input else 3
        grader = SPPGrader(n_grades, in_channels=in_channels, weights=grader_weights)
        self.hierarchy = SegmentGrade(MultiScaleUNet(base_width=seg_width), grader, AttentionFusion(),
                                      lesion_input=lesion_input)
        self.hierarchy.attention = attention
        self.feedback = feedback

    def parts(self) -> dict[str, nn.Module]:
        """The four trainable parts by name (:data:`PARTS`)."""
        h = self.hierarchy
        return dict(zip(PARTS, (self.upsampler, h.segmenter, h.grader, h.fusion)))

    def forward(self, lr: Tensor) -> dict[str, Tensor]:
        sr = self.upsampler(lr)["sr"]
        return {"sr": sr, **self.hierarchy(sr if self.feedback else sr.detach())}


def configure_stage(model: DeepMT, stage: int) -> list[nn.Parameter]:
    """Prepare ``model`` for training stage 1, 2 or 3; return the parameters to optimise.

    Sets ``requires_grad`` per part from :data:`STAGE_TRAINABLE` (frozen parts still run, and their
    BatchNorm statistics still follow the batches when the model is in train mode, as in the
    authors' code), runs the grader only from stage 2 on, and lets the attention terms reach the
    grader only in stage 3 (``cam_feedback``). The ``attention`` switch is left as built.
    """
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"stage must be one of {tuple(STAGE_TRAINABLE)}, got {stage!r}")
    for name, part in model.parts().items():
        part.requires_grad_(name in STAGE_TRAINABLE[stage])
    model.hierarchy.grade = stage > 1
    model.hierarchy.cam_feedback = stage == 3
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- description

def parameter_counts(model: DeepMT) -> dict[str, int]:
    """Parameters of each part (:data:`PARTS`) and ``total``."""
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
    counts["total"] = sum(counts.values())
    return counts


@torch.no_grad()
def layer_table(model: DeepMT, lr_size: int, batch: int = 1) -> pd.DataFrame:
    """One row per output of a forward pass on a random (``batch``, 3, ``lr_size``, ``lr_size``) input.

    Columns ``output``, ``shape`` and ``part`` / ``parameters`` of the part that produces it; for
    the notebook to print. The model's train/eval mode is kept; the pass runs in eval mode.
    """
    producers = {"sr": "upsampler", "seg_logits": "segmenter", "lesions": "segmenter", "dr": "grader",
                 "attention": "fusion"}
    counts = parameter_counts(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        outputs = model(torch.rand(batch, 3, lr_size, lr_size, device=device))
    finally:
        model.train(was_training)
    rows = [{"output": "lr (input)", "shape": (batch, 3, lr_size, lr_size), "part": "", "parameters": 0}]
    rows += [{"output": key, "shape": tuple(value.shape), "part": producers[key], "parameters": counts[producers[key]]}
             for key, value in outputs.items()]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- losses of the three stages

def _get(container: Mapping[str, Tensor], key: str, where: str) -> Tensor:
    if key not in container:
        hint = " (build the model with attention=True)" if key == "attention" else ""
        raise KeyError(f"{where} has no key {key!r}{hint}; keys present: {sorted(container)}")
    return container[key]


def _check_weights(**weights: float) -> None:
    for name, value in weights.items():
        if not float(value) >= 0:
            raise ValueError(f"loss weight {name} must be >= 0, got {value!r}")


def lesion_map(seg_logits: Tensor) -> Tensor:
    """1 - P(background): the "any lesion" map (B, 1, H, W) the fused attention map is trained towards (stage 2)."""
    return 1.0 - torch.sigmoid(seg_logits[:, :1])


def segmentation_target(batch: Mapping[str, Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """(target, valid) for the 5 segmentation channels from ``batch["masks"]`` (B, 4, H, W) in :data:`LESIONS` order.

    Background = no lesion. ``batch["mask_valid"]`` (B, 4), when present, marks annotated lesions;
    the background is known only where all four are. ``valid`` has shape (B, 5, 1, 1).
    """
    masks = _get(batch, "masks", "batch").to(device=like.device, dtype=like.dtype)
    expected = (like.shape[0], len(LESIONS), *like.shape[2:])
    if tuple(masks.shape) != expected:
        raise ValueError(f"batch['masks'] must have shape {expected} (the 4 lesions {LESIONS} at the SR size), got "
                         f"{tuple(masks.shape)}; map the dataset's lesion channels to {LESIONS} first")
    valid = batch.get("mask_valid", masks.new_ones(masks.shape[:2])).to(device=like.device, dtype=like.dtype)
    if tuple(valid.shape) != tuple(masks.shape[:2]):
        raise ValueError(f"batch['mask_valid'] must have shape {tuple(masks.shape[:2])}, got {tuple(valid.shape)}")
    background = 1.0 - masks.amax(dim=1, keepdim=True)
    background_valid = valid.amin(dim=1, keepdim=True)
    return torch.cat([background, masks], dim=1), torch.cat([background_valid, valid], dim=1)[:, :, None, None]


class SegmentationLoss:
    """Dice + focal on the 5 segmentation channels (spec, stage 1: "seg = Dice + focal").

    Dice: :func:`~fundus_lib.losses.soft_dice_loss` per channel (over the batch), averaged with
    ``class_weights`` (authors: 0.1 for the background, 1 per lesion; their Dice lacks the factor 2,
    a bug, and is not followed). Focal: :class:`~fundus_lib.losses.FocalLoss` (sigmoid, ``alpha``
    0.25 and ``gamma`` 2 as the authors' code), averaged over valid pixels and channels (the
    authors sum over channels and use one-hot argmax labels). Returns ``(total, {"dice", "focal"})``.
    """

    def __init__(self, dice: float = 1.0, focal: float = 1.0,
                 class_weights: Sequence[float] = (0.1, 1.0, 1.0, 1.0, 1.0), focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        _check_weights(dice=dice, focal=focal)
        if (len(class_weights) != len(SEG_CLASSES) or any(float(w) < 0 for w in class_weights)
                or not sum(class_weights) > 0):
            raise ValueError(f"class_weights must be {len(SEG_CLASSES)} non-negative weights ({SEG_CLASSES}) "
                             f"with a positive sum, got {tuple(class_weights)}")
        self.dice_weight = float(dice)
        self.focal_weight = float(focal)
        self.class_weights = tuple(float(w) for w in class_weights)
        self.focal = FocalLoss(alpha=focal_alpha, gamma=focal_gamma)

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = _get(outputs, "seg_logits", "outputs")
        target, valid = segmentation_target(batch, logits)
        probs = torch.sigmoid(logits)
        dice = sum(weight * soft_dice_loss(probs[:, c], target[:, c], valid[:, c])
                   for c, weight in enumerate(self.class_weights)) / sum(self.class_weights)
        focal = self.focal({"masks": logits}, {"masks": target, "mask_valid": valid[:, :, 0, 0]})
        total = self.dice_weight * dice + self.focal_weight * focal
        return total, {"dice": dice.detach(), "focal": focal.detach()}


def _sr_fidelity(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], mse: float, tv: float
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """``mse * MSE(sr, hr) + tv * TV(sr)``: the SR net's own terms in stages 1 and 3."""
    sr = _get(outputs, "sr", "outputs")
    hr = _get(batch, "hr_image", "batch").to(device=sr.device, dtype=sr.dtype)
    if hr.shape != sr.shape:
        raise ValueError(f"batch['hr_image'] has shape {tuple(hr.shape)} but outputs['sr'] has {tuple(sr.shape)}")
    sr_mse = F.mse_loss(sr, hr)
    tv_value = total_variation_loss(sr)
    return mse * sr_mse + tv * tv_value, {"sr_mse": sr_mse.detach(), "tv": tv_value.detach()}


def _grade_ce(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], class_weights: Tensor | None) -> Tensor:
    logits = _get(outputs, "dr", "outputs")
    labels = _get(batch, "dr", "batch").to(device=logits.device, dtype=torch.long)
    weight = None if class_weights is None else class_weights.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, labels, weight=weight)


def _class_weights(class_weights: Sequence[float] | None) -> Tensor | None:
    if class_weights is None:
        return None
    if any(float(w) <= 0 for w in class_weights):
        raise ValueError(f"class_weights must be positive, got {tuple(class_weights)}")
    return torch.as_tensor([float(w) for w in class_weights])


class SRLoss:
    """The SR net's own terms, ``mse * MSE(SR, HR) + tv * TV(SR)`` (weights 1 and 1e-6): the SR-only
    warm-up before stage 1. Reads ``outputs`` ``sr``; ``batch`` ``hr_image``. Returns ``(total, parts)``."""

    def __init__(self, *, mse: float = 1.0, tv: float = 1e-6) -> None:
        _check_weights(mse=mse, tv=tv)
        self.mse, self.tv = mse, tv

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return _sr_fidelity(outputs, batch, self.mse, self.tv)


class Stage1Loss:
    """Stage 1, SR + segmentation (spec, "Losses and stages" 1): returns ``(total, parts)``.

    ``total = seg * (Dice + focal)(seg(SR)) + mse * MSE(SR, HR) + tv * TV(SR)
    + seg_consistency * MSE(P(seg(SR)), P(seg(HR)))`` with weights 1, 1, 1e-6 and 0.4 by default.
    The segmentation loss trains the segmenter and, through the SR image, the SR net (the authors'
    "+ seg loss" in the SR objective: one sum gives both). ``P(seg(HR))`` is the target: computed by
    ``segmenter`` on ``batch["hr_image"]`` without gradients. Consistency compares probabilities
    (authors: raw logits here, probabilities in stage 3); in one summed objective the segmenter also
    receives the consistency gradient (authors: a separate optimiser step leaves it out).
    Reads ``outputs`` ``sr``, ``seg_logits``; ``batch`` ``hr_image``, ``masks`` (4 lesions), ``mask_valid`` (optional).
    """

    def __init__(self, segmenter: nn.Module, *, mse: float = 1.0, tv: float = 1e-6, seg_consistency: float = 0.4,
                 seg: float = 1.0, segmentation: SegmentationLoss | None = None) -> None:
        _check_weights(mse=mse, tv=tv, seg_consistency=seg_consistency, seg=seg)
        self.segmenter = segmenter
        self.mse, self.tv, self.seg_consistency, self.seg = mse, tv, seg_consistency, seg
        self.segmentation = SegmentationLoss() if segmentation is None else segmentation

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        fidelity, parts = _sr_fidelity(outputs, batch, self.mse, self.tv)
        seg_loss, seg_parts = self.segmentation(outputs, batch)
        with torch.no_grad():
            hr_probs = torch.sigmoid(self.segmenter(batch["hr_image"].to(outputs["sr"]))["seg_logits"])
        consistency = F.mse_loss(torch.sigmoid(outputs["seg_logits"]), hr_probs)
        total = fidelity + self.seg * seg_loss + self.seg_consistency * consistency
        return total, {**parts, "seg": seg_loss.detach(), **seg_parts, "seg_consistency": consistency.detach()}


class Stage2Loss:
    """Stage 2, grading + attention fusion, segmentation fixed (spec, "Losses and stages" 2).

    ``total = CE_w(dr, grade) + attention * MSE(attention, 1 - P(background))`` with the lesion
    map :func:`lesion_map` of the model's own segmentation as a fixed target. ``class_weights``
    (one per grade, about inverse class frequency: :data:`DDR_CLASS_WEIGHTS`,
    :data:`IDRID_CLASS_WEIGHTS`; None = unweighted). Use with :func:`configure_stage` (model, 2);
    the authors train this stage on HR images: ``fit(model.hierarchy, ..., input_key="hr_image")``.
    Reads ``outputs`` ``dr``, ``attention``, ``seg_logits``; ``batch`` ``dr``.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, *, attention: float = 1.0) -> None:
        _check_weights(attention=attention)
        self.class_weights = _class_weights(class_weights)
        self.attention = attention

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ce = _grade_ce(outputs, batch, self.class_weights)
        parts = {"ce": ce.detach()}
        if self.attention == 0:
            return ce, parts
        target = lesion_map(_get(outputs, "seg_logits", "outputs")).detach()
        fusion = F.mse_loss(_get(outputs, "attention", "outputs"), target)
        return ce + self.attention * fusion, {**parts, "attention_lesion": fusion.detach()}


class Stage3Loss:
    """Stage 3, joint training with the task-aware feedback (spec, "Losses and stages" 3).

    With ``ref = hierarchy(HR)`` (the same segmenter, grader and fusion run on ``batch["hr_image"]``):

    - grading = ``CE_w(dr(SR), grade) + attention_lesion * MSE(attention(HR), 1 - P_bg(seg(HR)))``
      (weight 0.3; the authors compare the map with all five softmax channels, a broadcasting
      slip: the lesion map of stage 2 is used);
    - SR = ``mse * MSE(SR, HR) + tv * TV(SR) + seg_consistency * MSE(P(seg(SR)), P(seg(HR)))
      + attention_consistency * MSE(attention(SR), attention(HR)) + 1 * grading``
      (weights 1, 1e-6, 1, 10);
    - ``total = SR`` terms + grading, counted once: the grading loss trains the grader and, through
      the SR image, the SR net (the authors' "+ 1 * grading loss" of the SR objective).

    HR-side maps are targets (detached), except in the grading's attention term, which trains the
    grader through its activations (``cam_feedback``). In one summed objective the grader also
    receives the attention-consistency gradient (authors: only the SR net). Links: weight 0 removes
    a consistency term; ``DeepMT(feedback=False)`` removes every higher-task gradient into the SR net.
    Use with :func:`configure_stage` (model, 3) and ``Stage3Loss(model.hierarchy)``.
    Reads ``outputs`` ``sr``, ``seg_logits``, ``dr``, ``attention``; ``batch`` ``hr_image``, ``dr``.
    """

    def __init__(self, hierarchy: SegmentGrade, class_weights: Sequence[float] | None = None, *, mse: float = 1.0,
                 tv: float = 1e-6, seg_consistency: float = 1.0, attention_consistency: float = 10.0,
                 attention_lesion: float = 0.3) -> None:
        _check_weights(mse=mse, tv=tv, seg_consistency=seg_consistency, attention_consistency=attention_consistency,
                       attention_lesion=attention_lesion)
        self.hierarchy = hierarchy
        self.class_weights = _class_weights(class_weights)
        self.mse, self.tv, self.seg_consistency = mse, tv, seg_consistency
        self.attention_consistency, self.attention_lesion = attention_consistency, attention_lesion

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        fidelity, parts = _sr_fidelity(outputs, batch, self.mse, self.tv)
        ref = self.hierarchy(batch["hr_image"].to(outputs["sr"]))
        ce = _grade_ce(outputs, batch, self.class_weights)
        seg_consistency = F.mse_loss(torch.sigmoid(_get(outputs, "seg_logits", "outputs")),
                                     torch.sigmoid(ref["seg_logits"]).detach())
        total = fidelity + self.seg_consistency * seg_consistency + ce
        parts.update(seg_consistency=seg_consistency.detach(), ce=ce.detach())
        if self.attention_lesion or self.attention_consistency:
            ref_attention = _get(ref, "attention", "the HR reference pass")
            attention_lesion = F.mse_loss(ref_attention, lesion_map(ref["seg_logits"]).detach())
            attention_consistency = F.mse_loss(_get(outputs, "attention", "outputs"), ref_attention.detach())
            total = (total + self.attention_lesion * attention_lesion
                     + self.attention_consistency * attention_consistency)
            parts.update(attention_lesion=attention_lesion.detach(),
                         attention_consistency=attention_consistency.detach())
        return total, parts
