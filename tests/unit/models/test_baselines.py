"""Tests for fundus_lib.models.baselines and the model registry (fundus_lib.models)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from fundus_lib.models import MODELS, build_model
from fundus_lib.models.baselines import IndividualNet, JointNet, MTMRNet, MultiTaskChen, build_neck

BASELINES = ("joint", "joint_complex", "joint_complex_v2", "multitask_chen", "mtmr")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv_bn(n_in: int, n_out: int, k: int) -> int:
    return n_in * n_out * k * k + 2 * n_out  # bias-free convolution + BatchNorm affine


@pytest.fixture(scope="module")
def trunk50() -> int:
    """ResNet-50 parameters without the ImageNet classifier: 23,508,032."""
    with torch.device("meta"):
        resnet50 = torchvision.models.resnet50(weights=None)
    return n_params(resnet50) - n_params(resnet50.fc)


@pytest.mark.parametrize("name, paper_millions, extra", [
    ("joint", 23.52, linear(2048, 2) + linear(2048, 3)),
    ("joint_complex", 29.04, conv_bn(2048, 300, 3) + linear(300, 2) + linear(300, 3)),
    ("joint_complex_v2", 29.08, conv_bn(2048, 660, 1) + conv_bn(660, 512, 3) + conv_bn(512, 256, 3)
     + linear(256, 2) + linear(256, 3)),
])
def test_parameter_counts_match_table_iv(name, paper_millions, extra, trunk50):
    with torch.device("meta"):
        model = build_model(name, n_dr=2, n_dme=3)
    assert n_params(model) == trunk50 + extra
    assert round(n_params(model) / 1e6, 2) == paper_millions


def test_other_baseline_parameter_counts(trunk50):
    """Individual nets: trunk + one head (23.51 M; Table IV prints 23.52 M, the joint count)."""
    with torch.device("meta"):
        individual_dr, individual_dme = IndividualNet("dr"), IndividualNet("dme")
        chen, mtmr = MultiTaskChen(), MTMRNet()
    assert n_params(individual_dr) == trunk50 + linear(2048, 2)
    assert n_params(individual_dme) == trunk50 + linear(2048, 3)
    towers = linear(1024, 256) + linear(256, 128)
    assert n_params(chen) == trunk50 + linear(2048, 1024) + 2 * towers + linear(128, 2) + linear(128, 3)
    assert n_params(mtmr) == trunk50 + linear(2048, 256) + linear(2048 + 256, 2) + linear(256, 3)


@pytest.mark.parametrize("name, n_dr", [(name, 5) for name in BASELINES] + [("joint", 2), ("mtmr", 2)])
def test_outputs_are_dr_and_dme_logits(name, n_dr):
    """Paper setting (ResNet-50, 224 px), shapes only (meta device); the count tests cover n_dr=2 heads."""
    with torch.device("meta"):
        out = build_model(name, n_dr=n_dr)(torch.empty(2, 3, 224, 224))
    assert set(out) == {"dr", "dme"}
    assert out["dr"].shape == (2, n_dr) and out["dme"].shape == (2, 3)


@pytest.mark.parametrize("name", BASELINES)
def test_forward_and_backward_on_real_tensors(name):
    torch.manual_seed(0)
    model = build_model(name, backbone="resnet18", n_dr=5).train()
    out = model(torch.randn(2, 3, 32, 32))
    (out["dr"].logsumexp(1) + out["dme"].logsumexp(1)).sum().backward()
    assert torch.isfinite(out["dr"]).all() and torch.isfinite(out["dme"]).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("task, n_classes", [("dr", 5), ("dme", 3)])
def test_individual_net_returns_only_its_task(task, n_classes):
    torch.manual_seed(0)
    model = IndividualNet(task, backbone="resnet18", n_dr=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert list(out) == [task] and out[task].shape == (2, n_classes)


@pytest.mark.parametrize("backbone", ["resnet34", "densenet161"])
def test_table_vi_backbones(backbone):
    with torch.device("meta"):
        model = JointNet(backbone=backbone)
        out = model(torch.empty(2, 3, 224, 224))
    assert model.head_dr.in_features == {"resnet34": 512, "densenet161": 2208}[backbone]
    assert out["dr"].shape == (2, 2) and out["dme"].shape == (2, 3)


def test_necks_are_the_papers_layers():
    complex_neck, width = build_neck("complex", 2048)
    assert width == 300 and complex_neck[0].weight.shape == (300, 2048, 3, 3) and complex_neck[0].bias is None
    v2, width = build_neck("complex_v2", 2048)
    assert width == 256
    assert [block[0].weight.shape for block in v2] == [(660, 2048, 1, 1), (512, 660, 3, 3), (256, 512, 3, 3)]
    assert all(isinstance(block[1], torch.nn.BatchNorm2d) and isinstance(block[2], torch.nn.ReLU) for block in v2)


def test_mtmr_dme_feature_feeds_dr_head_only():
    torch.manual_seed(0)
    model = MTMRNet(backbone="resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.head_dr.weight.add_(1.0)
        after_head = model(x)
        model.branch_dme[0].weight.add_(0.5 * torch.randn_like(model.branch_dme[0].weight))
        after_branch = model(x)
    torch.testing.assert_close(after_head["dme"], before["dme"])  # the DR head never reaches DME
    assert not torch.allclose(after_branch["dr"], after_head["dr"])  # the DME feature reaches DR


def test_registry():
    assert {"canet", *BASELINES, "individual", "lnet", "sian", "lesion_concat"} <= set(MODELS)
    assert MODELS["lnet"] == "fundus_lib.models.lnet:LNet" and MODELS["sian"] == "fundus_lib.models.sian:SiAN"
    assert MODELS["lesion_concat"] == "fundus_lib.models.sian:LesionConcat"
    with torch.device("meta"):
        assert isinstance(build_model("joint_complex"), JointNet)
        assert build_model("individual", task="dme").task == "dme"
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")


def test_bad_arguments_raise():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="task"):
            IndividualNet("dmr")
        with pytest.raises(ValueError, match="n_dr"):
            JointNet(n_dr=1)
        with pytest.raises(ValueError, match="dropout"):
            MultiTaskChen(dropout=1.5)
        with pytest.raises(ValueError, match="neck"):
            JointNet(neck="complex_v3")
