"""Augmentation of a whole batch on the training device, each image with its own random draw.

:func:`~fundus_lib.data.transforms.train_transform` augments one image at a time in DataLoader
workers (CPU). When a dataset is held in memory (:mod:`fundus_lib.data.in_memory`) the batch is
already on the GPU, and augmenting it there keeps the GPU, not the CPU, the bottleneck.
:class:`BatchAugment` applies the same steps with the same defaults as ``train_transform``:

1. **geometry** — random scale-crop (CLPI's scale and aspect ranges, zero fill beyond the border),
   horizontal and vertical flips, rotation — composed into ONE affine map per image and applied
   with a single :func:`torch.nn.functional.grid_sample` (bilinear for images, nearest for
   masks, so masks stay binary and aligned with their image);
2. **colour** — brightness, contrast and saturation jitter with per-image factors, computed
   exactly as :func:`torchvision.transforms.v2.functional.adjust_brightness` /
   ``adjust_contrast`` / ``adjust_saturation`` compute them for one image (the tests check it).

Differences from ``train_transform``, on purpose: one interpolation instead of two (crop, then
rotation), the crop box is continuous rather than rounded to whole pixels, colour steps run in a
fixed order (v2's ColorJitter shuffles it), and hue jitter is not offered (the project's default
is 0). Random numbers come from a ``torch.Generator`` on the batch's device, so no host round trip
is needed and a seeded generator gives the same batch twice.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from fundus_lib.data.transforms import CLPI_DEGREES, CLPI_RATIO, CLPI_SCALE


def _pair(value: Sequence[float] | None, name: str, low: float) -> tuple[float, float] | None:
    if value is None:
        return None
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be a (min, max) pair with {low} <= min <= max, got {value!r}")
    return float(value[0]), float(value[1])


def _uniform(low: float, high: float, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def affine_matrices(scale: torch.Tensor, aspect: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor,
                    angle_deg: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) matrices for :func:`torch.nn.functional.affine_grid` (normalised coordinates).

    Per image: keep a crop of ``scale`` x the image area with aspect (width / height) ``aspect``,
    its centre placed by ``shift`` in [0, 1]^2 (0: touching the left / top border, 1: the right /
    bottom one, as a random crop position), flipped where ``flip`` (B, 2) is -1 (x, y), rotated
    counter-clockwise by ``angle_deg`` like :func:`torchvision.transforms.v2.functional.rotate`.
    An output pixel ``p`` samples the input at ``S @ F @ R @ p + c``.
    """
    width = torch.sqrt(scale * aspect)          # crop size relative to the image side
    height = torch.sqrt(scale / aspect)
    centre_x = (1 - width) * (2 * shift[:, 0] - 1)
    centre_y = (1 - height) * (2 * shift[:, 1] - 1)
    radians = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # R maps output coordinates back into the un-rotated picture: rotating the picture by +angle
    # (counter-clockwise on screen, where y points down) samples at R(-angle) in (x, y-down).
    a, b = cos, -sin
    c, d = sin, cos
    fx, fy = flip[:, 0], flip[:, 1]
    row_x = torch.stack([width * fx * a, width * fx * b, centre_x], dim=1)
    row_y = torch.stack([height * fy * c, height * fy * d, centre_y], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def warp(images: torch.Tensor, theta: torch.Tensor, masks: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply per-image affine maps: images bilinearly, masks by nearest neighbour; zeros outside."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is None:
        return warped, None
    warped_masks = F.grid_sample(masks.to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                                 align_corners=False)
    return warped, warped_masks.to(masks.dtype)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` for float images, with one factor per image (B, 1, 1, 1)."""
    return (factor * image + (1.0 - factor) * other).clamp_(0.0, 1.0)


def jitter_colours(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                   saturation: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, then saturation, each with one factor per image (shape (B,)).

    Float images in [0, 1]. Per image this equals v2's ``adjust_brightness`` -> ``adjust_contrast``
    -> ``adjust_saturation`` with the same factors.
    """
    view = (-1, 1, 1, 1)
    images = _blend(images, torch.zeros_like(images), brightness.view(view))
    grey_mean = TF.rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    images = _blend(images, grey_mean, contrast.view(view))
    return _blend(images, TF.rgb_to_grayscale(images), saturation.view(view))


class BatchAugment:
    """Random per-image augmentation of a (B, 3, S, S) float batch in [0, 1] and its (B, L, S, S) masks.

    Parameters mirror :func:`~fundus_lib.data.transforms.train_transform`: ``scale`` / ``ratio``
    of the crop (``None``: no crop), flip probability ``flip`` (each axis), rotation range
    ``degrees`` (``None``: none), ``jitter`` = (brightness, contrast, saturation, hue) with hue 0.
    """

    def __init__(self, *, scale: Sequence[float] | None = CLPI_SCALE, ratio: Sequence[float] = CLPI_RATIO,
                 flip: float = 0.5, degrees: Sequence[float] | None = CLPI_DEGREES,
                 jitter: Sequence[float] | None = (0.1, 0.1, 0.1, 0.0)) -> None:
        self.scale = _pair(scale, "scale", 1e-6)
        self.ratio = _pair(ratio, "ratio", 1e-6)
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
        self.flip = float(flip)
        if degrees is not None and (len(degrees) != 2 or degrees[0] > degrees[1]):
            raise ValueError(f"degrees must be a (min, max) pair, got {degrees!r}")
        self.degrees = None if degrees is None else (float(degrees[0]), float(degrees[1]))
        if jitter is not None:
            if len(jitter) != 4 or min(jitter) < 0:
                raise ValueError(f"jitter must be (brightness, contrast, saturation, hue) >= 0, got {jitter!r}")
            if jitter[3] != 0:
                raise ValueError("hue jitter is not supported on the batch path; use hue=0 "
                                 "(or data_path='stream', whose per-image v2 ColorJitter has it)")
        self.jitter = None if jitter is None else tuple(float(j) for j in jitter[:3])

    def __repr__(self) -> str:
        return (f"BatchAugment(scale={self.scale}, ratio={self.ratio}, flip={self.flip}, degrees={self.degrees}, "
                f"jitter={self.jitter})")

    def geometry(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Draw ``n`` affine matrices (B, 2, 3) on ``device``."""
        if self.scale is not None:
            scale = _uniform(*self.scale, n, generator, device)
            log_ratio = _uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), n, generator, device)
            aspect = torch.exp(log_ratio)
            shift = torch.rand(n, 2, generator=generator, device=device)
        else:
            scale = aspect = torch.ones(n, device=device)
            shift = torch.full((n, 2), 0.5, device=device)
        flips = torch.rand(n, 2, generator=generator, device=device) < self.flip
        flip = 1.0 - 2.0 * flips.float()
        angle = (_uniform(*self.degrees, n, generator, device) if self.degrees is not None
                 else torch.zeros(n, device=device))
        return affine_matrices(scale, aspect, shift, flip, angle)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None = None, *,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augmented ``(images, masks)``; ``images`` float (B, 3, S, S) in [0, 1] on ``generator``'s device."""
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float (B, 3, H, W) batch in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if masks is not None and (masks.ndim != 4 or masks.shape[0] != images.shape[0]
                                  or masks.shape[-2:] != images.shape[-2:]):
            raise ValueError(f"masks must be (B, L, H, W) matching images {tuple(images.shape)}, "
                             f"got {tuple(masks.shape)}")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"BatchAugment needs square images (normalised coordinates), got {tuple(images.shape)}")
        n, device = images.shape[0], images.device
        images, masks = warp(images, self.geometry(n, generator, device), masks)
        if self.jitter is not None:
            factors = [_uniform(max(0.0, 1 - j), 1 + j, n, generator, device) for j in self.jitter]
            images = jitter_colours(images, *factors)
        return images, masks
