"""Tests for fundus_lib.models.canet: shapes, Table IV parameter count, attention maths, switches, Eq. 7."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from fundus_lib.models.canet import (CANet, CANetLoss, ChannelGate, DiseaseDependentAttention,
                                     DiseaseSpecificAttention, canet_loss)

OUTPUT_KEYS = {"dr", "dme", "aux_dr", "aux_dme"}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def mlp(channels: int, hidden: int) -> int:
    return linear(channels, hidden) + linear(hidden, channels)


def small_canet(seed: int = 0, **kwargs) -> CANet:
    torch.manual_seed(seed)
    return CANet(backbone="resnet18", **kwargs)


@pytest.fixture(scope="module")
def canet18() -> CANet:
    """A ResNet-18 CANet with both dependent paths; tests must not change its weights."""
    return small_canet()


@pytest.mark.parametrize("n_dr", [2, 5])
def test_output_shapes(n_dr, canet18):
    model = (canet18 if n_dr == 2 else small_canet(n_dr=n_dr)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert set(out) == OUTPUT_KEYS
    assert out["dr"].shape == out["aux_dr"].shape == (2, n_dr)
    assert out["dme"].shape == out["aux_dme"].shape == (2, 3)


def test_attention_maps_and_weights_at_paper_size():
    """ResNet-50 at 224: spatial maps (B,1,7,7), channel weights (B,2048), dependent weights (B,1024)."""
    with torch.device("meta"):
        out = CANet()(torch.empty(2, 3, 224, 224), return_attention=True)
    for disease in ("dr", "dme"):
        assert out[f"att_spatial_{disease}"].shape == (2, 1, 7, 7)
        assert out[f"att_channel_{disease}"].shape == (2, 2048)
        assert out[f"att_dep_{disease}"].shape == (2, 1024)


def test_parameter_count_matches_table_iv():
    """29.03 M = ResNet-50 trunk + 2 x (specific attention, G projection, aux head, head) + 2 dependent MLPs."""
    with torch.device("meta"):
        model = CANet(n_dr=2, n_dme=3)
        resnet50 = torchvision.models.resnet50(weights=None)
    trunk = n_params(resnet50) - n_params(resnet50.fc)
    specific = mlp(2048, 128) + 2 * 7 * 7 + 2  # shared channel MLP; 7x7 conv 2->1 without bias; BN(1)
    embed = linear(2048, 1024)
    heads = 2 * (linear(1024, 2) + linear(1024, 3))  # auxiliary + final heads
    dependent = mlp(1024, 64)
    expected = trunk + 2 * specific + 2 * embed + heads + 2 * dependent
    assert n_params(model) == expected == 29_032_082
    assert round(n_params(model) / 1e6, 2) == 29.03


@pytest.mark.parametrize("dr_to_dme, dme_to_dr", [(True, True), (True, False), (False, True), (False, False)])
def test_switches_remove_exactly_their_path(dr_to_dme, dme_to_dr, canet18):
    model = small_canet(dr_to_dme=dr_to_dme, dme_to_dr=dme_to_dr).eval()
    removed = (not dr_to_dme) + (not dme_to_dr)
    assert n_params(canet18) - n_params(model) == removed * mlp(1024, 64)
    assert (model.dependent_dr_to_dme is None) != dr_to_dme and (model.dependent_dme_to_dr is None) != dme_to_dr

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.embed_dr.weight.add_(0.5 * torch.randn_like(model.embed_dr.weight))  # perturb G_DR only
        after_dr = model(x)
        model.embed_dme.weight.add_(0.5 * torch.randn_like(model.embed_dme.weight))  # then G_DME too
        after_both = model(x)
    assert not torch.allclose(after_dr["dr"], before["dr"]) and not torch.allclose(after_dr["aux_dr"], before["aux_dr"])
    torch.testing.assert_close(after_dr["aux_dme"], before["aux_dme"])
    # The DME output sees the DR-specific features only through the DR => DME path, and vice versa.
    assert torch.allclose(after_dr["dme"], before["dme"]) != dr_to_dme
    assert torch.allclose(after_both["dr"], after_dr["dr"]) != dme_to_dr


def test_gradients_reach_both_attention_paths(canet18):
    model = canet18.train()
    batch = {"dr": torch.tensor([0, 1]), "dme": torch.tensor([2, 0])}
    model.zero_grad()
    total, _ = canet_loss(model(torch.randn(2, 3, 32, 32)), batch)
    total.backward()
    for name in ("specific_dr.channel.mlp.0.weight", "specific_dr.spatial.conv.weight",
                 "specific_dme.channel.mlp.0.weight", "specific_dme.spatial.conv.weight",
                 "dependent_dr_to_dme.mlp.0.weight", "dependent_dme_to_dr.mlp.2.weight",
                 "embed_dr.weight", "embed_dme.weight", "backbone.conv1.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_disease_specific_attention_matches_equations_1_to_4():
    torch.manual_seed(0)
    module = DiseaseSpecificAttention(32, reduction=16).eval()
    bn = module.spatial.bn
    with torch.no_grad():
        bn.running_mean.fill_(0.3), bn.running_var.fill_(2.0), bn.weight.fill_(1.5), bn.bias.fill_(-0.2)
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        refined, channel, spatial = module(x)
        w0, b0, w1, b1 = (module.channel.mlp[0].weight, module.channel.mlp[0].bias,
                          module.channel.mlp[2].weight, module.channel.mlp[2].bias)

        def shared_mlp(v):
            return F.relu(v @ w0.T + b0) @ w1.T + b1

        a_c = torch.sigmoid(shared_mlp(x.mean((2, 3))) + shared_mlp(x.amax((2, 3))))  # Eq. 1
        f_i = x * a_c[:, :, None, None]  # Eq. 2
        pooled = torch.stack([f_i.mean(1), f_i.amax(1)], dim=1)
        conv = F.conv2d(pooled, module.spatial.conv.weight, padding=3)
        a_s = torch.sigmoid((conv - 0.3) / np.sqrt(2.0 + bn.eps) * 1.5 - 0.2)  # Eq. 3
    torch.testing.assert_close(channel, a_c)
    torch.testing.assert_close(spatial, a_s)
    torch.testing.assert_close(refined, f_i * a_s)  # Eq. 4
    assert module.channel.mlp[0].weight.shape == (2, 32) and module.spatial.conv.bias is None


def test_disease_dependent_gate_paper_and_authors_code():
    """Eq. 5 is sigmoid(MLP(G)); the released code's channel-only CBAM on a 1x1 map is sigmoid(2 MLP(G))."""
    torch.manual_seed(0)
    paper = DiseaseDependentAttention(64, reduction=16, gate="paper")
    code = DiseaseDependentAttention(64, reduction=16, gate="authors_code")
    code.load_state_dict(paper.state_dict())
    cbam_channel_gate = ChannelGate(64, reduction=16)
    cbam_channel_gate.mlp.load_state_dict(paper.mlp.state_dict())
    g = torch.randn(3, 64)
    with torch.no_grad():
        logits = F.relu(g @ paper.mlp[0].weight.T + paper.mlp[0].bias) @ paper.mlp[2].weight.T + paper.mlp[2].bias
        torch.testing.assert_close(paper(g), torch.sigmoid(logits))
        torch.testing.assert_close(code(g), torch.sigmoid(2 * logits))
        torch.testing.assert_close(code(g), cbam_channel_gate(g[:, :, None, None]))
    with torch.device("meta"):
        assert CANet(dependent_gate="authors_code").dependent_dme_to_dr.gate == "authors_code"
    with pytest.raises(ValueError, match="gate"):
        DiseaseDependentAttention(64, gate="cbam")


