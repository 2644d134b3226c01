"""Tests for fundus_lib.models.sian: SiAN attention / fusion variants, frozen L-Net, Lesion-Concat."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fundus_lib.models.lnet import LNet
from fundus_lib.models.sian import ConvAttention, LesionConcat, SiAN, cw_maxpool

SIZE = 107  # ResNet-18's last map is 4 x 4, Inception-v3's Mixed_7c 2 x 2 at this input size
# The variant and frozen-branch tests use ResNet-18 branches (k = 512 feature maps) to stay fast;
# test_paper_configuration checks the Inception-v3 model of the paper (k = 2048).
K = 512


@pytest.fixture(scope="module")
def lnet() -> LNet:
    torch.manual_seed(0)
    return LNet("16s", backbone="resnet18")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models(lnet) -> dict[tuple[str, str], SiAN]:
    torch.manual_seed(2)
    return {(attention, fusion): SiAN(lnet, attention=attention, fusion=fusion, backbone="resnet18",
                                               attention_hidden=16).eval()
            for attention in ("conv", "cw_maxpool") for fusion in ("feature", "input")}


def _lesion_probs(model, x):
    with torch.no_grad():
        return torch.sigmoid(model.lnet(x)["masks"])


@pytest.mark.parametrize("attention", ["conv", "cw_maxpool"])
@pytest.mark.parametrize("fusion", ["feature", "input"])
def test_sian_shapes(models, image, attention, fusion):
    with torch.no_grad():
        out = models[attention, fusion](image)
    assert out["dr"].shape == (2, 5)
    assert out["masks"].shape == (2, 8, SIZE, SIZE) and out["presence"].shape == (2, 8)
    expected = (2, K, 4, 4) if fusion == "feature" else (2, 3, SIZE, SIZE)
    assert out["attention"].shape == expected
    assert (out["attention"] >= 0).all() and (out["attention"] <= 1).all()


def test_cw_maxpool_is_channel_max_broadcast():
    maps = torch.rand(2, 8, 4, 5)
    weights = cw_maxpool(maps, k=6)
    assert weights.shape == (2, 6, 4, 5)
    for channel in range(6):
        torch.testing.assert_close(weights[:, channel], maps.max(dim=1).values)


@pytest.mark.parametrize("attention", ["conv", "cw_maxpool"])
def test_feature_fusion_follows_eq5(models, image, attention):
    """dr = FC(GAP(f * w)) with w computed from lesion maps max-pooled to the feature-map size."""
    model = models[attention, "feature"]
    with torch.no_grad():
        out = model(image)
        features = model.features(image)
        small = F.adaptive_max_pool2d(_lesion_probs(model, image), features.shape[-2:])
        weights = model.attention(small)
        if attention == "cw_maxpool":
            torch.testing.assert_close(weights, small.amax(dim=1, keepdim=True).expand_as(features))
        expected = model.fc((features * weights).mean(dim=(2, 3)))
    torch.testing.assert_close(out["attention"], weights)
    torch.testing.assert_close(out["dr"], expected)


@pytest.mark.parametrize("attention", ["conv", "cw_maxpool"])
def test_input_fusion_weights_the_image(models, image, attention):
    model = models[attention, "input"]
    with torch.no_grad():
        out = model(image)
        weights = model.attention(_lesion_probs(model, image))
        if attention == "cw_maxpool":
            torch.testing.assert_close(weights, _lesion_probs(model, image).amax(dim=1, keepdim=True).expand(-1, 3, -1, -1))
        expected = model.fc(model.features(image * weights).mean(dim=(2, 3)))
    torch.testing.assert_close(out["dr"], expected)


def test_conv_attention_is_two_3x3_convs_from_m_lesions_to_k_maps(models):
    convs = [m for m in models["conv", "feature"].attention.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
    assert convs[0].in_channels == 8 and convs[1].out_channels == K
    assert isinstance(models["conv", "input"].attention, ConvAttention)
    assert list(models["conv", "input"].attention.modules())[-2].out_channels == 3
    assert not list(models["cw_maxpool", "feature"].attention.parameters())


def test_lnet_is_frozen_and_stays_in_eval_mode(models, lnet, image):
    model = models["conv", "feature"]
    bn = next(m for m in lnet.modules() if isinstance(m, nn.BatchNorm2d))
    stats_before = bn.running_mean.clone()
    model.train()
    try:
        assert model.training and model.encoder.training and model.attention.training
        assert not lnet.training and not any(m.training for m in lnet.modules())
        assert all(not p.requires_grad for p in lnet.parameters())
        lnet_ids = {id(p) for p in lnet.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and not any(id(p) in lnet_ids for p in trainable)
        assert len(trainable) == sum(1 for p in model.parameters()) - len(lnet_ids)
        model.zero_grad()
        F.cross_entropy(model(image)["dr"], torch.tensor([0, 4])).backward()
        assert all(p.grad is None for p in lnet.parameters())
        assert model.attention.block[0].weight.grad.abs().sum() > 0
        assert model.encoder.conv1.weight.grad.abs().sum() > 0
        torch.testing.assert_close(bn.running_mean, stats_before)  # L-Net's BN statistics untouched
    finally:
        model.zero_grad()
        model.eval()


def test_lesion_concat_fc_and_forward(lnet, image):
    model = LesionConcat(lnet, backbone="resnet18").eval()
    assert model.fc.in_features == K + 8 and model.fc.out_features == 5
    with torch.no_grad():
        out = model(image)
        pooled = model.features(image).mean(dim=(2, 3))
        presence = torch.sigmoid(model.lnet(image)["presence"])
        expected = model.fc(torch.cat([pooled, presence], dim=1))
    assert out["dr"].shape == (2, 5) and out["presence"].shape == (2, 8)
    torch.testing.assert_close(out["dr"], expected)
    assert not lnet.training and all(not p.requires_grad for p in lnet.parameters())


def test_paper_configuration_inception_v3():
    """Default SiAN: Inception-v3 main branch, 2048 weight maps, untrained L-Net-16s side branch."""
    torch.manual_seed(3)
    model = SiAN().eval()
    assert model.lnet.variant == "16s" and model.encoder.name == "inception_v3"
    assert model.fc.in_features == 2048 and model.fc.out_features == 5
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    assert out["dr"].shape == (1, 5) and out["attention"].shape == (1, 2048, 2, 2)
    assert out["masks"].shape == (1, 8, SIZE, SIZE)
    assert LesionConcat(model.lnet).fc.in_features == 2048 + 8


def test_bad_arguments_raise(lnet):
    with pytest.raises(ValueError, match="attention"):
        SiAN(lnet, attention="self")
    with pytest.raises(ValueError, match="fusion"):
        SiAN(lnet, fusion="late")
    with pytest.raises(ValueError, match="n_lesions"):
        SiAN(lnet, n_lesions=4)
    with pytest.raises(ValueError, match="lnet"):
        LesionConcat(lnet=nn.Identity())
