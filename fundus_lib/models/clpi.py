"""CLPI: collaborative learning of patch-level and image-level annotations (Yang et al., IEEE T-Cyb 2022).

Data flow (Fig. 2; sizes for the paper's 1024 x 1024 input)::

    image (B,3,1024,1024)
      -> lesion attention generator (Table II): zero border of 2 px, 5x5 conv, six 2x2/stride-2 convs,
         1x1 conv(s), each followed by BN and Mish, then a 1x1 conv to 4 classes and a softmax
         -> P (B,4,16,16): unit (i, j) classifies the 68 x 68 window at rows 64 i - 2 .. 64 i + 65
      -> AM = P expanded by duplication to the grading size (Appendix A; 16 -> 512, 32 x 32 blocks)
      -> I_AM = (AM_i + 1) * I_re_j, 4 maps x 3 colours = 12 channels (Eq. 1), gradient stopped
      -> DenseNet-121 without FC (12-channel first conv)                     -> F (B,1024,16,16)
      -> [F ; 1 - P_0] (abnormal shortcut, Sec. III-B) -> 1x1 conv -> BN -> ReLU -> GAP -> FC -> grade logits

Outputs of :meth:`CLPI.forward`: ``"dr"`` (B, n_dr) grade logits, ``"patch_logits"`` (B,4,h,w) the
generator's logits and ``"attention"`` (B,4,h,w) = P, their softmax (class 0 = no target lesion,
then MA, haemorrhage, exudate: :data:`fundus_lib.data.patches.PATCH_CLASSES`). Patch pre-training
runs the same generator on 68 x 68 patches through :class:`PatchClassifier` (``"patch_logits"``
(B,4)). Losses: :func:`patch_loss` and :func:`clpi_loss` (Eq. 2); schedule: :func:`warmup_cosine`.

Checked against the authors' PaddlePaddle inference code (github.com/PaddlePaddle/Research,
CV/CLPI-Collaborative-Learning-for-Diabetic-Retinopathy-Grading: ``clfnet/lesionnet.py``,
``clfnet/__init__.py``, ``clfnet/densenet.py``), read for checking only. Choices where the sources
differ or are silent:

- Generator widths: Table II has 32-64-128-256-512-1024-1024 and ONE 1x1x1024 layer before the
  4-way head; ``lesionnet.py`` has 32-32-64-128-256-512-1024 and TWO 1x1x1024 layers.
  ``widths="paper"`` (default) follows Table II, ``widths="authors"`` the released code.
- Biases: the released code has no bias in any generator conv (each is followed by BN) nor in its
  4-way head nor in the 1x1 fusion conv; the paper is silent, so the code's choice is kept.
- Border: Table II pads the 5x5 conv by 2. Applied to whole images we pad by 2 px exactly so, which
  gives Table II's sizes (1024 -> 16). Table II also lists padding 2 for a 68 x 68 patch; taken
  literally the patch's unit would see two zero rows at the top and never see its last two rows
  (17 -> 8 drops them), contradicting the paper's own claim that the patch-trained net "is
  equivalent to splitting the input image via a 68 x 68 sliding window with the stride 64"
  (Sec. III-A). :class:`PatchClassifier` therefore runs patches WITHOUT the border, which makes
  that equivalence exact (tested to < 1e-5). The windows are those of
  :func:`fundus_lib.data.patches.grid_patch_labels` (same 2 px zero border).
- Gradients: the code sets ``stop_gradient`` on I_AM, so in end-to-end training the grade loss
  reaches the generator only through the shortcut, as Sec. IV-B says. The "without shortcut"
  ablation of Table VIII (``shortcut=False``) back-propagates "through the deep classification
  backbone to the lesion attention generator", so there I_AM keeps its gradient.
- Resizing I_re: the code resizes bilinearly without anti-aliasing; we anti-alias (a clean 2x
  down-sampling). AM uses nearest-neighbour duplication as in Appendix A and the code.
- Channel order of I_AM: map-major, k = 3 i + j, as the code concatenates (Eq. 1 leaves it open).
- Fusion width: 1x1 conv 1025 -> 1024 (code; the paper gives no width).
- ImageNet weights for the 12-channel first conv (not published): RGB filters tiled 4x and divided
  by 4 (:func:`fundus_lib.models.backbones.adapted_conv_weight`). Beware: with identical filters
  for the 4 maps the first conv computes ``W * sum_i (AM_i + 1) I = 5 W * I`` because the 4
  probabilities sum to 1 — at initialisation the backbone is blind to the attention, and only the
  gradients (which weight copy i by AM_i + 1) make the copies diverge. Random initialisation
  (``weights=None``) therefore draws the 12 input channels independently instead of tiling.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from fundus_lib.data.patches import PATCH_CLASSES, PATCH_STRIDE, PATCH_WINDOW

from .backbones import build_backbone
from .canet import _cross_entropy

#: Widths of the generator's conv-BN-Mish layers, in order (the 4-way head comes after them).
GENERATOR_WIDTHS: dict[str, tuple[int, ...]] = {
    "paper": (32, 64, 128, 256, 512, 1024, 1024, 1024),          # Table II
    "authors": (32, 32, 64, 128, 256, 512, 1024, 1024, 1024),    # clfnet/lesionnet.py
}
Widths = Literal["paper", "authors"]
FIRST_KERNEL = 5          # Table II, layer 1
N_DOWNSAMPLE = 6          # 2x2 stride-2 convs: output stride 2**6 = 64 = PATCH_STRIDE
BORDER = (PATCH_WINDOW - PATCH_STRIDE) // 2   # 2: Table II's padding of the 5x5 conv
N_PATCH_CLASSES = len(PATCH_CLASSES)


def generator_plan(widths: Widths | Sequence[int] = "paper") -> list[tuple[int, int, int]]:
    """(out channels, kernel, stride) of each conv-BN-Mish layer of the generator (Table II).

    ``widths``: ``"paper"``, ``"authors"`` or explicit widths; the first layer is the 5x5 conv, the
    next :data:`N_DOWNSAMPLE` the 2x2/stride-2 convs, any further ones 1x1 convs (at least one).
    """
    if isinstance(widths, str):
        if widths not in GENERATOR_WIDTHS:
            raise ValueError(f"widths must be one of {sorted(GENERATOR_WIDTHS)} or a sequence of ints, got {widths!r}")
        widths = GENERATOR_WIDTHS[widths]
    widths = tuple(widths)
    if len(widths) < N_DOWNSAMPLE + 2 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f"widths must be at least {N_DOWNSAMPLE + 2} positive ints (5x5 conv, {N_DOWNSAMPLE} "
                         f"stride-2 convs, >= one 1x1 conv), got {widths!r}")
    return ([(widths[0], FIRST_KERNEL, 1)] + [(w, 2, 2) for w in widths[1:N_DOWNSAMPLE + 1]]
            + [(w, 1, 1) for w in widths[N_DOWNSAMPLE + 1:]])


def _conv_bn_mish(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    """Conv (no bias: BN follows) -> BN -> Mish, "BN applied before each Mish" (Sec. III-A)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, bias=False),
                         nn.BatchNorm2d(out_channels), nn.Mish())


