"""CANet: cross-disease attention network for joint DR and DME grading (Li et al., IEEE TMI 2020).

Data flow (ResNet-50, 224 x 224 input; Fig. 3, Table I)::

    x -> backbone -> F (B,2048,7,7) -> Dropout(0.3)
      -> disease-specific attention, one per disease (Eq. 1-4):
           channel gate  A_c = sigmoid(MLP(GAP F) + MLP(GMP F)), MLP 2048->128->2048   -> F_i = A_c * F
           spatial gate  A_s = sigmoid(BN(Conv7x7([mean_c F_i ; max_c F_i])))          -> F'_i = A_s * F_i
                         (Eq. 3 has no BN: it comes from the authors' code, see below)
      -> G_i = Linear(2048, 1024)(GAP F'_i)                  aux heads: Linear(1024, n) on G_i
      -> disease-dependent attention (Eq. 5-6), MLP 1024->64->1024:
           G'_DME = G_DME + A_DR * G_DR,  A_DR = sigmoid(MLP_DR(G_DR))     (switch ``dr_to_dme``)
           G'_DR  = G_DR + A_DME * G_DME, A_DME = sigmoid(MLP_DME(G_DME))  (switch ``dme_to_dr``)
      -> final heads: Linear(1024, n) on G'_i (prediction uses these only)

Outputs of :meth:`CANet.forward`: ``"dr"`` (B, n_dr) and ``"dme"`` (B, n_dme) final logits,
``"aux_dr"`` / ``"aux_dme"`` the disease-specific logits. With ``return_attention=True`` also
``"att_spatial_dr"`` / ``"att_spatial_dme"`` (B,1,h,w) spatial gates, ``"att_channel_dr"`` /
``"att_channel_dme"`` (B,C) channel gates, and ``"att_dep_dr"`` = A_DR / ``"att_dep_dme"`` = A_DME
(B,1024) disease-dependent weights (each only when its path is switched on).

Choices where the sources differ:

- Reduction ratio: the text says r = 0.5, Table I says FC 2048x128 and 1024x64, i.e. r = 16; the
  Table (and the authors' code, and the 29.03 M parameter count) wins.
- Disease-dependent gate: Eq. 5 is ``sigmoid(MLP(G))``. The authors' code runs a channel-only CBAM
  on G reshaped to 1x1, where average and max pooling coincide, so it computes
  ``sigmoid(2 * MLP(G))``. Same parameters, a doubled pre-activation. ``dependent_gate="paper"``
  (default) follows Eq. 5; ``dependent_gate="authors_code"`` reproduces the released code.
- Spatial gate input: concat [channel mean ; channel max] in the paper's order (Eq. 3); the
  authors' code stacks [max ; mean], which is the same model with the two conv input planes
  swapped.
- Spatial gate normalisation: Eq. 3 is ``sigmoid(Conv([mean ; max]))``. The BatchNorm after the
  convolution (momentum 0.01) is the authors' code (CBAM's ``BasicConv``), kept here. Their code
  also initialises every convolution kaiming-normal (fan_out) and this BatchNorm's weight to 0, so
  every spatial gate starts at sigmoid(0) = 0.5; this module keeps PyTorch's default initialisation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import build_backbone

DependentGate = Literal["paper", "authors_code"]
CANET_LAMBDA = 0.25  # Eq. 7, chosen in Table IV


def _mlp(channels: int, reduction: int) -> nn.Sequential:
    """The bottleneck MLP of the attention gates: Linear(C, C/r) -> ReLU -> Linear(C/r, C)."""
    hidden = channels // reduction
    if hidden < 1:
        raise ValueError(f"reduction={reduction} leaves no hidden unit for {channels} channels")
    return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))


class ChannelGate(nn.Module):
    """Channel attention weights ``sigmoid(MLP(GAP x) + MLP(GMP x))`` (B, C) with a shared MLP (Eq. 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = _mlp(channels, reduction)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))