def test_canet_forward_matches_equation_6(canet18):
    model = canet18.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, return_attention=True)
        features = model.backbone(x)["layer4"]
        g_dr = model.embed_dr(model.specific_dr(features)[0].mean((2, 3)))
        g_dme = model.embed_dme(model.specific_dme(features)[0].mean((2, 3)))
    torch.testing.assert_close(out["att_dep_dr"], model.dependent_dr_to_dme(g_dr))
    torch.testing.assert_close(out["dme"], model.head_dme(g_dme + out["att_dep_dr"] * g_dr))
    torch.testing.assert_close(out["dr"], model.head_dr(g_dr + out["att_dep_dme"] * g_dme))
    torch.testing.assert_close(out["aux_dr"], model.aux_head_dr(g_dr))


def test_eq7_loss_equals_hand_computation():
    outputs = {"dr": torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]]),
               "dme": torch.tensor([[1.0, 0.0, -1.0], [0.2, 2.0, 0.1], [0.0, 0.0, 4.0]]),
               "aux_dr": torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]),
               "aux_dme": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])}
    batch = {"dr": torch.tensor([0, 1, 1]), "dme": torch.tensor([0, 1, 2])}

    def ce(logits, target):
        z = logits.numpy().astype(np.float64)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -log_softmax[np.arange(len(target)), target.numpy()].mean()

    parts = {key: ce(outputs[key], batch[key.removeprefix("aux_")]) for key in outputs}
    total, logged = canet_loss(outputs, batch, lam=0.25)
    assert total.item() == pytest.approx(parts["dr"] + parts["dme"] + 0.25 * (parts["aux_dr"] + parts["aux_dme"]), rel=1e-6)
    assert {key: value.item() for key, value in logged.items()} == pytest.approx(parts, rel=1e-6)
    assert CANetLoss(0.75)(outputs, batch)[0].item() == pytest.approx(canet_loss(outputs, batch, 0.75)[0].item())
    # lam = 0 trains models without auxiliary heads (the joint baselines).
    joint_total, joint_parts = canet_loss({"dr": outputs["dr"], "dme": outputs["dme"]}, batch, lam=0.0)
    assert joint_total.item() == pytest.approx(parts["dr"] + parts["dme"], rel=1e-6) and set(joint_parts) == {"dr", "dme"}
    with pytest.raises(KeyError, match="aux_dr"):
        canet_loss({"dr": outputs["dr"], "dme": outputs["dme"]}, batch, lam=0.25)
    with pytest.raises(ValueError, match="lam"):
        CANetLoss(-0.1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_dr"):
        CANet(n_dr=1)
    with pytest.raises(ValueError, match="dropout"):
        CANet(dropout=1.0)


def test_short_training_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = CANet(backbone="resnet18", n_dr=5).train()
    images = torch.randn(8, 3, 48, 48)
    batch = {"dr": torch.arange(8) % 5, "dme": torch.arange(8) % 3}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        total, _ = canet_loss(model(images), batch)
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert np.mean(losses[-2:]) < 0.3 * losses[0], losses
