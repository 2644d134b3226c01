"""Joint image + mask transforms that keep lesion masks aligned with the photograph.

Everything geometric is built on :mod:`torchvision.transforms.v2`: a transform called as
``transform(image, masks)`` with a :class:`tv_tensors.Image` and a :class:`tv_tensors.Mask`
applies the *same* random flip / rotation / crop to both (images are interpolated bilinearly,
masks with nearest neighbour so they stay binary), while photometric transforms such as
:class:`~torchvision.transforms.v2.ColorJitter` touch images only. Randomness comes from torch's
global generator, so ``torch.manual_seed`` (or :func:`fundus_lib.utils.seed_everything` plus
:func:`~fundus_lib.utils.seed_worker` in DataLoader workers) makes augmentation reproducible.

Pipeline in :class:`~fundus_lib.data.datasets.FundusDataset`: read -> :func:`resize_arrays` to
the working size (NumPy, also used by the cache so cached and direct pixels are identical) ->
``transform`` (uint8 in, float in [0, 1] out for the factories below) -> :func:`normalize`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

#: ImageNet channel statistics (RGB), the default normalisation for ImageNet-pretrained backbones.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: CLPI's augmentation (Yang et al. 2022, Sec. IV-B): crop scale and aspect ratio, flips, rotation.
CLPI_SCALE: tuple[float, float] = (0.9, 1.1)
CLPI_RATIO: tuple[float, float] = (0.9, 1.1)
CLPI_DEGREES: tuple[float, float] = (0.0, 180.0)


def _check_size(image_size: int, name: str = "image_size") -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"{name} must be a positive int, got {image_size!r}")
    return int(image_size)


def _check_range(value: Sequence[float], name: str, low: float = 0.0) -> tuple[float, float]:
    if len(value) != 2 or not low < value[0] <= value[1]:
        raise ValueError(f"{name} must be a (min, max) pair with {low} < min <= max, got {value!r}")
    return float(value[0]), float(value[1])


def resize_arrays(image: np.ndarray, masks: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an (H, W, 3) uint8 image and its (L, H, W) bool masks to ``size`` x ``size``.

    The image uses area averaging when shrinking (no aliasing of small lesions into noise) and
    bilinear interpolation when enlarging; masks use exact nearest neighbour so they stay binary.
    Arrays already at the target size are returned unchanged, which makes resizing idempotent
    (a cached, pre-resized image is not touched a second time).
    """
    size = _check_size(size, "size")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
    if masks is not None and (masks.ndim != 3 or masks.shape[1:] != image.shape[:2]):
        raise ValueError(f"masks must be (L, H, W) with H, W = {image.shape[:2]}, got {masks.shape}")
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image, masks
    shrinking = size * size < height * width
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    if masks is not None and len(masks) == 0:
        masks = np.zeros((0, size, size), dtype=bool)
    elif masks is not None:
        stacked = np.ascontiguousarray(masks.transpose(1, 2, 0), dtype=np.uint8)
        resized = cv2.resize(stacked, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
        masks = resized.reshape(size, size, -1).transpose(2, 0, 1).astype(bool)
    return image, masks


def to_tv_tensors(image: np.ndarray,
                  masks: np.ndarray | None = None) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
    """Wrap an (H, W, 3) uint8 array as a (3, H, W) :class:`tv_tensors.Image` and (L, H, W) masks
    as a uint8 :class:`tv_tensors.Mask`, the types v2 transforms dispatch on."""
    image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
    mask_t = None if masks is None else tv_tensors.Mask(torch.from_numpy(masks.astype(np.uint8)))
    return image_t, mask_t


def normalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Channel-wise ``(image - mean) / std`` of a float (..., 3, H, W) image in [0, 1]."""
    if not image.is_floating_point():
        raise ValueError(f"normalize expects a float image in [0, 1], got dtype {image.dtype}")
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image - mean_t) / std_t


def denormalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Inverse of :func:`normalize` (for showing network inputs as pictures)."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return image * std_t + mean_t


class RandomScaleCrop(v2.Transform):
    """Crop a random region of ``scale`` x the image area and aspect ``ratio``, resize it to
    ``size`` x ``size``; image and masks get the same region.

    Unlike :class:`~torchvision.transforms.v2.RandomResizedCrop`, scales above 1 are honoured:
    the region then extends past the borders, which are filled with zeros (black, like the
    fundus background), i.e. the picture zooms out. CLPI uses scale and ratio (0.9, 1.1).
    """

    def __init__(self, size: int, scale: Sequence[float] = CLPI_SCALE, ratio: Sequence[float] = CLPI_RATIO) -> None:
        super().__init__()
        self.size = [_check_size(size, "size")] * 2
        self.scale = _check_range(scale, "scale")
        self.ratio = _check_range(ratio, "ratio")

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the crop box (top, left, height, width) from torch's global generator."""
        sizes = {tuple(TF.get_size(x)) for x in flat_inputs
                 if isinstance(x, (tv_tensors.Image, tv_tensors.Mask, PIL.Image.Image)) or type(x) is torch.Tensor}
        if len(sizes) != 1:
            raise ValueError(f"RandomScaleCrop needs inputs of one spatial size, got {sorted(sizes)}")
        height, width = sizes.pop()
        area = height * width * torch.empty(1).uniform_(*self.scale).item()
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = math.exp(torch.empty(1).uniform_(log_low, log_high).item()) if log_high > log_low else self.ratio[0]
        crop_w = max(1, round(math.sqrt(area * aspect)))
        crop_h = max(1, round(math.sqrt(area / aspect)))
        top = int(torch.randint(min(0, height - crop_h), max(0, height - crop_h) + 1, (1,)))
        left = int(torch.randint(min(0, width - crop_w), max(0, width - crop_w) + 1, (1,)))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Apply the box to one input; tv_tensors.Mask inputs are resized with nearest neighbour."""
        return TF.resized_crop(inpt, **params, size=self.size, interpolation=InterpolationMode.BILINEAR,
                               antialias=True)


def _to_float() -> v2.ToDtype:
    """uint8 images -> float32 in [0, 1]; masks keep their dtype."""
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def train_transform(image_size: int, *, scale: Sequence[float] | None = CLPI_SCALE,
                    ratio: Sequence[float] = CLPI_RATIO, flip: float = 0.5,
                    degrees: Sequence[float] | None = CLPI_DEGREES,
                    jitter: Sequence[float] | None = (0.1, 0.1, 0.1, 0.0)) -> v2.Compose:
    """Training augmentation: random scale-crop to ``image_size``, horizontal and vertical flips
    (probability ``flip`` each), rotation by an angle drawn from ``degrees``, colour jitter
    (brightness, contrast, saturation, hue; image only), then conversion to float in [0, 1].

    Defaults follow CLPI (the only paper of the five that publishes its augmentation) plus mild
    colour jitter for camera variation. ``scale=None`` replaces the crop by a plain resize,
    ``degrees=None`` / ``jitter=None`` / ``flip=0`` switch those steps off.
    """
    image_size = _check_size(image_size)
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
    steps: list[Any] = [RandomScaleCrop(image_size, scale, ratio) if scale is not None
                        else v2.Resize([image_size, image_size], antialias=True)]
    if flip > 0:
        steps += [v2.RandomHorizontalFlip(flip), v2.RandomVerticalFlip(flip)]
    if degrees is not None:
        if len(degrees) != 2 or degrees[0] > degrees[1]:
            raise ValueError(f"degrees must be a (min, max) pair, got {degrees!r}")
        # fill=None: grid_sample's zero padding (black corners), about twice as fast as fill=0.
        steps.append(v2.RandomRotation(list(degrees), interpolation=InterpolationMode.BILINEAR, fill=None))
    if jitter is not None:
        if len(jitter) != 4 or min(jitter) < 0:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue) >= 0, got {jitter!r}")
        steps.append(v2.ColorJitter(*jitter))
    steps.append(_to_float())
    return v2.Compose(steps)


def eval_transform(image_size: int) -> v2.Compose:
    """Deterministic evaluation transform: resize to ``image_size`` x ``image_size`` (a no-op when
    the dataset already resized) and convert to float in [0, 1]."""
    return v2.Compose([v2.Resize([_check_size(image_size)] * 2, antialias=True), _to_float()])
