"""torchvision CNNs as feature extractors with named stages.

Every paper in the course puts its own heads, attention modules, CAMs or decoders on top of a
standard ImageNet CNN. :func:`build_backbone` wraps torchvision's ResNet-18/34/50, DenseNet-121/161
and Inception-v3 (classification heads removed) into a :class:`Backbone` whose forward returns the
feature maps of the *named stages* a caller asks for, and stops after the deepest one:

================  =====================================================  ======================
family            stages (forward order)                                 nominal output strides
================  =====================================================  ======================
resnet18/34/50    stem, layer1, layer2, layer3, layer4                   4, 4, 8, 16, 32
densenet121/161   denseblock1 .. denseblock4 (last: final norm + ReLU)   4, 8, 16, 32
inception_v3      Conv2d_2b_3x3, Conv2d_4a_3x3, Mixed_5d, Mixed_6e,      2, 4, 8, 16, 32
                  Mixed_7c  (aux classifier dropped, no input transform)
================  =====================================================  ======================

The wrapped modules keep torchvision's attribute names, so a :class:`Backbone` state dict has
torchvision's keys minus the classifier: an ImageNet checkpoint file from torchvision and a saved
``Backbone.state_dict()`` load the same way.

Weights: ``None`` (random init, never touches the network), ``"imagenet"`` (torchvision's
IMAGENET1K_V1 checkpoint — the weights of the papers' era — read from the torch hub cache or
downloaded into it; a clear :class:`BackboneWeightsError` says which file to place where when
neither works) or a path to a state-dict file. For ``in_channels != 3`` the first convolution is
adapted (see :func:`adapt_first_conv`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torchvision
from torch import Tensor, nn

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "densenet121", "densenet161", "inception_v3",
                              "densenet_small")

#: ``densenet_small``: DenseNet-121's design (7x7 stem, four dense blocks of BN-ReLU-1x1-BN-ReLU-3x3
#: layers, transitions halving width and size, output stride 32) with growth 16 instead of 32 and
#: 2-4-6-4 dense layers instead of 6-12-24-16: 0.27 M instead of 7.0 M parameters, about 8x faster
#: on a CPU. In no paper: CPU profiles use it where DenseNet-121 does not fit their budget (CLPI's
#: quick profile). No ImageNet checkpoint exists for it.
SMALL_DENSENET: dict = {"growth_rate": 16, "block_config": (2, 4, 6, 4), "num_init_features": 32}

# torchvision's original ImageNet weights (IMAGENET1K_V1), the checkpoints the papers fine-tuned.
_IMAGENET = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
    "densenet161": torchvision.models.DenseNet161_Weights.IMAGENET1K_V1,
    "inception_v3": torchvision.models.Inception_V3_Weights.IMAGENET1K_V1,
}
# Keys of the removed classification heads; they may appear in a checkpoint and are ignored.
_HEAD_PREFIXES: tuple[str, ...] = ("fc.", "classifier.", "AuxLogits.")
# Old DenseNet checkpoints name dense-layer modules "norm.1", "conv.2", ... (see torchvision).
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the architecture."""


