"""Tests for fundus_lib.models.lnet: L-Net variants, FCN / U-Net baselines, patch-based prediction."""
from __future__ import annotations

import copy
from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fundus_lib.models.lnet as lnet_module
from fundus_lib.models.backbones import build_backbone
from fundus_lib.models.lnet import (FCN, LNet, UNet, VARIANTS, predict_patches, tapped_stages, to_patches,
                                   window_starts)

SIZE = (99, 120)  # odd, non-square: Inception-v3 maps are not powers of two of the input
EXPECTED_TAPS = {
    "32s": ("Mixed_7c",),
    "16s": ("Mixed_7c", "Mixed_6e"),
    "8s": ("Mixed_7c", "Mixed_6e", "Mixed_5d"),
    "4s": ("Mixed_7c", "Mixed_6e", "Mixed_5d", "Conv2d_4a_3x3"),
    "2s": ("Mixed_7c", "Mixed_6e", "Mixed_5d", "Conv2d_4a_3x3", "Conv2d_2b_3x3"),
}


@lru_cache(maxsize=None)
def _built_once(name: str, weights, in_channels: int):
    return build_backbone(name, weights=weights, in_channels=in_channels)


@pytest.fixture(scope="module", autouse=True)
def fast_backbones():
    """Initialise each random backbone once and hand out copies (Inception-v3's init dominates test time)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lnet_module, "build_backbone",
                      lambda name, weights=None, in_channels=3: copy.deepcopy(_built_once(name, weights, in_channels)))
        yield


@pytest.fixture(scope="module")
def lnets() -> dict[str, LNet]:
    torch.manual_seed(0)
    return {variant: LNet(variant).eval() for variant in VARIANTS}


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lnet_variant_shapes_taps_and_presence(lnets, image, variant):
    model = lnets[variant]
    calls = []
    original_forward = model.encoder.forward
    model.encoder.forward = lambda x, stages=None: calls.append(tuple(stages)) or original_forward(x, stages)
    try:
        with torch.no_grad():
            out = model(image)
    finally:
        del model.encoder.forward
    assert calls == [EXPECTED_TAPS[variant]]
    assert out["masks"].shape == (2, 8, *SIZE)
    assert out["presence"].shape == (2, 8)
    # Eq. 1: presence probability = global max of the probability maps
    torch.testing.assert_close(torch.sigmoid(out["presence"]), torch.sigmoid(out["masks"]).amax(dim=(2, 3)))
    # the expansive path: one channel-adjusting 1x1 conv per merged map, then a 1x1 head on the concatenation
    decoder = model.decoder
    assert len(decoder.adjust) == len(EXPECTED_TAPS[variant]) - 1
    shallowest = model.encoder.channels[EXPECTED_TAPS[variant][-1]]
    assert decoder.head.in_channels == (shallowest if variant == "32s" else 2 * shallowest)
    assert decoder.head.out_channels == 8


def test_lnet_upsampling_is_1x1_conv_plus_bilinear_no_deconvolution(lnets):
    for model in lnets.values():
        assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())
        assert all(conv.kernel_size == (1, 1) for conv in model.decoder.modules() if isinstance(conv, nn.Conv2d))


def test_lnet_trains_end_to_end(lnets, image):
    model = lnets["16s"]
    model.zero_grad()
    model(image)["masks"].mean().backward()
    assert model.encoder.Conv2d_1a_3x3.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    model.zero_grad()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="variant"):
        LNet("64s")
    with pytest.raises(ValueError, match="variant"):
        FCN("4s")
    with pytest.raises(ValueError, match="n_lesions"):
        LNet(n_lesions=0)
    fake = SimpleNamespace(name="fake", stages=("a", "b", "c"), strides={"a": 4, "b": 4, "c": 8})
    assert tapped_stages(fake, 4) == ("c", "b")  # deepest stage of each stride
    with pytest.raises(ValueError, match="stride 2"):
        tapped_stages(fake, 2)


def test_fcn_skip_scores_start_at_zero_and_fuse_by_addition(image):
    torch.manual_seed(2)
    fcn8 = FCN("8s").eval()
    assert fcn8.taps == EXPECTED_TAPS["8s"]
    with torch.no_grad():
        features = fcn8.encoder(image, stages=fcn8.taps)
        coarse = fcn8.decoder.scores[0](features["Mixed_7c"])
        for stage in ("Mixed_6e", "Mixed_5d"):  # zero skip scores: only the stride-32 score, upsampled
            coarse = F.interpolate(coarse, size=features[stage].shape[-2:], mode="bilinear", align_corners=False)
        expected = F.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)
        torch.testing.assert_close(fcn8(image)["masks"], expected, rtol=1e-4, atol=1e-3)
        # a skip score is added: a constant score on Mixed_5d shifts every output pixel by that constant
        fcn8.decoder.scores[2].bias.fill_(1.5)
        torch.testing.assert_close(fcn8(image)["masks"], expected + 1.5, rtol=1e-4, atol=1e-3)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in fcn8.modules())


def test_unet_decoder_shapes_and_widths(image):
    model = UNet(n_lesions=4, decoder_channels=(32, 16, 16, 8)).eval()
    assert model.taps == EXPECTED_TAPS["2s"]
    with torch.no_grad():
        out = model(image)
    assert out["masks"].shape == (2, 4, *SIZE) and out["presence"].shape == (2, 4)
    assert [block[1][0].out_channels for block in model.decoder.blocks] == [32, 16, 16, 8]
    with pytest.raises(ValueError, match="decoder_channels"):
        UNet(decoder_channels=(32, 16))


class LogitsAreInput(nn.Module):
    """Identity-like model: its mask logits are the input channels themselves."""

    def forward(self, x):
        return {"masks": x}


class PatchMean(nn.Module):
    """Position-dependent model: every pixel's logit is the mean of its window (per channel)."""

    def forward(self, x):
        return {"masks": x.mean(dim=(2, 3), keepdim=True).expand_as(x)}


