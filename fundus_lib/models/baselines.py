"""Baselines that CANet is compared with (Li et al., TMI 2020, Tables IV, V and VI).

All models take ``backbone`` (``resnet50`` in Tables IV/V; ``resnet34`` and ``densenet161`` in
Table VI), ``n_dr`` (2 on Messidor, 5 on IDRiD), ``n_dme`` (3), ``dropout``, and ``weights`` /
``in_channels`` for :func:`~fundus_lib.models.backbones.build_backbone`. Every forward returns a
dict of logits: ``{"dr": (B, n_dr), "dme": (B, n_dme)}``; :class:`IndividualNet` returns only its
task's key.

=================================  =============================================================
model                              head on the backbone's last feature map F
=================================  =============================================================
``IndividualNet(task=...)``        GAP -> Linear(C, n_task)          ("Individual training")
``JointNet()``                     GAP -> Linear(C, n_dr), Linear(C, n_dme)  ("Joint training")
``JointNet(neck="complex")``       Conv3x3 C->300 + BN + ReLU, then as JointNet (29.04 M)
``JointNet(neck="complex_v2")``    Conv1x1 C->660, Conv3x3 660->512, Conv3x3 512->256, each
                                   + BN + ReLU, then as JointNet (29.08 M)
``MultiTaskChen()``                GAP -> FC C->1024, per task FC 1024->256->128->n (Chen et al.)
``MTMRNet()``                      GAP, a 256-wide DME feature FC, concatenated into the DR head
                                   (MTMR-Net of Liu et al.)
=================================  =============================================================

The neck convolutions have no bias (BatchNorm follows); with biases the complex_v2 count would
be 29.09 M instead of the paper's 29.08 M. The two adapted multi-task nets follow the paper's text
and the authors' released code (three FCs of input widths 1024, 256, 128 per task; a single
256-wide FC carrying DME information into the DR classifier), with one change: a ReLU follows each
hidden FC — the released code stacks them without activations, which collapses them into one
linear map.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from .backbones import Backbone, build_backbone

Neck = Literal["none", "complex", "complex_v2"]
NECKS: tuple[str, ...] = ("none", "complex", "complex_v2")
Task = Literal["dr", "dme"]


def _check_classes(**counts: int) -> None:
    for arg, value in counts.items():
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"{arg} must be an int >= 2, got {value!r}")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def build_neck(neck: Neck, in_channels: int) -> tuple[nn.Module, int]:
    """The extra layers of "Joint training (complex)" / "(complex_v2)": (module, output channels)."""
    if neck == "none":
        return nn.Identity(), in_channels
    if neck == "complex":
        return Conv2dNormActivation(in_channels, 300, 3), 300
    if neck == "complex_v2":
        return nn.Sequential(Conv2dNormActivation(in_channels, 660, 1), Conv2dNormActivation(660, 512, 3),
                             Conv2dNormActivation(512, 256, 3)), 256
    raise ValueError(f"neck must be one of {NECKS}, got {neck!r}")


class _PooledBackbone(nn.Module):
    """Backbone -> (optional neck) -> global average pooling -> dropout: the shared trunk of the baselines."""

    def __init__(self, backbone: str, dropout: float, weights: str | Path | None, in_channels: int, neck: Neck = "none") -> None:
        super().__init__()
        _check_dropout(dropout)
        if neck not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, got {neck!r}")
        self.backbone: Backbone = build_backbone(backbone, weights=weights, in_channels=in_channels)
        self.neck, self.feature_dim = build_neck(neck, self.backbone.out_channels)
        self.dropout = nn.Dropout(dropout)

    def pooled(self, x: Tensor) -> Tensor:
        """(B, feature_dim) image descriptor."""
        features = self.neck(self.backbone(x)[self.backbone.stages[-1]])
        return self.dropout(features.mean(dim=(2, 3)))


class IndividualNet(_PooledBackbone):
    """"Individual training": one backbone, one linear head for one task (``task="dr"`` or ``"dme"``)."""

    def __init__(self, task: Task = "dr", backbone: str = "resnet50", n_dr: int = 2, n_dme: int = 3,
                 dropout: float = 0.0, weights: str | Path | None = None, in_channels: int = 3) -> None:
        if task not in ("dr", "dme"):
            raise ValueError(f"task must be 'dr' or 'dme', got {task!r}")
        _check_classes(n_dr=n_dr, n_dme=n_dme)
        super().__init__(backbone, dropout, weights, in_channels)
        self.task = task
        self.head = nn.Linear(self.feature_dim, n_dr if task == "dr" else n_dme)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.task: self.head(self.pooled(x))}


class JointNet(_PooledBackbone):
    """"Joint training": shared backbone (+ optional ``neck``), GAP, one linear head per task."""

    def __init__(self, backbone: str = "resnet50", n_dr: int = 2, n_dme: int = 3, dropout: float = 0.0,
                 neck: Neck = "none", weights: str | Path | None = None, in_channels: int = 3) -> None:
        _check_classes(n_dr=n_dr, n_dme=n_dme)
        super().__init__(backbone, dropout, weights, in_channels, neck)
        self.head_dr = nn.Linear(self.feature_dim, n_dr)
        self.head_dme = nn.Linear(self.feature_dim, n_dme)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        pooled = self.pooled(x)
        return {"dr": self.head_dr(pooled), "dme": self.head_dme(pooled)}


def joint_complex(**kwargs) -> JointNet:
    """"Joint training (complex)": :class:`JointNet` with a Conv3x3 C->300 + BN + ReLU neck."""
    return JointNet(neck="complex", **kwargs)


def joint_complex_v2(**kwargs) -> JointNet:
    """"Joint training (complex_v2)": :class:`JointNet` with the three-convolution neck."""
    return JointNet(neck="complex_v2", **kwargs)


def _task_tower(widths: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    """FC layers ``widths[0] -> widths[1] -> ... -> n_classes``, ReLU + dropout after each hidden FC."""
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(widths[-1], n_classes))


class MultiTaskChen(_PooledBackbone):
    """Multi-task net adapted from Chen et al. (Table V): GAP -> FC C->1024 -> per-task FCs 1024, 256, 128."""

    def __init__(self, backbone: str = "resnet50", n_dr: int = 2, n_dme: int = 3, dropout: float = 0.5,
                 weights: str | Path | None = None, in_channels: int = 3) -> None:
        _check_classes(n_dr=n_dr, n_dme=n_dme)
        _check_dropout(dropout)
        super().__init__(backbone, 0.0, weights, in_channels)
        self.shared = nn.Sequential(nn.Linear(self.feature_dim, 1024), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.tower_dr = _task_tower((1024, 256, 128), n_dr, dropout)
        self.tower_dme = _task_tower((1024, 256, 128), n_dme, dropout)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.shared(self.pooled(x))
        return {"dr": self.tower_dr(shared), "dme": self.tower_dme(shared)}


class MTMRNet(_PooledBackbone):
    """MTMR-Net adapted from Liu et al. (Table V): a 256-wide DME feature concatenated into the DR head.

    DME logits = Linear(256, n_dme)(h), h = ReLU(Linear(C, 256)(f)); DR logits = Linear(C + 256,
    n_dr)([f ; h]), with f the pooled (dropped-out) backbone feature. As in MTMR-Net, where the
    attribute branch feeds the malignancy classifier, the auxiliary task (DME) feeds the main one.
    """

    def __init__(self, backbone: str = "resnet50", n_dr: int = 2, n_dme: int = 3, dropout: float = 0.5,
                 weights: str | Path | None = None, in_channels: int = 3) -> None:
        _check_classes(n_dr=n_dr, n_dme=n_dme)
        super().__init__(backbone, dropout, weights, in_channels)
        self.branch_dme = nn.Sequential(nn.Linear(self.feature_dim, 256), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.head_dr = nn.Linear(self.feature_dim + 256, n_dr)
        self.head_dme = nn.Linear(256, n_dme)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        pooled = self.pooled(x)
        h_dme = self.branch_dme(pooled)
        return {"dr": self.head_dr(torch.cat([pooled, h_dme], dim=1)), "dme": self.head_dme(h_dme)}
