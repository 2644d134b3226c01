"""Joint image + mask transforms: alignment, image-only colour jitter, reproducibility, resizing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision import tv_tensors
from torchvision.transforms import v2

from fundus_lib.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomScaleCrop, denormalize, eval_transform,
                                        normalize, resize_arrays, to_tv_tensors, train_transform)
from fundus_lib.utils import torch_threads


def square_pair(size: int = 64, top: int = 10, left: int = 36, side: int = 14):
    """A black image with a white square off-centre and a 2-lesion mask stack marking that square
    (lesion 0) and nothing else (lesion 1)."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[top:top + side, left:left + side] = 255
    masks = np.zeros((2, size, size), dtype=bool)
    masks[0, top:top + side, left:left + side] = True
    return to_tv_tensors(image, masks)


def dilate(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=pixels)


def assert_aligned(image: torch.Tensor, masks: torch.Tensor) -> None:
    """The mask of lesion 0 covers the bright square of a float image, lesion 1 stays empty."""
    grey = image.mean(0).numpy()
    lesion = masks[0].numpy().astype(bool)
    assert set(np.unique(masks.numpy())) <= {0, 1}, "masks must stay binary (nearest neighbour)"
    assert not masks[1].any()
    assert lesion.sum() > 0
    # Interpolation may move an edge by one pixel, never more.
    assert np.all(dilate(lesion)[grey > 0.75]), "bright pixels outside the mask"
    assert np.all(dilate(grey > 0.25)[lesion]), "mask pixels on dark background"


def test_random_geometry_keeps_masks_on_the_bright_square():
    image, masks = square_pair()
    transform = train_transform(48, jitter=None)
    for seed in range(20):
        torch.manual_seed(seed)
        with torch_threads(1):  # tiny images: threads only add overhead on a busy machine
            out_image, out_masks = transform(image, masks)
        assert out_image.dtype == torch.float32 and out_image.shape == (3, 48, 48)
        assert out_masks.dtype == torch.uint8 and out_masks.shape == (2, 48, 48)
        assert_aligned(out_image, out_masks)


def test_flips_move_image_and_mask_together():
    image, masks = square_pair()
    out_image, out_masks = v2.RandomHorizontalFlip(p=1.0)(image, masks)
    assert torch.equal(out_image, image.flip(-1))
    assert torch.equal(out_masks, masks.flip(-1))


def test_colour_jitter_changes_the_image_but_never_the_masks():
    image, masks = square_pair()
    image = tv_tensors.Image(image // 2 + 40)  # mid-grey values: room for jitter both ways
    transform = train_transform(64, scale=None, flip=0.0, degrees=None, jitter=(0.5, 0.5, 0.5, 0.1))
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out_masks = transform(image, masks)
        assert torch.equal(out_masks, masks)
        changed += not torch.allclose(out_image, image.float() / 255)
    assert changed == 10


def test_same_seed_same_augmentation_other_seed_differs():
    image, masks = square_pair()
    transform = train_transform(48)
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outputs.append(transform(image, masks))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert not torch.equal(outputs[0][0], outputs[2][0])


def test_scale_crop_above_one_zooms_out_with_black_border():
    image = to_tv_tensors(np.full((40, 40, 3), 200, dtype=np.uint8))[0]
    out = RandomScaleCrop(40, scale=(1.44, 1.44), ratio=(1.0, 1.0))(image)
    # The 48 x 48 region holds the 40 x 40 image: about 1/6 of each side is black padding.
    border = (out[0] == 0).float()
    assert out.shape == (3, 40, 40)
    assert 0.25 < border.mean() < 0.35  # 1 - (40/48)^2 = 0.306
    assert out[0, 20, 20] == 200


def test_scale_crop_below_one_crops_inside_the_image():
    image = to_tv_tensors(np.full((40, 40, 3), 200, dtype=np.uint8))[0]
    for seed in range(5):
        torch.manual_seed(seed)
        out = RandomScaleCrop(32, scale=(0.5, 0.8), ratio=(0.8, 1.25))(image)
        assert out.shape == (3, 32, 32) and torch.all(out == 200)


def test_scale_crop_rejects_inputs_of_different_sizes():
    image = to_tv_tensors(np.zeros((40, 40, 3), dtype=np.uint8))[0]
    masks = to_tv_tensors(np.zeros((30, 30, 3), dtype=np.uint8), np.zeros((1, 30, 30), dtype=bool))[1]
    with pytest.raises(ValueError, match="one spatial size"):
        RandomScaleCrop(20)(image, masks)


def test_eval_transform_is_deterministic_resize_to_float():
    image, masks = square_pair(size=64)
    out_image, out_masks = eval_transform(32)(image, masks)
    assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
    assert 0.0 <= out_image.min() and out_image.max() <= 1.0
    assert out_masks.shape == (2, 32, 32)
    assert_aligned(out_image, out_masks)
    again = eval_transform(32)(image, masks)
    assert torch.equal(out_image, again[0]) and torch.equal(out_masks, again[1])


def test_resize_arrays_shapes_binary_masks_and_idempotence():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    masks = np.zeros((8, 30, 50), dtype=bool)
    masks[2, 10:20, 10:30] = True
    out_image, out_masks = resize_arrays(image, masks, 20)
    assert out_image.shape == (20, 20, 3) and out_image.dtype == np.uint8
    assert out_masks.shape == (8, 20, 20) and out_masks.dtype == bool
    # Nearest neighbour keeps the rectangle's area fraction up to rounding of its edges.
    assert abs(out_masks[2].mean() - masks[2].mean()) < 0.05
    assert not out_masks[[0, 1, 3, 4, 5, 6, 7]].any()
    same_image, same_masks = resize_arrays(out_image, out_masks, 20)
    assert same_image is out_image and same_masks is out_masks
    # Single-lesion and empty stacks keep their leading axis (cv2 drops or refuses those channels).
    assert resize_arrays(image, masks[:1], 16)[1].shape == (1, 16, 16)
    assert resize_arrays(image, masks[:0], 16)[1].shape == (0, 16, 16)


def test_resize_arrays_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_arrays(np.zeros((10, 10, 3), dtype=np.float32), None, 5)
    with pytest.raises(ValueError, match="masks"):
        resize_arrays(np.zeros((10, 10, 3), dtype=np.uint8), np.zeros((8, 9, 10), dtype=bool), 5)
    with pytest.raises(ValueError, match="size"):
        resize_arrays(np.zeros((10, 10, 3), dtype=np.uint8), None, 0)


def test_normalize_matches_manual_formula_and_inverts():
    image = torch.rand(3, 4, 5)
    out = normalize(image)
    expected = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(out, expected)
    assert torch.allclose(denormalize(out), image, atol=1e-6)
    with pytest.raises(ValueError, match="float"):
        normalize(torch.zeros(3, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 0}, "image_size"),
    ({"image_size": 32, "scale": (1.1, 0.9)}, "scale"),
    ({"image_size": 32, "flip": 1.5}, "flip"),
    ({"image_size": 32, "degrees": (10, 0)}, "degrees"),
    ({"image_size": 32, "jitter": (0.1, 0.1)}, "jitter"),
])
def test_train_transform_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_transform(**kwargs)