def test_to_patches_cuts_raster_order_windows():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    patches = to_patches(images, window=4, stride=4)
    assert patches.shape == (8, 1, 4, 4)
    torch.testing.assert_close(patches[1], images[0, :, 0:4, 4:8])
    torch.testing.assert_close(patches[6], images[1, :, 4:8, 0:4])


@pytest.mark.parametrize("height,width", [(10, 10), (11, 13)])  # windows tile exactly / last one moved back
def test_predict_patches_identity_model_gives_sigmoid_of_input(height, width):
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    probs = predict_patches(LogitsAreInput(), images, window=4, stride=3, batch_size=5)
    torch.testing.assert_close(probs, torch.sigmoid(images))


def test_predict_patches_averages_overlapping_windows():
    images = torch.randn(1, 2, 9, 11, generator=torch.Generator().manual_seed(4))
    window, stride = 5, 2
    probs = predict_patches(PatchMean(), images, window=window, stride=stride)
    total = torch.zeros(1, 2, 9, 11)
    count = torch.zeros(1, 1, 9, 11)
    for top in range(0, 9 - window + 1, stride):
        for left in range(0, 11 - window + 1, stride):
            crop = images[:, :, top:top + window, left:left + window]
            total[:, :, top:top + window, left:left + window] += torch.sigmoid(crop.mean(dim=(2, 3), keepdim=True))
            count[:, :, top:top + window, left:left + window] += 1
    assert count.min() >= 1 and count.max() > 1  # overlaps exist and everything is covered
    torch.testing.assert_close(probs, total / count)
    with pytest.raises(ValueError, match="window"):
        predict_patches(PatchMean(), images, window=12, stride=2)
    with pytest.raises(ValueError, match="stride"):
        predict_patches(PatchMean(), images, window=4, stride=5)


class SmallConvNet(nn.Module):
    """A model with a 5x5 receptive field and zero padding: its output near a window's edge depends on
    where the window was cut, so a wrong window position or a padded border changes the result."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return {"masks": 3 * self.net(x)}


def test_window_starts_cover_the_axis_without_leaving_it():
    assert window_starts(10, 4, 3) == [0, 3, 6]  # 6 + 4 = 10: exact tiling
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # the last window ends at the border
    assert window_starts(4, 4, 2) == [0]


@pytest.mark.parametrize("height,width,window,stride", [(19, 23, 8, 5), (16, 16, 8, 4), (9, 30, 9, 7)])
def test_predict_patches_equals_a_direct_overlap_average(height, width, window, stride):
    """Reference: cut every window of the image by hand (offsets every ``stride`` plus one flush with the
    border), run the model on each alone, and average the sigmoid scores per pixel."""
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(7))
    model = SmallConvNet().eval()
    rows = sorted(set(range(0, height - window + 1, stride)) | {height - window})
    cols = sorted(set(range(0, width - window + 1, stride)) | {width - window})
    total = torch.zeros(2, 2, height, width)
    count = torch.zeros(2, 1, height, width)
    with torch.no_grad():
        for top in rows:
            for left in cols:
                crop = images[:, :, top:top + window, left:left + window]
                total[:, :, top:top + window, left:left + window] += torch.sigmoid(model(crop)["masks"])
                count[:, :, top:top + window, left:left + window] += 1
    model.calls.clear()
    probs = predict_patches(model, images, window=window, stride=stride, batch_size=3)
    torch.testing.assert_close(probs, total / count)
    n_windows = 2 * len(rows) * len(cols)
    assert sum(model.calls) == n_windows and max(model.calls) <= 3  # every window once, in batches of 3


def test_predict_patches_with_one_window_is_the_whole_image_prediction():
    images = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    model = SmallConvNet().eval()
    with torch.no_grad():
        whole = torch.sigmoid(model(images)["masks"])
    torch.testing.assert_close(predict_patches(model, images, window=12, stride=6), whole)
    with pytest.raises(ValueError, match="batch_size"):
        predict_patches(model, images, window=12, stride=6, batch_size=0)
