"""SiAN, the side-attention network, and the Lesion-Concat baseline (Wei et al., ICPR 2020, Sec. 3.2, Tables 6-7).

Both graders pair an Inception-v3 main branch (GAP + one FC layer to the DR grades) with a
**frozen**, pre-trained :class:`~fundus_lib.models.lnet.LNet` (the paper's side branch is
L-Net-16s; training both branches gave no gain there). The L-Net's parameters have
``requires_grad=False`` and it stays in eval mode (BatchNorm statistics fixed) even when the grader
is switched to training, so ``[p for p in model.parameters() if p.requires_grad]`` is exactly what
an optimizer should receive; it runs under ``torch.no_grad()``.

``forward(x)`` returns

- ``"dr"``: DR-grade logits (B, n_classes) (softmax/cross-entropy outside the model);
- ``"masks"``, ``"presence"``: the L-Net's lesion-map and lesion-presence logits (see
  :mod:`fundus_lib.models.lnet`), so one forward pass does segmentation, lesion classification
  and grading;
- ``"attention"`` (SiAN only): the weight maps multiplied into the main branch, for figures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fundus_lib.models.backbones import build_backbone
from fundus_lib.models.lnet import LNet

ATTENTIONS: tuple[str, ...] = ("conv", "cw_maxpool")
FUSIONS: tuple[str, ...] = ("feature", "input")


def cw_maxpool(lesion_maps: Tensor, k: int) -> Tensor:
    """Eq. 6: every one of the ``k`` weight maps is the channel-wise max over the m lesion maps.

    Returns a (B, k, h, w) expanded view of the single (B, 1, h, w) max map (no copy).
    """
    return lesion_maps.amax(dim=1, keepdim=True).expand(-1, k, -1, -1)


class CWMaxPoolAttention(nn.Module):
    """Parameter-free attention of Eq. 6 (see :func:`cw_maxpool`)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, lesion_maps: Tensor) -> Tensor:
        return cw_maxpool(lesion_maps, self.k)


class ConvAttention(nn.Module):
    """Eq. 7: a light block of two 3x3 convolutions, m lesion maps -> ``hidden`` -> k weight maps.

    The paper gives neither the middle width nor the activations; here ReLU follows the first
    convolution and a sigmoid the second, so the learned weights lie in [0, 1] like the
    probabilities CW-MaxPool uses, while (unlike CW-MaxPool) they can keep lesion-free regions.
    """

    def __init__(self, n_lesions: int, k: int, hidden: int = 128) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(n_lesions, hidden, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, k, kernel_size=3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, lesion_maps: Tensor) -> Tensor:
        return self.block(lesion_maps)


class LesionGuidedGrader(nn.Module):
    """Shared part of SiAN and Lesion-Concat: the Inception-v3 main branch and the frozen L-Net.

    ``lnet=None`` builds an untrained L-Net-16s (for shapes, tests and smoke runs); real use passes
    a trained one. ``weights`` initialise the main branch (None, "imagenet" or a path).
    """

    def __init__(self, lnet: LNet | None, n_classes: int, backbone: str, weights, in_channels: int,
                 n_lesions: int) -> None:
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        if lnet is None:
            lnet = LNet("16s", n_lesions=n_lesions, backbone=backbone, in_channels=in_channels)
        elif not isinstance(lnet, LNet):
            raise ValueError(f"lnet must be an LNet or None, got {type(lnet).__name__}")
        elif lnet.n_lesions != n_lesions:
            raise ValueError(f"lnet predicts {lnet.n_lesions} lesions but n_lesions={n_lesions}")
        self.lnet = lnet.requires_grad_(False).eval()
        self.encoder = build_backbone(backbone, weights=weights, in_channels=in_channels)
        self.feature_stage = self.encoder.stages[-1]
        self.n_lesions = n_lesions
        self.n_classes = n_classes

    def train(self, mode: bool = True) -> "LesionGuidedGrader":
        """Switch the main branch's mode; the frozen L-Net always stays in eval mode."""
        super().train(mode)
        self.lnet.eval()
        return self

    def lesions(self, x: Tensor) -> dict[str, Tensor]:
        """The frozen L-Net's outputs (mask and presence logits), computed without gradients."""
        with torch.no_grad():
            return self.lnet(x)

    def features(self, x: Tensor) -> Tensor:
        """The main branch's last feature maps (B, 2048, h, w) for Inception-v3."""
        return self.encoder(x, stages=(self.feature_stage,))[self.feature_stage]


class SiAN(LesionGuidedGrader):
    """Side-Attention Network (Fig. 3, Eq. 5-7): lesion maps re-weight the main branch.

    ``fusion="feature"`` (the paper's final model): the lesion probability maps are down-sampled to
    the last feature maps' size by adaptive max pooling (a max keeps a 10-pixel microaneurysm
    visible in a 32x32 cell, consistently with Eq. 1; the paper only says "down-sampled"),
    turned into k = 2048 weight maps by ``attention`` ("conv", Eq. 7, or "cw_maxpool", Eq. 6) and
    multiplied element-wise into the 2048 feature maps before GAP (Eq. 5).

    ``fusion="input"`` (Table 7 ablation): the paper does not detail it; following the two-step
    method it cites ([36]: "the image, multiplied by the weight map, is fed into a DR grading
    network"), the weight maps are computed at input resolution with one map per image channel
    (k = ``in_channels``) and multiplied into the image, which then enters the main branch.
    """

    def __init__(self, lnet: LNet | None = None, attention: str = "conv", fusion: str = "feature",
                 n_classes: int = 5, backbone: str = "inception_v3", weights=None, in_channels: int = 3,
                 n_lesions: int = 8, attention_hidden: int = 128) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        super().__init__(lnet, n_classes, backbone, weights, in_channels, n_lesions)
        k = self.encoder.out_channels if fusion == "feature" else in_channels
        self.attention = (ConvAttention(n_lesions, k, attention_hidden) if attention == "conv"
                          else CWMaxPoolAttention(k))
        self.fusion = fusion
        self.fc = nn.Linear(self.encoder.out_channels, n_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        lesions = self.lesions(x)
        lesion_maps = torch.sigmoid(lesions["masks"])
        if self.fusion == "input":
            weights = self.attention(lesion_maps)
            features = self.features(x * weights)
        else:
            features = self.features(x)
            weights = self.attention(F.adaptive_max_pool2d(lesion_maps, features.shape[-2:]))
            features = features * weights
        return {"dr": self.fc(features.mean(dim=(2, 3))), "attention": weights,
                "masks": lesions["masks"], "presence": lesions["presence"]}


class LesionConcat(LesionGuidedGrader):
    """Lesion-Concat baseline (Sec. 4.2.3): GAP vector (2048) ++ lesion presence P (m) -> FC (2048 + m) x 5.

    ``P`` are the frozen L-Net's global-max-pooled probabilities (Eq. 1).
    """

    def __init__(self, lnet: LNet | None = None, n_classes: int = 5, backbone: str = "inception_v3",
                 weights=None, in_channels: int = 3, n_lesions: int = 8) -> None:
        super().__init__(lnet, n_classes, backbone, weights, in_channels, n_lesions)
        self.fc = nn.Linear(self.encoder.out_channels + n_lesions, n_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        lesions = self.lesions(x)
        pooled = self.features(x).mean(dim=(2, 3))
        dr = self.fc(torch.cat([pooled, torch.sigmoid(lesions["presence"])], dim=1))
        return {"dr": dr, "masks": lesions["masks"], "presence": lesions["presence"]}