class LesionAttentionGenerator(nn.Module):
    """Table II: a fully convolutional 68 x 68 / stride-64 patch classifier over a whole image.

    :meth:`forward` takes a whole image (H, W >= 64), adds the 2 px zero border and returns
    ``{"patch_logits": (B,4,H//64,W//64), "attention": softmax of them}``; :meth:`classify_windows`
    runs the same layers without the border (what :class:`PatchClassifier` uses).
    """

    def __init__(self, widths: Widths | Sequence[int] = "paper", in_channels: int = 3,
                 n_classes: int = N_PATCH_CLASSES) -> None:
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        layers, channels = [], in_channels
        for out_channels, kernel, stride in generator_plan(widths):
            layers.append(_conv_bn_mish(channels, out_channels, kernel, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, n_classes, 1, bias=False)

    def classify_windows(self, x: Tensor) -> Tensor:
        """Logits (B, n_classes, (H-4)//64, (W-4)//64) of the 68-px windows of ``x`` at stride 64, no border."""
        return self.head(self.features(x))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        if image.ndim != 4 or min(image.shape[-2:]) < PATCH_STRIDE:
            raise ValueError(f"the generator takes (B, C, H, W) images with H, W >= {PATCH_STRIDE}, "
                             f"got shape {tuple(image.shape)}")
        logits = self.classify_windows(F.pad(image, (BORDER,) * 4))
        return {"patch_logits": logits, "attention": logits.softmax(dim=1)}


class PatchClassifier(nn.Module):
    """The generator on single 68 x 68 patches, for patch pre-training (Sec. III-A, IV-B).

    Shares (not copies) ``generator``'s weights: training this module pre-trains the generator of
    the :class:`CLPI` it came from. Returns ``{"patch_logits": (B, 4)}``.
    """

    def __init__(self, generator: LesionAttentionGenerator) -> None:
        super().__init__()
        if not isinstance(generator, LesionAttentionGenerator):
            raise TypeError(f"generator must be a LesionAttentionGenerator, got {type(generator).__name__}")
        self.generator = generator

    def forward(self, patches: Tensor) -> dict[str, Tensor]:
        if patches.ndim != 4 or tuple(patches.shape[-2:]) != (PATCH_WINDOW, PATCH_WINDOW):
            raise ValueError(f"patches must be (B, C, {PATCH_WINDOW}, {PATCH_WINDOW}), got {tuple(patches.shape)}")
        return {"patch_logits": self.generator.classify_windows(patches).flatten(1)}


def expand_attention(probabilities: Tensor, size: tuple[int, int]) -> Tensor:
    """AM: each entry of P duplicated into a block, the blocks tiled in spatial order (Appendix A)."""
    height, width = probabilities.shape[-2:]
    if size[0] % height or size[1] % width:
        raise ValueError(f"attention map {height}x{width} cannot be expanded by duplication to {size[0]}x{size[1]}")
    return probabilities.repeat_interleave(size[0] // height, dim=-2).repeat_interleave(size[1] // width, dim=-1)


def weighted_input(image: Tensor, attention_map: Tensor) -> Tensor:
    """Eq. 1: ``I_AM_k = (AM_i + 1) * I_j`` with k = 3 i + j: (B, n*c, H, W) from (B,c,H,W) and (B,n,H,W)."""
    if image.shape[-2:] != attention_map.shape[-2:] or image.shape[0] != attention_map.shape[0]:
        raise ValueError(f"image {tuple(image.shape)} and attention map {tuple(attention_map.shape)} differ in size")
    return ((attention_map[:, :, None] + 1.0) * image[:, None]).flatten(1, 2)


class CLPI(nn.Module):
    """Lesion attention generator + grading module, trained end to end (see the module docstring).

    Args:
        n_dr: grade classes (5 ICDR grades, or 2: referable / non-referable).
        widths: generator widths, ``"paper"`` (Table II) or ``"authors"`` (released code).
        backbone: grading backbone (DenseNet-121 in the paper), any DenseNet of ``build_backbone``.
        weights: grading-backbone weights (None: random, nothing downloaded; "imagenet"; a path).
        grading_scale: grading input side / generator input side (paper: 512 / 1024 = 0.5); a
            multiple of 0.5 so AM and the shortcut are exact duplications of P.
        shortcut: the abnormal shortcut ``1 - P_0``; ``False`` is "CLPI without shortcut" (Table VIII).
        train_generator: ``False`` is "CLPI without end-to-end learning" (Table VIII): the grade
            loss does not reach the generator (no autograd through it) and its BN statistics stay
            fixed (eval mode while the CLPI trains).
        fusion_channels: output channels of the 1x1 fusion conv (1024 in the code).
    """

    def __init__(self, n_dr: int = 5, widths: Widths | Sequence[int] = "paper", backbone: str = "densenet121",
                 weights: str | Path | None = None, grading_scale: float = 0.5, shortcut: bool = True,
                 train_generator: bool = True, fusion_channels: int = 1024) -> None:
        super().__init__()
        if not isinstance(n_dr, int) or n_dr < 2:
            raise ValueError(f"n_dr must be an int >= 2, got {n_dr!r}")
        if not backbone.startswith("densenet"):
            raise ValueError(f"CLPI's grading backbone is a DenseNet (paper: densenet121), got {backbone!r}")
        if not (isinstance(grading_scale, (int, float)) and grading_scale > 0
                and float(2 * grading_scale).is_integer()):
            raise ValueError(f"grading_scale must be a positive multiple of 0.5 (paper: 0.5), got {grading_scale!r}")
        self.generator = LesionAttentionGenerator(widths)
        n_maps = self.generator.head.out_channels
        self.backbone = build_backbone(backbone, weights=weights, in_channels=3 * n_maps)
        if weights is None:
            # Tiled random filters (build_backbone's adaptation) would see only sum_i (P_i + 1) I = 5 I:
            # the probabilities sum to 1, so the attention would cancel exactly. Draw all 12 afresh.
            nn.init.kaiming_normal_(self.backbone.get_submodule(self.backbone.first_conv).weight)
        self.shortcut = bool(shortcut)
        self.train_generator = bool(train_generator)
        self.grading_scale = float(grading_scale)
        self.fusion = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels + int(self.shortcut), fusion_channels, 1, bias=False),
            nn.BatchNorm2d(fusion_channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(fusion_channels, n_dr)

    def train(self, mode: bool = True) -> "CLPI":
        """As ``nn.Module.train``, but a frozen generator stays in eval mode (fixed BN statistics)."""
        super().train(mode)
        if not self.train_generator:
            self.generator.eval()
        return self

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        height, width = image.shape[-2:]
        if image.ndim != 4 or height % PATCH_STRIDE or width % PATCH_STRIDE:
            raise ValueError(f"CLPI takes (B, 3, H, W) images with H and W multiples of {PATCH_STRIDE} "
                             f"(paper: 1024), got shape {tuple(image.shape)}")
        # A frozen generator runs without autograd; its own parameters keep requires_grad, so a
        # PatchClassifier on it can still be pre-trained.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_generator):
            lesions = self.generator(image)
        probabilities = lesions["attention"]
        size = (round(height * self.grading_scale), round(width * self.grading_scale))
        resized = image if size == (height, width) else F.interpolate(
            image, size=size, mode="bilinear", align_corners=False, antialias=True)
        weighted = weighted_input(resized, expand_attention(probabilities, size))
        if self.shortcut:
            weighted = weighted.detach()  # Sec. IV-B: the generator learns only through the shortcut
        features = self.backbone(weighted)[self.backbone.stages[-1]]
        if self.shortcut:
            abnormal = expand_attention(1.0 - probabilities[:, :1], tuple(features.shape[-2:]))
            features = torch.cat([features, abnormal], dim=1)
        pooled = self.fusion(features).mean(dim=(2, 3))
        return {"dr": self.fc(pooled), **lesions}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: CLPI) -> dict[str, int]:
    """Parameters per part of a :class:`CLPI` (the paper gives no counts; the tests hand-count Table II)."""
    parts = {"generator": _count(model.generator), "grading_backbone": _count(model.backbone),
             "fusion": _count(model.fusion), "classifier": _count(model.fc)}
    return {**parts, "total": sum(parts.values())}


def patch_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], target: str = "patch_labels") -> Tensor:
    """Eq. 2 with M = 4: cross-entropy of ``outputs["patch_logits"]`` against ``batch[target]``.

    Works for single patches ((B,4) logits, (B,) labels from :class:`PatchClassifier`) and for dense
    maps ((B,4,h,w) logits of whole images, (B,h,w) grid labels from ``FundusDataset``).
    """
    return _cross_entropy(outputs, batch, "patch_logits", target)


def clpi_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], target: str = "dr") -> Tensor:
    """Eq. 2 with M = 5 (or 2): cross-entropy of ``outputs["dr"]`` against ``batch[target]``; image labels only."""
    return _cross_entropy(outputs, batch, "dr", target)


def warmup_cosine(warmup_fraction: float = 0.05) -> Callable[[torch.optim.Optimizer, int], LambdaLR]:
    """Sec. IV-B's schedule as a ``fit(scheduler=..., scheduler_interval="batch")`` factory.

    The learning rate rises linearly from 0 to the optimiser's rate over the first
    ``warmup_fraction`` of the steps (paper: 5 of 100 epochs), then decays to 0 along a cosine.
    """
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction!r}")

    def factory(optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
        warmup = round(warmup_fraction * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        return LambdaLR(optimizer, factor)

    return factory
