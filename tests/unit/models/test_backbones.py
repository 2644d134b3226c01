"""Tests for fundus_lib.models.backbones: stages, shapes, strides, input channels and weight loading."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from fundus_lib.models.backbones import (BACKBONES, BackboneWeightsError, adapted_conv_weight, build_backbone,
                                         imagenet_checkpoint)

EXPECTED_STAGES = {
    "resnet18": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "densenet121": ("denseblock1", "denseblock2", "denseblock3", "denseblock4"),
    "inception_v3": ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"),
}
# torchvision's published widths: ResNet-50 bottlenecks expand x4; DenseNet-161 grows by 48.
EXPECTED_CHANNELS = {
    "resnet34": (64, 64, 128, 256, 512),
    "resnet50": (64, 256, 512, 1024, 2048),
    "densenet121": (256, 512, 1024, 1024),
    "densenet161": (384, 768, 2112, 2208),
    "inception_v3": (64, 192, 288, 768, 2048),
}
# Inception-v3 uses unpadded convolutions and pools: 299 -> 149 -> 147 -> 73 -> 71 -> 35 -> 17 -> 8.
INCEPTION_SIZES = (147, 71, 35, 17, 8)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub directory and a download function that fails as without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("name", BACKBONES)
def test_stage_shapes_channels_and_strides(name):
    """Every stage's map has the declared channels and input_size // stride pixels (shape-only, on meta)."""
    size = 299 if name == "inception_v3" else 224
    with torch.device("meta"):
        backbone = build_backbone(name)
        features = backbone(torch.empty(2, 3, size, size), stages=backbone.stages)
    assert tuple(features) == backbone.stages
    if name in EXPECTED_STAGES:
        assert backbone.stages == EXPECTED_STAGES[name]
    if name in EXPECTED_CHANNELS:
        assert tuple(backbone.channels.values()) == EXPECTED_CHANNELS[name]
    for index, (stage, fmap) in enumerate(features.items()):
        expected = INCEPTION_SIZES[index] if name == "inception_v3" else size // backbone.strides[stage]
        assert tuple(fmap.shape) == (2, backbone.channels[stage], expected, expected), stage
    assert backbone.out_channels == backbone.channels[backbone.stages[-1]]
    assert list(backbone.strides.values()) == sorted(backbone.strides.values())


def test_forward_default_is_last_stage_and_stops_after_deepest_requested():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18").eval()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    backbone.layer3.register_forward_hook(lambda *args: calls.append("layer3"))
    features = backbone(x, stages=["layer2", "stem"])
    assert set(features) == {"stem", "layer2"} and calls == []
    with torch.no_grad():
        reference = backbone.layer2(backbone.layer1(backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))))
    torch.testing.assert_close(features["layer2"], reference)
    assert list(backbone(x)) == ["layer4"] and calls == ["layer3"]
    with pytest.raises(ValueError, match="stages"):
        backbone(x, stages=["layer5"])


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v3"])
@pytest.mark.parametrize("in_channels", [1, 4])
def test_other_input_channel_counts_build_and_run(name, in_channels):
    size = 299 if name == "inception_v3" else 224
    with torch.device("meta"):
        backbone = build_backbone(name, in_channels=in_channels)
        out = backbone(torch.empty(1, in_channels, size, size))
    assert backbone.get_submodule(backbone.first_conv).in_channels == in_channels
    assert out[backbone.stages[-1]].shape[1] == backbone.out_channels


def test_in_channels_runs_on_real_tensors():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=4).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 4, 64, 64))["layer4"]
    assert out.shape == (2, 512, 2, 2) and torch.isfinite(out).all()


def test_first_conv_adaptation_rule_on_loaded_weights(tmp_path):
    """4 inputs: RGB filters tiled (R, G, B, R) and scaled by 3/4; 1 input: exact grey-image equivalence."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    rgb = source.conv1.weight.detach()

    four = build_backbone("resnet18", weights=path, in_channels=4)
    torch.testing.assert_close(four.conv1.weight, rgb[:, [0, 1, 2, 0]] * 0.75)
    torch.testing.assert_close(four.layer4[1].conv2.weight, source.layer4[1].conv2.weight)

    grey = build_backbone("resnet18", weights=path, in_channels=1)
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey.conv1(image), source.conv1(image.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)
    assert adapted_conv_weight(rgb, 3).equal(rgb)
    with pytest.raises(ValueError, match="in_channels"):
        adapted_conv_weight(rgb, 0)


@pytest.mark.parametrize("in_channels", [3, 4])
def test_saved_state_dict_round_trips(tmp_path, in_channels):
    torch.manual_seed(1)
    original = build_backbone("resnet18", in_channels=in_channels)
    path = tmp_path / "backbone.pth"
    torch.save(original.state_dict(), path)
    loaded = build_backbone("resnet18", weights=str(path), in_channels=in_channels)
    expected = original.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_torchvision_densenet_checkpoint_with_old_keys_and_classifier_loads(tmp_path):
    """Old torchvision DenseNet checkpoints name layers 'norm.1'; their classifier is ignored."""
    torch.manual_seed(2)
    source = torchvision.models.densenet121(weights=None)
    old_style = {key.replace("norm1", "norm.1").replace("conv2", "conv.2"): value
                 for key, value in source.state_dict().items()}
    assert any(".norm.1." in key for key in old_style) and "classifier.weight" in old_style
    path = tmp_path / "densenet121-old.pth"
    torch.save(old_style, path)
    backbone = build_backbone("densenet121", weights=path)
    torch.testing.assert_close(backbone.features.denseblock3.denselayer5.norm1.weight,
                               source.features.denseblock3.denselayer5.norm1.weight)
    torch.testing.assert_close(backbone.features.denseblock4.denselayer2.conv2.weight,
                               source.features.denseblock4.denselayer2.conv2.weight)


def test_imagenet_offline_raises_clear_error(offline_hub):
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone("resnet18", weights="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(offline_hub) in message and "TORCH_HOME" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert imagenet_checkpoint("resnet50")[1] == offline_hub / "resnet50-0676ba61.pth"


def test_imagenet_weights_are_read_from_the_hub_cache(offline_hub):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    offline_hub.mkdir(parents=True)
    torch.save(source.state_dict(), offline_hub / "resnet18-f37072fd.pth")
    backbone = build_backbone("resnet18", weights="imagenet")
    torch.testing.assert_close(backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(backbone.bn1.running_var, source.bn1.running_var)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="backbone name"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", in_channels=0)
    with pytest.raises(FileNotFoundError, match="imagnet"):
        build_backbone("resnet18", weights="imagnet")
    with pytest.raises(TypeError, match="weights"):
        build_backbone("resnet18", weights=3)
    path = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "head.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(BackboneWeightsError, match="does not match resnet18"):
        build_backbone("resnet18", weights=path)
    torch.save({"conv1.weight": torch.zeros(64, 4, 7, 7)}, path)
    with pytest.raises(BackboneWeightsError, match="4 input channels"):
        build_backbone("resnet18", weights=path, in_channels=2)
    with pytest.raises(BackboneWeightsError, match="no key 'features.conv0.weight'"):
        build_backbone("densenet121", weights=path)