class Backbone(nn.Module):
    """A CNN trunk whose forward returns named stage outputs.

    Attributes:
        name: the architecture name (one of :data:`BACKBONES`).
        stages: stage names in forward order.
        channels: output channels of each stage.
        strides: nominal output stride of each stage (input size / feature size, before rounding).
        out_channels: channels of the last stage.
        first_conv: dotted name of the first convolution (the one :func:`adapt_first_conv` edits).
    """

    def __init__(self, name: str, modules: Mapping[str, nn.Module], plan: Mapping[str, Sequence[str]],
                 channels: Mapping[str, int], strides: Mapping[str, int], first_conv: str) -> None:
        super().__init__()
        for key, module in modules.items():
            self.add_module(key, module)
        self.name = name
        self.stages: tuple[str, ...] = tuple(plan)
        self.channels: dict[str, int] = {stage: int(channels[stage]) for stage in self.stages}
        self.strides: dict[str, int] = {stage: int(strides[stage]) for stage in self.stages}
        self.out_channels: int = self.channels[self.stages[-1]]
        self.first_conv = first_conv
        # Submodule paths run by each stage; resolved at call time so no module is registered twice.
        self._plan: dict[str, tuple[str, ...]] = {stage: tuple(paths) for stage, paths in plan.items()}

    def forward(self, x: Tensor, stages: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Feature maps of ``stages`` (default: only the last stage), computed up to the deepest one."""
        wanted = (self.stages[-1],) if stages is None else tuple(stages)
        unknown = [stage for stage in wanted if stage not in self.channels]
        if unknown or not wanted:
            raise ValueError(f"stages must be a non-empty subset of {self.stages} for {self.name}, got {wanted!r}")
        deepest = max(self.stages.index(stage) for stage in wanted)
        features: dict[str, Tensor] = {}
        for stage in self.stages[: deepest + 1]:
            for path in self._plan[stage]:
                x = self.get_submodule(path)(x)
            if stage in wanted:
                features[stage] = x
        return features

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stages={self.stages}, out_channels={self.out_channels}"


def _resnet(name: str) -> Backbone:
    net = getattr(torchvision.models, name)(weights=None)
    expansion = type(net.layer1[0]).expansion
    plan = {"stem": ("conv1", "bn1", "relu", "maxpool"),
            **{f"layer{k}": (f"layer{k}",) for k in range(1, 5)}}
    channels = {"stem": 64, **{f"layer{k}": 64 * 2 ** (k - 1) * expansion for k in range(1, 5)}}
    strides = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    modules = {key: getattr(net, key) for key in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")}
    return Backbone(name, modules, plan, channels, strides, first_conv="conv1")


def _densenet(name: str) -> Backbone:
    if name == "densenet_small":
        features = torchvision.models.DenseNet(**SMALL_DENSENET).features
    else:
        features = getattr(torchvision.models, name)(weights=None).features
    plan = {
        "denseblock1": ("features.conv0", "features.norm0", "features.relu0", "features.pool0", "features.denseblock1"),
        "denseblock2": ("features.transition1", "features.denseblock2"),
        "denseblock3": ("features.transition2", "features.denseblock3"),
        # torchvision applies the final ReLU functionally; a parameter-free module stands in for it.
        "denseblock4": ("features.transition3", "features.denseblock4", "features.norm5", "final_relu"),
    }
    # A dense block's output width is the input width of the following transition's norm.
    channels = {f"denseblock{k}": getattr(features, f"transition{k}").norm.num_features for k in (1, 2, 3)}
    channels["denseblock4"] = features.norm5.num_features
    strides = {"denseblock1": 4, "denseblock2": 8, "denseblock3": 16, "denseblock4": 32}
    return Backbone(name, {"features": features, "final_relu": nn.ReLU()}, plan, channels, strides,
                    first_conv="features.conv0")


def _inception_v3(name: str) -> Backbone:
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True)
    plan = {
        "Conv2d_2b_3x3": ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
        "Conv2d_4a_3x3": ("maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3"),
        "Mixed_5d": ("maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d"),
        "Mixed_6e": ("Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
        "Mixed_7c": ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
    }
    channels = {"Conv2d_2b_3x3": 64, "Conv2d_4a_3x3": 192, "Mixed_5d": 288, "Mixed_6e": 768, "Mixed_7c": 2048}
    strides = {"Conv2d_2b_3x3": 2, "Conv2d_4a_3x3": 4, "Mixed_5d": 8, "Mixed_6e": 16, "Mixed_7c": 32}
    modules = {path: getattr(net, path) for paths in plan.values() for path in paths}
    return Backbone(name, modules, plan, channels, strides, first_conv="Conv2d_1a_3x3.conv")


_FACTORIES: dict[str, Callable[[str], Backbone]] = {
    "resnet18": _resnet, "resnet34": _resnet, "resnet50": _resnet,
    "densenet121": _densenet, "densenet161": _densenet, "inception_v3": _inception_v3, "densenet_small": _densenet,
}


def adapted_conv_weight(weight: Tensor, in_channels: int) -> Tensor:
    """First-convolution filters for ``in_channels`` inputs from filters trained on 3 (RGB) inputs.

    ``in_channels == 1``: the RGB filters are summed, so a grey image gives exactly the response the
    original convolution gives to that image repeated on R, G and B. Otherwise the RGB filters are
    tiled (input channel ``c`` takes filter ``c % 3``) and scaled by ``3 / in_channels`` so the
    activation scale stays that of the pretrained network.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels, device=weight.device) % weight.shape[1]
    return weight[:, index] * (weight.shape[1] / in_channels)


