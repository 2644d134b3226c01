"""fundus_lib.data.batch_augment: per-image augmentation of a whole batch on the device."""
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fundus_lib.data.batch_augment import BatchAugment, affine_matrices, jitter_colours, warp


def _identity_parts(n):
    return torch.ones(n), torch.ones(n), torch.full((n, 2), 0.5), torch.ones(n, 2)


@pytest.mark.parametrize("angle", [90.0, 30.0, 137.0])
def test_rotation_equals_torchvision_rotate(angle):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scale, aspect, shift, flip = _identity_parts(2)
    out, _ = warp(images, affine_matrices(scale, aspect, shift, flip, torch.full((2,), angle)))
    expected = TF.rotate(images, angle, interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_flips_are_exact():
    images = torch.rand(2, 3, 9, 9)
    scale, aspect, shift, _ = _identity_parts(2)
    flip = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])
    out, _ = warp(images, affine_matrices(scale, aspect, shift, flip, torch.zeros(2)))
    torch.testing.assert_close(out[0], images[0].flip(-1))
    torch.testing.assert_close(out[1], images[1].flip(-2))


def test_scale_crop_equals_torchvision_resized_crop_inside_the_border():
    images = torch.rand(1, 3, 16, 16)
    out, _ = warp(images, affine_matrices(torch.tensor([0.25]), torch.ones(1), torch.zeros(1, 2), torch.ones(1, 2),
                                          torch.zeros(1)))
    # top-left quadrant enlarged 2x; the outermost ring differs only by how the border is padded
    expected = TF.resized_crop(images, 0, 0, 8, 8, [16, 16], interpolation=InterpolationMode.BILINEAR,
                               antialias=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_colour_jitter_equals_torchvision_per_image():
    images = torch.rand(3, 3, 8, 8)
    b, c, s = torch.tensor([0.9, 1.1, 1.0]), torch.tensor([1.05, 0.95, 0.9]), torch.tensor([0.92, 1.08, 1.0])
    out = jitter_colours(images.clone(), b, c, s)
    for i in range(3):
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(images[i], float(b[i])),
                                                           float(c[i])), float(s[i]))
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)


def _blobs(n, size, generator):
    """Masks of random rectangles and images whose red channel is exactly the first mask."""
    masks = torch.zeros(n, 2, size, size, dtype=torch.uint8)
    for i in range(n):
        for lesion in range(2):
            top, left = torch.randint(4, size - 20, (2,), generator=generator).tolist()
            masks[i, lesion, top:top + 12, left:left + 16] = 1
    images = torch.rand(n, 3, size, size, generator=generator) * 0.3
    images[:, 0] = masks[:, 0].float()
    return images, masks


def test_masks_stay_aligned_with_their_image_under_every_random_step():
    generator = torch.Generator().manual_seed(1)
    images, masks = _blobs(8, 64, generator)
    augment = BatchAugment(jitter=None)
    out, out_masks = augment(images, masks, generator=torch.Generator().manual_seed(2))
    assert out_masks.dtype == torch.uint8 and set(out_masks.unique().tolist()) <= {0, 1}
    red = out[:, 0] > 0.5
    agreement = (red == out_masks[:, 0].bool()).float().mean(dim=(1, 2))
    assert agreement.min() > 0.98, agreement  # only boundary pixels may differ (bilinear vs nearest)
    assert (out_masks.flatten(1).sum(1) > 0).all()  # the lesions survive the crop
    assert not torch.equal(out_masks, masks)  # and something did move


def test_each_image_gets_its_own_draw_and_a_seed_gives_the_same_batch():
    image = torch.rand(1, 3, 32, 32)
    batch = image.repeat(6, 1, 1, 1)
    augment = BatchAugment()
    first, _ = augment(batch, generator=torch.Generator().manual_seed(5))
    second, _ = augment(batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    differences = [(first[0] - first[i]).abs().max().item() for i in range(1, 6)]
    assert min(differences) > 1e-3
    assert first.min() >= 0 and first.max() <= 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="hue"):
        BatchAugment(jitter=(0.1, 0.1, 0.1, 0.05))
    with pytest.raises(ValueError, match="flip"):
        BatchAugment(flip=1.5)
    with pytest.raises(ValueError, match="float"):
        BatchAugment()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), generator=torch.Generator())
    with pytest.raises(ValueError, match="square"):
        BatchAugment()(torch.zeros(1, 3, 8, 9), generator=torch.Generator())