class SpatialGate(nn.Module):
    """Spatial attention map ``sigmoid(BN(Conv7x7([mean_c x ; max_c x])))`` (B, 1, H, W): Eq. 3 plus
    the authors' BatchNorm (see the module docstring)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class DiseaseSpecificAttention(nn.Module):
    """CBAM-style channel then spatial attention (Eq. 1-4): returns (F', channel weights, spatial map)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(kernel_size)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        channel_weights = self.channel(features)
        refined = features * channel_weights[:, :, None, None]
        spatial_map = self.spatial(refined)
        return refined * spatial_map, channel_weights, spatial_map


class DiseaseDependentAttention(nn.Module):
    """Attention weights A = sigmoid(k * MLP(G)) (B, D) on one disease's feature G (Eq. 5).

    ``gate="paper"``: k = 1 (Eq. 5). ``gate="authors_code"``: k = 2, what the released code's
    channel-only CBAM on a 1x1 map computes (average and max pooling both return G).
    """

    def __init__(self, dim: int = 1024, reduction: int = 16, gate: DependentGate = "paper") -> None:
        super().__init__()
        if gate not in ("paper", "authors_code"):
            raise ValueError(f"gate must be 'paper' or 'authors_code', got {gate!r}")
        self.mlp = _mlp(dim, reduction)
        self.gate = gate
        self.scale = 1.0 if gate == "paper" else 2.0

    def forward(self, g: Tensor) -> Tensor:
        return torch.sigmoid(self.scale * self.mlp(g))

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"


class CANet(nn.Module):
    """Cross-disease attention network (see the module docstring for the data flow and outputs).

    Args:
        backbone: backbone name (ResNet-50 in the paper).
        n_dr: DR classes (2 on Messidor: referable or not; 5 on IDRiD).
        n_dme: DME classes (3).
        dr_to_dme: add the DR => DME disease-dependent path (A_DR * G_DR into the DME branch).
        dme_to_dr: add the DME => DR path. Both off is "CANet (d-S only)" of Table IV / IX.
        dropout: drop rate applied once to the backbone features, before both attention branches.
        embed_dim: width of G_i (1024).
        reduction: MLP reduction ratio of both attention kinds (16: Table I's 2048x128, 1024x64).
        dependent_gate: "paper" (Eq. 5) or "authors_code" (sigmoid(2 MLP)); see the module docstring.
        weights: backbone weights (None, "imagenet" or a path), passed to ``build_backbone``.
        in_channels: image channels.
    """

    def __init__(self, backbone: str = "resnet50", n_dr: int = 2, n_dme: int = 3, dr_to_dme: bool = True,
                 dme_to_dr: bool = True, dropout: float = 0.3, embed_dim: int = 1024, reduction: int = 16,
                 dependent_gate: DependentGate = "paper", weights: str | Path | None = None, in_channels: int = 3) -> None:
        super().__init__()
        for arg, value in (("n_dr", n_dr), ("n_dme", n_dme)):
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"{arg} must be an int >= 2, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = build_backbone(backbone, weights=weights, in_channels=in_channels)
        channels = self.backbone.out_channels
        self.dropout = nn.Dropout(dropout)
        self.specific_dr = DiseaseSpecificAttention(channels, reduction)
        self.specific_dme = DiseaseSpecificAttention(channels, reduction)
        self.embed_dr = nn.Linear(channels, embed_dim)
        self.embed_dme = nn.Linear(channels, embed_dim)
        self.aux_head_dr = nn.Linear(embed_dim, n_dr)
        self.aux_head_dme = nn.Linear(embed_dim, n_dme)
        # Each switch owns exactly one module: switched off, the path has neither parameters nor effect.
        self.dependent_dr_to_dme = DiseaseDependentAttention(embed_dim, reduction, dependent_gate) if dr_to_dme else None
        self.dependent_dme_to_dr = DiseaseDependentAttention(embed_dim, reduction, dependent_gate) if dme_to_dr else None
        self.head_dr = nn.Linear(embed_dim, n_dr)
        self.head_dme = nn.Linear(embed_dim, n_dme)

    def forward(self, x: Tensor, return_attention: bool = False) -> dict[str, Tensor]:
        features = self.dropout(self.backbone(x)[self.backbone.stages[-1]])
        f_dr, channel_dr, spatial_dr = self.specific_dr(features)
        f_dme, channel_dme, spatial_dme = self.specific_dme(features)
        g_dr = self.embed_dr(f_dr.mean(dim=(2, 3)))
        g_dme = self.embed_dme(f_dme.mean(dim=(2, 3)))
        out: dict[str, Tensor] = {"aux_dr": self.aux_head_dr(g_dr), "aux_dme": self.aux_head_dme(g_dme)}
        attention: dict[str, Tensor] = {"att_spatial_dr": spatial_dr, "att_spatial_dme": spatial_dme,
                                        "att_channel_dr": channel_dr, "att_channel_dme": channel_dme}
        refined_dr, refined_dme = g_dr, g_dme
        if self.dependent_dr_to_dme is not None:
            attention["att_dep_dr"] = self.dependent_dr_to_dme(g_dr)
            refined_dme = g_dme + attention["att_dep_dr"] * g_dr  # Eq. 6
        if self.dependent_dme_to_dr is not None:
            attention["att_dep_dme"] = self.dependent_dme_to_dr(g_dme)
            refined_dr = g_dr + attention["att_dep_dme"] * g_dme
        out["dr"] = self.head_dr(refined_dr)
        out["dme"] = self.head_dme(refined_dme)
        if return_attention:
            out.update(attention)
        return out


def _cross_entropy(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], key: str, target: str) -> Tensor:
    if key not in outputs:
        raise KeyError(f"outputs has no key {key!r} (keys present: {sorted(outputs)})")
    if target not in batch:
        raise KeyError(f"batch has no key {target!r} (keys present: {sorted(batch)})")
    return F.cross_entropy(outputs[key], batch[target].to(outputs[key].device).long())


def canet_loss(outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
               lam: float = CANET_LAMBDA) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 7: ``L = CE(dr) + CE(dme) + lam * (CE(aux_dr) + CE(aux_dme))``.

    Reads ``outputs["dr"|"dme"|"aux_dr"|"aux_dme"]`` (logits) and ``batch["dr"|"dme"]`` (class
    indices). The auxiliary outputs are needed only when ``lam > 0``, so ``lam=0`` also trains the
    joint baselines, which have none. Returns ``(total, parts)`` with the unweighted, detached
    terms under ``"dr"``, ``"dme"``, ``"aux_dr"``, ``"aux_dme"`` for logging.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    parts = {"dr": _cross_entropy(outputs, batch, "dr", "dr"), "dme": _cross_entropy(outputs, batch, "dme", "dme")}
    total = parts["dr"] + parts["dme"]
    if lam > 0:
        parts["aux_dr"] = _cross_entropy(outputs, batch, "aux_dr", "dr")
        parts["aux_dme"] = _cross_entropy(outputs, batch, "aux_dme", "dme")
        total = total + lam * (parts["aux_dr"] + parts["aux_dme"])
    return total, {name: value.detach() for name, value in parts.items()}


class CANetLoss:
    """Callable form of :func:`canet_loss` with a fixed ``lam`` (Eq. 7; 0.25 in the paper)."""

    def __init__(self, lam: float = CANET_LAMBDA) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def __call__(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        return canet_loss(outputs, batch, self.lam)

    def __repr__(self) -> str:
        return f"CANetLoss(lam={self.lam})"