def adapt_first_conv(backbone: Backbone, in_channels: int) -> None:
    """Replace the backbone's first convolution by one taking ``in_channels`` inputs, in place.

    The new filters come from the current ones by :func:`adapted_conv_weight` (pretrained or random).
    """
    parent_path, _, attr = backbone.first_conv.rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    old: nn.Conv2d = getattr(parent, attr)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapted_conv_weight(old.weight, in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, attr, new)


def imagenet_checkpoint(name: str) -> tuple[str, Path]:
    """(download URL, expected cache path) of torchvision's ImageNet checkpoint for ``name``."""
    if name not in _IMAGENET:
        raise ValueError(f"no ImageNet checkpoint for backbone {name!r}; backbones with one: {sorted(_IMAGENET)}")
    url = _IMAGENET[name].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_imagenet_state(name: str) -> dict[str, Tensor]:
    url, cached = imagenet_checkpoint(name)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, map_location="cpu",
                                                  weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
        raise BackboneWeightsError(
            f"ImageNet weights for {name!r} are not in the torch hub cache and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download {url} on a machine with network access and place "
            f"the file {cached.name!r} in the torch hub checkpoints directory {str(cached.parent)!r} "
            f"(set TORCH_HOME to use another directory), or pass weights=<path to the file>."
        ) from exc


def _load_file_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist "
                                f"(weights must be None, 'imagenet' or the path of a state-dict file)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneWeightsError(f"weights file {str(path)!r} must hold a state dict (parameter name -> tensor)")
    return dict(state)


def _clean_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop classification-head keys and rename old-style DenseNet keys."""
    return {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()
            if not key.startswith(_HEAD_PREFIXES)}


def _load_state(backbone: Backbone, state: Mapping[str, Tensor], in_channels: int, source: str) -> None:
    """Load ``state`` (3-channel or ``in_channels``-channel first conv), then adapt the first conv."""
    state = _clean_state(state)
    key = f"{backbone.first_conv}.weight"
    if key not in state:
        raise BackboneWeightsError(f"{source} has no key {key!r}: it is not a {backbone.name} state dict")
    source_channels = state[key].shape[1]
    if source_channels not in (3, in_channels):
        raise BackboneWeightsError(f"{source} has a first convolution with {source_channels} input channels; "
                                   f"expected 3 (adapted to in_channels={in_channels}) or {in_channels}")
    if source_channels == in_channels:
        adapt_first_conv(backbone, in_channels)
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneWeightsError(f"{source} does not match {backbone.name}: missing keys {result.missing_keys[:5]}, "
                                   f"unexpected keys {result.unexpected_keys[:5]}")
    adapt_first_conv(backbone, in_channels)


def build_backbone(name: str, weights: None | str | Path = None, in_channels: int = 3) -> Backbone:
    """Build backbone ``name`` (one of :data:`BACKBONES`) with ``weights`` and ``in_channels`` inputs.

    Args:
        name: architecture.
        weights: ``None`` for random initialisation, ``"imagenet"`` for torchvision's ImageNet
            weights (from the torch hub cache, downloaded when missing), or a path to a state-dict
            file (torchvision checkpoint or a saved ``Backbone.state_dict()``).
        in_channels: input channels; for ``!= 3`` the first convolution is adapted.

    Raises:
        ValueError: unknown name or ``in_channels < 1``.
        TypeError: ``weights`` is neither None nor a string / path.
        FileNotFoundError: ``weights`` is a path (any string but "imagenet") that does not exist.
        BackboneWeightsError: ImageNet weights unavailable offline, or a state dict that does not fit.
    """
    if name not in _FACTORIES:
        raise ValueError(f"backbone name must be one of {BACKBONES}, got {name!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    backbone = _FACTORIES[name](name)
    if weights is None:
        adapt_first_conv(backbone, in_channels)
    elif weights == "imagenet":
        _load_state(backbone, _load_imagenet_state(name), in_channels, f"the ImageNet checkpoint of {name}")
    elif isinstance(weights, (str, Path)):
        _load_state(backbone, _load_file_state(Path(weights)), in_channels, f"weights file {str(weights)!r}")
    else:
        raise TypeError(f"weights must be None, 'imagenet' or a path to a state-dict file, got {weights!r}")
    return backbone
