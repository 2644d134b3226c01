"""L-Net and its segmentation baselines on one Inception-v3 encoder (Wei et al., ICPR 2020, Sec. 3.1, Table 3).

Every model here is an encoder-decoder whose ``forward(x)`` returns

- ``"masks"``: lesion-map **logits** (B, m, H, W) at the input size (``sigmoid`` gives the
  per-pixel, per-lesion probabilities ``p_{i,j}``; lesions are multi-label, so no softmax);
- ``"presence"``: image-level lesion-presence **logits** (B, m), the global max of the mask logits.
  The sigmoid is monotone, so ``sigmoid(presence)`` equals the global max pooling of the
  probability maps, ``P_j`` of Eq. 1; a lesion is called present when it exceeds 0.5.

The losses in :mod:`fundus_lib.losses` read exactly these two keys.

Models:

- :class:`LNet`: U-Net-style copy-and-merge (concatenation) of encoder maps, where every upsampling
  is a 1x1 convolution (adjusting the channel count) followed by parameter-free bilinear
  interpolation, no deconvolution; the expansive path stops early (``variant`` "32s" ... "2s").
- :class:`FCN`: FCN-32s/16s/8s (Long et al. 2015): a 1x1 score layer per tapped map, fused by addition.
- :class:`UNet`: a U-Net decoder (bilinear upsampling, concatenation, two 3x3 conv blocks per level).
- Patch-based FCN-32s: an ``FCN("32s")`` trained on :func:`to_patches` crops and applied with
  :func:`predict_patches` (sliding window inside the image, overlapping scores averaged).

torchvision's Inception-v3 uses unpadded convolutions, so its maps are not exact powers of two of
the input size (an 896 input gives a 26x26 ``Mixed_7c``): every upsampling therefore targets the
exact size of the map it merges with, and the final one the input size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from fundus_lib.models.backbones import Backbone, build_backbone

VARIANTS: dict[str, int] = {"32s": 32, "16s": 16, "8s": 8, "4s": 4, "2s": 2}
FCN_VARIANTS: tuple[str, ...] = ("32s", "16s", "8s")


def tapped_stages(backbone: Backbone, min_stride: int) -> tuple[str, ...]:
    """Backbone stages the expansive path uses, deepest first: the deepest stage of each stride >= ``min_stride``."""
    by_stride = {backbone.strides[stage]: stage for stage in backbone.stages}  # later (deeper) stages win
    if min_stride not in by_stride:
        raise ValueError(f"backbone {backbone.name!r} has no stage of stride {min_stride}; "
                         f"its strides are {sorted(by_stride)}")
    return tuple(by_stride[stride] for stride in sorted(by_stride, reverse=True) if stride >= min_stride)


def _variant_stride(variant: str, allowed: Sequence[str]) -> int:
    if variant not in allowed:
        raise ValueError(f"variant must be one of {tuple(allowed)}, got {variant!r}")
    return VARIANTS[variant]


def _upsample_to(x: Tensor, reference: Tensor) -> Tensor:
    """Bilinear interpolation of ``x`` to the spatial size of ``reference``."""
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class LesionSegmenter(nn.Module):
    """Encoder + decoder over tapped stages; see the module docstring for the output dict.

    ``decoder`` receives the tapped feature maps deepest first and returns logits at any
    resolution; they are bilinearly resized to the input size here.
    """

    def __init__(self, encoder: Backbone, taps: Sequence[str], decoder: nn.Module, n_lesions: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.taps = tuple(taps)
        self.decoder = decoder
        self.n_lesions = n_lesions

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.encoder(x, stages=self.taps)
        logits = self.decoder([features[stage] for stage in self.taps])
        masks = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"masks": masks, "presence": masks.amax(dim=(2, 3))}


def _encoder_and_taps(backbone: str, weights, in_channels: int, min_stride: int) -> tuple[Backbone, tuple[str, ...]]:
    encoder = build_backbone(backbone, weights=weights, in_channels=in_channels)
    return encoder, tapped_stages(encoder, min_stride)


def _check_n_lesions(n_lesions: int) -> None:
    if not isinstance(n_lesions, int) or n_lesions < 1:
        raise ValueError(f"n_lesions must be a positive int, got {n_lesions!r}")


class LNetDecoder(nn.Module):
    """L-Net's expansive path: per level, 1x1 conv -> bilinear upsampling -> concatenation with the skip map.

    The 1x1 convolution brings the running map to the skip map's channel count. The paper names
    only the 1x1 convolution; it is followed here by BatchNorm + ReLU, because without a
    non-linearity the whole expansive path would collapse into a linear map of upsampled encoder
    features (an FCN with additive fusion) and concatenation would add nothing. A final 1x1
    convolution gives the m lesion maps (logits).
    """

    def __init__(self, channels: Sequence[int], n_lesions: int) -> None:
        super().__init__()
        running = channels[0]
        adjust = []
        for skip_channels in channels[1:]:
            adjust.append(Conv2dNormActivation(running, skip_channels, kernel_size=1))
            running = 2 * skip_channels
        self.adjust = nn.ModuleList(adjust)
        self.head = nn.Conv2d(running, n_lesions, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[0]
        for adjust, skip in zip(self.adjust, features[1:]):
            x = torch.cat([_upsample_to(adjust(x), skip), skip], dim=1)
        return self.head(x)


class LNet(LesionSegmenter):
    """L-Net-``variant`` (Sec. 3.1, Fig. 4): Inception-v3 contracting path, short expansive path.

    ``variant`` is where the expansive path stops: "32s" uses only the stride-32 map (``Mixed_7c``,
    upsampled x32), "16s" merges ``Mixed_6e``, "8s" ``Mixed_5d``, "4s" ``Conv2d_4a_3x3`` and "2s"
    ``Conv2d_2b_3x3`` (all intermediate maps). The paper's best segmenter is -8s, its best lesion
    classifier (and SiAN's side branch) -16s. ``weights`` go to :func:`build_backbone` (None,
    "imagenet" or a path); the paper starts from ImageNet weights.
    """

    def __init__(self, variant: str = "16s", n_lesions: int = 8, backbone: str = "inception_v3",
                 weights=None, in_channels: int = 3) -> None:
        _check_n_lesions(n_lesions)
        encoder, taps = _encoder_and_taps(backbone, weights, in_channels, _variant_stride(variant, tuple(VARIANTS)))
        decoder = LNetDecoder([encoder.channels[stage] for stage in taps], n_lesions)
        super().__init__(encoder, taps, decoder, n_lesions)
        self.variant = variant


class FCNDecoder(nn.Module):
    """FCN skip architecture (Long et al. 2015): score each tapped map with a 1x1 conv, upsample, add.

    Skip score layers start at zero, as in Long et al., so a fresh FCN-16s/8s predicts exactly
    what its coarser parent does. Long et al. upsample with deconvolutions initialised to bilinear
    interpolation; fixed bilinear interpolation is used here so the baselines differ from L-Net
    only in the fusion (addition vs concatenation) and the missing channel-adjusting layers.
    """

    def __init__(self, channels: Sequence[int], n_lesions: int) -> None:
        super().__init__()
        self.scores = nn.ModuleList(nn.Conv2d(c, n_lesions, kernel_size=1) for c in channels)
        for score in self.scores[1:]:
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self.scores[0](features[0])
        for score, skip in zip(self.scores[1:], features[1:]):
            x = _upsample_to(x, skip) + score(skip)
        return x


class FCN(LesionSegmenter):
    """FCN-32s / -16s / -8s on the Inception-v3 encoder (Table 3 baselines)."""

    def __init__(self, variant: str = "8s", n_lesions: int = 8, backbone: str = "inception_v3",
                 weights=None, in_channels: int = 3) -> None:
        _check_n_lesions(n_lesions)
        encoder, taps = _encoder_and_taps(backbone, weights, in_channels, _variant_stride(variant, FCN_VARIANTS))
        super().__init__(encoder, taps, FCNDecoder([encoder.channels[s] for s in taps], n_lesions), n_lesions)
        self.variant = variant


class UNetDecoder(nn.Module):
    """U-Net expansive path: per level, bilinear x-upsampling, concatenation, two 3x3 conv-BN-ReLU blocks."""

    def __init__(self, channels: Sequence[int], widths: Sequence[int], n_lesions: int) -> None:
        super().__init__()
        if len(widths) != len(channels) - 1:
            raise ValueError(f"decoder_channels needs one width per skip connection ({len(channels) - 1}), "
                             f"got {len(widths)}: {tuple(widths)}")
        running = channels[0]
        blocks = []
        for skip_channels, width in zip(channels[1:], widths):
            blocks.append(nn.Sequential(Conv2dNormActivation(running + skip_channels, width, 3),
                                        Conv2dNormActivation(width, width, 3)))
            running = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(running, n_lesions, kernel_size=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[0]
        for block, skip in zip(self.blocks, features[1:]):
            x = block(torch.cat([_upsample_to(x, skip), skip], dim=1))
        return self.head(x)


class UNet(LesionSegmenter):
    """U-Net decoder over every encoder stride (Table 3 baseline).

    ``decoder_channels`` gives one width per skip connection, deepest first; by default the first
    of (256, 128, 64, 32) as many as the backbone has skips (4 for Inception-v3).
    """

    def __init__(self, n_lesions: int = 8, backbone: str = "inception_v3", weights=None, in_channels: int = 3,
                 decoder_channels: Sequence[int] | None = None) -> None:
        _check_n_lesions(n_lesions)
        encoder = build_backbone(backbone, weights=weights, in_channels=in_channels)
        taps = tapped_stages(encoder, min(encoder.strides.values()))
        if decoder_channels is None:
            decoder_channels = (256, 128, 64, 32)[: len(taps) - 1]
        decoder = UNetDecoder([encoder.channels[s] for s in taps], decoder_channels, n_lesions)
        super().__init__(encoder, taps, decoder, n_lesions)


def _check_window(images: Tensor, window: int, stride: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not 0 < stride <= window:
        raise ValueError(f"stride must lie in (0, window={window}], got {stride}")
    if min(images.shape[-2:]) < window:
        raise ValueError(f"window {window} is larger than the image ({tuple(images.shape[-2:])})")


def _padded_size(size: int, window: int, stride: int) -> int:
    """Smallest size >= ``size`` that windows of ``window`` at ``stride`` tile exactly."""
    return size + (-(size - window)) % stride


def to_patches(images: Tensor, window: int, stride: int) -> Tensor:
    """(B, C, H, W) -> (B * L, C, window, window) crops in raster order, image by image.

    Images are zero-padded at the bottom and right when the windows do not tile them exactly.
    The paper trains the patch-based FCN-32s on the 4 x 4 grid of an 896 image (window = stride = 224)
    and tests with window 224, stride 112. Masks are cut the same way.
    """
    _check_window(images, window, stride)
    batch, channels, height, width = images.shape
    padded = F.pad(images, (0, _padded_size(width, window, stride) - width, 0, _padded_size(height, window, stride) - height))
    columns = F.unfold(padded, kernel_size=window, stride=stride)  # (B, C * window^2, L)
    n_windows = columns.shape[-1]
    return columns.transpose(1, 2).reshape(batch * n_windows, channels, window, window)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of the sliding windows along one axis: every ``stride``, plus one flush with the far edge.

    Every window lies inside the image, so no border is padded: where ``size - window`` is not a
    multiple of ``stride``, the last window is moved back to end at the border (it overlaps its
    neighbour more) instead of reading zeros beyond it.
    """
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.no_grad()
def predict_patches(model: nn.Module, images: Tensor, window: int = 224, stride: int = 112,
                    batch_size: int = 16) -> Tensor:
    """Sliding-window lesion probabilities (B, m, H, W): run ``model`` on every window, average overlaps.

    Each pixel's probability is the mean of ``sigmoid(model(window)["masks"])`` over all windows
    covering it (the paper averages scores from overlapping areas). Windows start every ``stride``
    pixels and the last one on each axis ends at the border (:func:`window_starts`), so the model
    never sees padding. Only ``batch_size`` windows are cut and held at a time. Put the model in
    eval mode first; it is run without gradients.
    """
    _check_window(images, window, stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch, _, height, width = images.shape
    positions = [(b, top, left) for b in range(batch) for top in window_starts(height, window, stride)
                 for left in window_starts(width, window, stride)]
    total: Tensor | None = None
    count = torch.zeros(batch, 1, height, width, dtype=images.dtype, device=images.device)
    for first in range(0, len(positions), batch_size):
        chunk = positions[first:first + batch_size]
        crops = torch.stack([images[b, :, top:top + window, left:left + window] for b, top, left in chunk])
        scores = torch.sigmoid(model(crops)["masks"])
        if total is None:
            total = scores.new_zeros(batch, scores.shape[1], height, width)
        for score, (b, top, left) in zip(scores, chunk):
            total[b, :, top:top + window, left:left + window] += score
            count[b, :, top:top + window, left:left + window] += 1
    return total / count
