"""Tests for fundus_lib.models.deepmt: the three networks, the attention link, DeepMT, the stage losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fundus_lib.models import MODELS, build_model
from fundus_lib.models.deepmt import (GRADER_STAGES, HEAD_WEIGHTS, LESIONS, SEG_CLASSES, AttentionFusion, DeepMT,
                                      MultiScaleConv, MultiScaleUNet, SegmentationLoss, SPPGrader, SRNet, Stage1Loss,
                                      Stage2Loss, Stage3Loss, configure_stage, dr_score, gradcam_stage_maps,
                                      layer_table, lesion_map, parameter_counts, segmentation_target,
                                      spatial_pyramid_pool, upsampling_stages)

LR, SCALE = 8, 4  # LR 8 px -> SR 32 px: the smallest size the U-Net (four poolings) takes
HR = LR * SCALE
SMALL_SEG = 8  # U-Net first width in the fast tests (the paper's 64 only where parameters are counted)


def small_model(**kwargs) -> DeepMT:
    torch.manual_seed(0)
    return DeepMT(scale=SCALE, seg_width=SMALL_SEG, **kwargs)


def make_batch(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    hr = torch.rand(batch, 3, HR, HR, generator=generator)
    masks = (torch.rand(batch, len(LESIONS), HR, HR, generator=generator) > 0.9).float()
    return {"lr_image": F.interpolate(hr, scale_factor=1 / SCALE, mode="bicubic", align_corners=False).clamp(0, 1),
            "hr_image": hr, "masks": masks, "mask_valid": torch.ones(batch, len(LESIONS)),
            "dr": torch.tensor([0, 3][:batch])}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- layer tables (parameter counts)

def sr_table_count(n_up: int, width: int = 32, blocks: int = 5) -> int:
    conv = lambda cin, cout: cin * cout * 9 + cout  # 3x3 with bias (also the 3x3 transposed convs)
    return conv(3, width) + blocks * 2 * conv(width, width) + n_up * conv(width, width) + conv(width, 3)


def seg_table_count(base: int = 64, classes: int = 5) -> int:
    multiscale = lambda cin, cout: cin * (cout // 2) * (9 + 25) + 2 * cout  # 3x3 | 5x5, no bias, BN
    block = lambda cin, cout: multiscale(cin, cout) + cout * cout * 9 + 2 * cout  # + conv3x3 (no bias) BN
    w = [base * 2 ** k for k in range(5)]
    encoder = block(3, w[0]) + sum(block(w[k - 1], w[k]) for k in range(1, 5))
    decoder = sum(multiscale(w[k], w[k - 1]) + block(2 * w[k - 1], w[k - 1]) for k in range(1, 5))
    heads = sum(width * classes + classes for width in w) + 5  # five 1x1 heads + five fusion weights
    return encoder + decoder + heads


def grader_table_count(in_channels: int = 7, grades: int = 5) -> int:
    resnet = torchvision.models.resnet18(weights=None)
    trunk = n_params(resnet) - n_params(resnet.fc) - resnet.conv1.weight.numel()
    return trunk + 64 * in_channels * 7 * 7 + (512 * 21 * 512 + 512) + (512 * grades + grades)


def test_layer_table_totals_are_pinned():
    """Pins the hand tables (the spec gives no counts; SPP 1, 2, 4 gives the authors' Linear(10752, 512))."""
    assert sr_table_count(2) == 112_739 and seg_table_count() == 51_243_294
    assert grader_table_count() == 16_697_157


# --------------------------------------------------------------------------- SR net

@pytest.mark.parametrize("scale", [2, 4, 8])
def test_sr_net_shape_range_and_parameter_count(scale):
    net = SRNet(scale)
    out = net(torch.randn(2, 3, 5, 7) * 3)["sr"]
    assert out.shape == (2, 3, 5 * scale, 7 * scale)
    assert 0 <= out.min() and out.max() <= 1
    assert n_params(net) == sr_table_count(int(math.log2(scale)))
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.modules()) == math.log2(scale)


@pytest.mark.parametrize("scale", [0, 1, 3, 6, 2.0, True])
def test_sr_scale_must_be_a_power_of_two(scale):
    with pytest.raises(ValueError, match="scale must be a power of 2"):
        SRNet(scale)
    with pytest.raises(ValueError, match="scale must be a power of 2"):
        upsampling_stages(scale)


# --------------------------------------------------------------------------- segmentation U-Net

def test_multiscale_conv_runs_3x3_and_5x5_on_half_the_channels_each():
    conv = MultiScaleConv(6, 10)
    assert (conv.conv3.kernel_size, conv.conv3.out_channels) == ((3, 3), 5)
    assert (conv.conv5.kernel_size, conv.conv5.out_channels) == ((5, 5), 5)
    assert conv(torch.randn(2, 6, 9, 9)).shape == (2, 10, 9, 9)
    with pytest.raises(ValueError, match="out_channels must be even"):
        MultiScaleConv(6, 7)


@pytest.fixture(scope="module")
def paper_model() -> DeepMT:
    """DeepMT at the paper's sizes (x4, U-Net 64-1024): built once, only counted, never run."""
    return DeepMT(scale=4)


def test_unet_widths_parameter_count_and_shapes(paper_model):
    net = paper_model.hierarchy.segmenter
    assert net.widths == (64, 128, 256, 512, 1024)
    assert n_params(net) == seg_table_count()
    small = MultiScaleUNet(base_width=SMALL_SEG).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 48))["seg_logits"].shape == (2, len(SEG_CLASSES), 32, 48)
    with pytest.raises(ValueError, match="divisible by 16"):
        small(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="head_weights"):
        MultiScaleUNet(head_weights=(1.0, 1.0))


def test_unet_fuses_its_heads_with_learned_weights():
    torch.manual_seed(0)
    net = MultiScaleUNet(base_width=SMALL_SEG).eval()
    assert torch.equal(net.head_weights.detach(), torch.tensor(HEAD_WEIGHTS))
    x = torch.randn(1, 3, 32, 32)
    logits = net(x)["seg_logits"]
    logits.sum().backward()
    assert net.head_weights.grad is not None and net.head_weights.grad.abs().min() > 0  # every head is used
    with torch.no_grad():
        net.head_weights.mul_(2.0)
        assert torch.allclose(net(x)["seg_logits"], 2 * logits, atol=1e-5)  # the fusion is linear in the weights
        net.head_weights.zero_()
        assert net(x)["seg_logits"].abs().max() == 0


# --------------------------------------------------------------------------- grader

def test_spatial_pyramid_pool_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([15.0, 5, 7, 13, 15, *range(16)])
    assert torch.equal(spatial_pyramid_pool(x, (1, 2, 4)), expected[None])


def test_grader_shapes_and_parameter_count():
    grader = SPPGrader().eval()
    assert grader.backbone.conv1.in_channels == 7
    assert grader.head[0].in_features == 10752 and isinstance(grader.head[1], nn.Dropout)
    assert n_params(grader) == grader_table_count()
    with torch.no_grad():
        assert grader(torch.randn(2, 7, 64, 64))["dr"].shape == (2, 5)
        stages = grader.features(torch.randn(1, 7, 64, 64))
    assert [tuple(stages[s].shape[1:]) for s in GRADER_STAGES] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    with pytest.raises(ValueError, match="dropout"):
        SPPGrader(dropout=1.0)


# --------------------------------------------------------------------------- attention link

def test_dr_score_is_the_grade0_logit_or_the_sum_of_dr_logits():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 1.0, 1.0], [0.0, -1.0, -1.0, 4.0, 0.5]])
    assert torch.equal(dr_score(logits), torch.tensor([3.0, 5.0, 2.5]))


def _hand_gradcam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    out = []
    for a, g in zip(activation, gradient):  # image by image, channel by channel
        cam = sum(g[k].mean() * a[k] for k in range(a.shape[0])).clamp_min(0)
        cam = cam - cam.min()
        out.append(cam / cam.max() if cam.max() > 0 else cam)
    return torch.stack(out)[:, None]


def test_gradcam_stage_maps_match_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    acts = [torch.randn(2, 3, 4, 4, generator=generator, requires_grad=True),
            torch.randn(2, 2, 2, 2, generator=generator, requires_grad=True)]
    weights = [torch.randn(3, 4, 4, generator=generator), torch.randn(2, 2, 2, generator=generator)]
    score = sum((w * a).sum(dim=(1, 2, 3)) for w, a in zip(weights, acts))  # d score / d A = w, per image
    maps = gradcam_stage_maps(acts, score)
    for a, w, m in zip(acts, weights, maps):
        expected = _hand_gradcam(a.detach(), w.expand_as(a))
        assert torch.allclose(m, expected, atol=1e-6)
        assert m.min() >= 0 and m.max() <= 1
    assert all(a.grad is None for a in acts)  # torch.autograd.grad, not backward
    dead = torch.ones(1, 2, 3, 3, requires_grad=True)
    assert torch.equal(gradcam_stage_maps([dead], -(dead.sum(dim=(1, 2, 3))))[0], torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="one value per image"):
        gradcam_stage_maps(acts, score[:, None])


def test_gradcam_on_the_grader_matches_gradients_from_backward():
    torch.manual_seed(1)
    grader = SPPGrader().eval()
    x = torch.randn(2, 7, 64, 64)
    stages = grader.features(x)
    maps = gradcam_stage_maps([stages[s] for s in GRADER_STAGES], dr_score(grader.classify(stages["layer4"])))
    assert all(p.grad is None for p in grader.parameters())
    stages = grader.features(x)  # an independent pass: gradients read with retain_grad + backward
    for s in GRADER_STAGES:
        stages[s].retain_grad()
    dr_score(grader.classify(stages["layer4"])).sum().backward()
    for m, s in zip(maps, GRADER_STAGES):
        assert torch.allclose(m, _hand_gradcam(stages[s].detach(), stages[s].grad), atol=1e-5)


def test_attention_fusion_matches_a_hand_computation():
    fusion = AttentionFusion()
    assert n_params(fusion) == 9
    with torch.no_grad():
        for merge, (a, b, c) in zip(fusion.merges, [(0.5, 1.0, 0.1), (2.0, -1.0, 0.0), (1.0, 0.5, -0.2)]):
            merge[0].weight.copy_(torch.tensor([a, b]).view(1, 2, 1, 1))
            merge[0].bias.fill_(c)
    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 1, n, n, generator=generator) for n in (16, 8, 4, 2)]  # fine -> coarse
    up = lambda t, n: F.interpolate(t, size=(n, n), mode="bilinear", align_corners=False)
    fused = maps[3]
    for (a, b, c), finer in zip([(0.5, 1.0, 0.1), (2.0, -1.0, 0.0), (1.0, 0.5, -0.2)], (maps[2], maps[1], maps[0])):
        fused = (a * up(fused, finer.shape[-1]) + b * finer + c).clamp_min(0)
    assert torch.allclose(fusion(maps, (64, 64)), up(fused, 64), atol=1e-6)
    with pytest.raises(ValueError, match="expects 4 maps"):
        fusion(maps[:3], (64, 64))


# --------------------------------------------------------------------------- DeepMT

def test_deepmt_outputs_and_shapes():
    model = small_model().train()
    out = model(make_batch()["lr_image"])
    assert set(out) == {"sr", "seg_logits", "lesions", "dr", "attention"}
    assert out["sr"].shape == (2, 3, HR, HR) and out["seg_logits"].shape == (2, 5, HR, HR)
    assert out["dr"].shape == (2, 5) and out["attention"].shape == (2, 1, HR, HR)
    assert torch.equal(out["lesions"], torch.sigmoid(out["seg_logits"][:, 1:]))
    assert out["attention"].min() >= 0 and out["attention"].requires_grad
    assert all(p.grad is None for p in model.parameters())  # Grad-CAM does not touch .grad
    with torch.no_grad():
        evaluated = model.eval()(make_batch()["lr_image"])
    assert "attention" in evaluated and not any(v.requires_grad for v in evaluated.values())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model(make_batch()["lr_image"])


def test_deepmt_link_ablation_switches():
    lr = make_batch()["lr_image"]
    bicubic = small_model(upsampler="bicubic", attention=False).eval()
    assert n_params(bicubic.upsampler) == 0
    with torch.no_grad():
        expected = F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False).clamp(0, 1)
        assert torch.equal(bicubic(lr)["sr"], expected)
        identity = small_model(upsampler="identity", attention=False).eval()
        assert torch.equal(identity(make_batch()["hr_image"])["sr"], make_batch()["hr_image"])
    unlinked = small_model(lesion_input=False, attention=False, feedback=False)
    assert unlinked.hierarchy.grader.backbone.conv1.in_channels == 3  # RGB only: no seg -> grading link
    out = unlinked(lr)
    assert "attention" not in out
    out["dr"].sum().backward()
    assert all(p.grad is None for p in unlinked.upsampler.parameters())  # no feedback into the SR net
    assert all(p.grad is not None for p in unlinked.hierarchy.grader.parameters())
    with pytest.raises(ValueError, match="upsampler must be one of"):
        small_model(upsampler="nearest")


def test_parameter_counts_and_layer_table(paper_model):
    counts = parameter_counts(paper_model)
    assert counts == {"upsampler": sr_table_count(2), "segmenter": seg_table_count(), "grader": grader_table_count(),
                      "fusion": 9, "total": sr_table_count(2) + seg_table_count() + grader_table_count() + 9}
    table = layer_table(small_model().train(), LR)
    assert list(table["output"]) == ["lr (input)", "sr", "seg_logits", "lesions", "dr", "attention"]
    assert table.set_index("output")["shape"].to_dict()["attention"] == (1, 1, HR, HR)
    assert table.set_index("output")["parameters"]["sr"] == sr_table_count(2)


def test_registry_builds_deepmt_and_its_parts():
    assert {"deepmt", "deepmt_sr", "deepmt_seg", "deepmt_grader"} <= set(MODELS)
    assert isinstance(build_model("deepmt", seg_width=SMALL_SEG), DeepMT)
    assert build_model("deepmt_sr", scale=8).scale == 8
    assert build_model("deepmt_seg", base_width=SMALL_SEG).widths[-1] == 16 * SMALL_SEG
    assert build_model("deepmt_grader", in_channels=3).backbone.conv1.in_channels == 3


# --------------------------------------------------------------------------- losses on hand-made tensors

BIG = 30.0


def test_segmentation_target_adds_the_background_and_its_validity():
    masks = torch.zeros(1, 4, 1, 2)
    masks[0, 0, 0, 0] = 1  # an MA in the first pixel
    masks[0, 2, 0, 0] = 1  # and an exudate on it
    target, valid = segmentation_target({"masks": masks, "mask_valid": torch.tensor([[1.0, 1, 0, 1]])},
                                        torch.zeros(1, 5, 1, 2))
    assert target[0, :, 0, 0].tolist() == [0, 1, 0, 1, 0] and target[0, :, 0, 1].tolist() == [1, 0, 0, 0, 0]
    assert valid.flatten().tolist() == [0, 1, 1, 0, 1]  # background known only where all lesions are annotated
    with pytest.raises(ValueError, match="map the dataset's lesion channels"):
        segmentation_target({"masks": torch.zeros(1, 8, 1, 2)}, torch.zeros(1, 5, 1, 2))


def test_segmentation_loss_by_hand():
    masks = torch.zeros(1, 4, 2, 2)
    masks[0, 1, 0, 0] = 1  # one haemorrhage pixel: background is 1 elsewhere
    perfect = torch.full((1, 5, 2, 2), -BIG)
    perfect[:, 0] = BIG
    perfect[0, 0, 0, 0], perfect[0, 2, 0, 0] = -BIG, BIG
    loss = SegmentationLoss()
    total, parts = loss({"seg_logits": perfect}, {"masks": masks})
    assert parts["focal"].item() < 1e-10 and parts["dice"].item() < 1e-5
    total, parts = loss({"seg_logits": torch.zeros(1, 5, 2, 2)}, {"masks": masks})  # p = 0.5 everywhere
    dice = lambda positives: 1 - 2 * 0.5 * positives / (4 * 0.25 + positives)
    per_class = [dice(3), dice(0), dice(1), dice(0), dice(0)]
    expected_dice = (0.1 * per_class[0] + sum(per_class[1:])) / 4.1
    positives, n = 3 + 1, 5 * 4  # target-1 elements among all
    expected_focal = -(0.25 * positives + 0.75 * (n - positives)) * 0.25 * math.log(0.5) / n
    assert parts["dice"].item() == pytest.approx(expected_dice, rel=1e-5)
    assert parts["focal"].item() == pytest.approx(expected_focal, rel=1e-5)
    assert total.item() == pytest.approx(expected_dice + expected_focal, rel=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        SegmentationLoss(class_weights=(1.0, 1.0))


class FixedSegmenter(nn.Module):
    """Returns all-zero logits (P = 0.5 everywhere): a known HR reference for the consistency terms."""

    def forward(self, x):
        return {"seg_logits": torch.zeros(x.shape[0], 5, *x.shape[2:])}


def test_stage1_loss_by_hand():
    hr = torch.zeros(1, 3, 2, 2)
    sr = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)  # vertical stripes
    seg_logits = torch.full((1, 5, 2, 2), BIG)  # P = 1 vs the reference 0.5
    masks = torch.zeros(1, 4, 2, 2)
    loss = Stage1Loss(FixedSegmenter(), tv=0.5, seg_consistency=0.4)
    total, parts = loss({"sr": sr, "seg_logits": seg_logits}, {"hr_image": hr, "masks": masks})
    assert parts["sr_mse"].item() == pytest.approx(0.5)
    assert parts["tv"].item() == pytest.approx(1.0)  # horizontal steps all 1, vertical 0
    assert parts["seg_consistency"].item() == pytest.approx(0.25)
    seg, _ = SegmentationLoss()({"seg_logits": seg_logits}, {"masks": masks})
    assert parts["seg"].item() == pytest.approx(seg.item())
    assert total.item() == pytest.approx(0.5 + 0.5 * 1.0 + 0.4 * 0.25 + seg.item(), rel=1e-6)


def test_stage2_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    weights = (1.0, 10.0, 1.44, 25.0, 8.0)
    nll = -torch.log_softmax(logits, dim=1)[[0, 1], [0, 1]]
    expected_ce = (1.0 * nll[0] + 10.0 * nll[1]) / 11.0
    seg_logits = torch.zeros(2, 5, 2, 2)  # 1 - P(background) = 0.5
    outputs = {"dr": logits, "seg_logits": seg_logits, "attention": torch.ones(2, 1, 2, 2)}
    total, parts = Stage2Loss(weights, attention=2.0)(outputs, {"dr": labels})
    assert parts["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert parts["attention_lesion"].item() == pytest.approx(0.25)
    assert total.item() == pytest.approx(expected_ce.item() + 0.5, rel=1e-6)
    assert torch.equal(lesion_map(seg_logits), torch.full((2, 1, 2, 2), 0.5))
    total, parts = Stage2Loss(attention=0.0)({"dr": logits}, {"dr": labels})  # no attention link needed
    assert set(parts) == {"ce"}
    with pytest.raises(KeyError, match="attention=True"):
        Stage2Loss()({"dr": logits, "seg_logits": seg_logits}, {"dr": labels})
    with pytest.raises(ValueError, match="class_weights must be positive"):
        Stage2Loss((1.0, 0.0, 1.0, 1.0, 1.0))


class FixedHierarchy(nn.Module):
    """HR reference pass with known outputs: P = 0.5 everywhere, attention 0.25."""

    def forward(self, x):
        b, _, h, w = x.shape
        return {"seg_logits": torch.zeros(b, 5, h, w), "attention": torch.full((b, 1, h, w), 0.25)}


def test_stage3_loss_by_hand():
    outputs = {"sr": torch.full((1, 3, 2, 2), 0.5), "seg_logits": torch.full((1, 5, 2, 2), BIG),
               "dr": torch.zeros(1, 5), "attention": torch.full((1, 1, 2, 2), 0.75)}
    batch = {"hr_image": torch.zeros(1, 3, 2, 2), "dr": torch.tensor([2])}
    total, parts = Stage3Loss(FixedHierarchy())(outputs, batch)
    expected = {"sr_mse": 0.25, "tv": 0.0, "seg_consistency": 0.25, "ce": math.log(5),
                "attention_lesion": 0.0625, "attention_consistency": 0.25}
    assert {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()} == {k: v.item() for k, v in parts.items()}
    assert total.item() == pytest.approx(0.25 + 1.0 * 0.25 + math.log(5) + 0.3 * 0.0625 + 10 * 0.25, rel=1e-6)
    with pytest.raises(ValueError, match="loss weight attention_consistency"):
        Stage3Loss(FixedHierarchy(), attention_consistency=-1.0)


# --------------------------------------------------------------------------- stages: who learns from what

def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _has_grad(module: nn.Module) -> bool:
    grads = _grads(module)
    return all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _no_grad(module: nn.Module) -> bool:
    return all(g is None for g in _grads(module))


def test_stage1_trains_sr_and_segmenter_only():
    model, batch = small_model().train(), make_batch()
    configure_stage(model, 1)
    out = model(batch["lr_image"])
    assert "dr" not in out  # the grader is not run in stage 1
    total, _ = Stage1Loss(model.hierarchy.segmenter)(out, batch)
    total.backward()
    parts = model.parts()
    assert _has_grad(parts["upsampler"]) and _has_grad(parts["segmenter"])
    assert _no_grad(parts["grader"]) and _no_grad(parts["fusion"])


def test_stage2_trains_grader_on_ce_and_fusion_on_the_attention_term_only():
    model, batch = small_model().train(), make_batch()
    trainable = configure_stage(model, 2)
    assert {id(p) for p in trainable} == {id(p) for name in ("grader", "fusion") for p in model.parts()[name].parameters()}
    out = model.hierarchy(batch["hr_image"])  # stage 2 on HR images, as the authors train it
    loss = Stage2Loss((1.0, 10.0, 1.44, 25.0, 8.0))
    total, _ = loss(out, batch)
    total.backward(retain_graph=True)
    parts = model.parts()
    assert _has_grad(parts["grader"]) and _has_grad(parts["fusion"])
    assert _no_grad(parts["segmenter"]) and _no_grad(parts["upsampler"])
    grader_grads = [g.clone() for g in _grads(parts["grader"])]
    model.zero_grad(set_to_none=True)
    Stage2Loss((1.0, 10.0, 1.44, 25.0, 8.0), attention=0.0)(out, batch)[0].backward()
    assert all(torch.allclose(a, b) for a, b in zip(grader_grads, _grads(parts["grader"])))  # CE alone
    assert _no_grad(parts["fusion"])


def test_stage3_trains_sr_and_grader_and_feedback_switch_cuts_the_sr_net_off():
    for feedback in (True, False):
        model, batch = small_model(feedback=feedback).train(), make_batch()
        configure_stage(model, 3)
        total, _ = Stage3Loss(model.hierarchy)(model(batch["lr_image"]), batch)
        total.backward()
        parts = model.parts()
        assert _has_grad(parts["upsampler"]) and _has_grad(parts["grader"])
        assert _no_grad(parts["segmenter"]) and _no_grad(parts["fusion"])
        if not feedback:  # only MSE + TV reach the SR net
            sr_grads = [g.clone() for g in _grads(parts["upsampler"])]
            model.zero_grad(set_to_none=True)
            sr = model.upsampler(batch["lr_image"])["sr"]
            (F.mse_loss(sr, batch["hr_image"]) + 1e-6 * ((sr[:, :, 1:] - sr[:, :, :-1]).square().mean()
                                                         + (sr[..., 1:] - sr[..., :-1]).square().mean())).backward()
            assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(sr_grads, _grads(parts["upsampler"])))
    with pytest.raises(ValueError, match="stage must be one of"):
        configure_stage(model, 4)


# --------------------------------------------------------------------------- the 8 project lesions -> DeepMT's 4

def test_deepmt_masks_pool_the_haemorrhages_and_take_validity_from_the_first_source():
    from fundus_lib.data.manifest import LESIONS as PROJECT
    from fundus_lib.models.deepmt import LESION_SOURCES, deepmt_masks

    assert tuple(LESION_SOURCES) == LESIONS
    masks = torch.zeros(2, len(PROJECT), 4, 4)
    for k, name in enumerate(PROJECT):
        masks[:, k, k // 4, k % 4] = 1  # lesion k marks pixel k
    valid = torch.ones(2, len(PROJECT))
    valid[1, PROJECT.index("iHE")] = 0  # second image: haemorrhages not annotated
    valid[1, PROJECT.index("vHE")] = 0
    out, out_valid = deepmt_masks(masks, valid)
    assert out.shape == (2, 4, 4, 4) and out_valid.shape == (2, 4)
    for lesion, sources in LESION_SOURCES.items():
        expected = masks[:, [PROJECT.index(s) for s in sources]].amax(dim=1)
        assert torch.equal(out[:, LESIONS.index(lesion)], expected)
    assert out[0, LESIONS.index("HE")].sum() == 3  # iHE + vHE + pHE pixels
    assert out[:, :, 1, 2].sum() == 0 and out[:, :, 1, 3].sum() == 0  # NV, FiP: background
    assert out_valid[0].tolist() == [1, 1, 1, 1] and out_valid[1].tolist() == [1, 0, 1, 1]
    assert torch.equal(deepmt_masks(masks)[1], torch.ones(2, 4))
    with pytest.raises(ValueError, match="masks must be"):
        deepmt_masks(masks[:, :4])
    with pytest.raises(ValueError, match="mask_valid must have shape"):
        deepmt_masks(masks, valid[:, :4])


def test_gradcam_stage_maps_are_the_projects_gradcam_with_the_authors_normalisation():
    from fundus_lib.explain import gate, gradient_maps, normalise

    torch.manual_seed(2)
    grader = SPPGrader().eval()
    stages = grader.features(torch.randn(2, 7, 64, 64))
    acts = [stages[s] for s in GRADER_STAGES]
    score = dr_score(grader.classify(stages["layer4"]))
    raw = gradient_maps(score, dict(zip(GRADER_STAGES, acts)), "gradcam")
    for mine, reference in zip(gradcam_stage_maps(acts, score), raw.values()):
        assert torch.allclose(mine[:, 0], normalise(gate(reference)), atol=1e-5)  # explain adds 1e-7 to the range


def test_transposed_convolutions_start_as_bilinear_upsampling():
    from fundus_lib.models.deepmt import bilinear_upsampling_
    conv = bilinear_upsampling_(torch.nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1))
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 2, 1, 1)
    y = conv(x)
    assert y.shape == (1, 2, 8, 8)
    assert torch.allclose(y[0, 0, ::2, ::2], x[0, 0])                      # the input pixels are kept
    assert torch.allclose(y[0, 0, 0, 1:-1:2], (x[0, 0, 0, :-1] + x[0, 0, 0, 1:]) / 2)  # new ones: the mean
    assert torch.equal(y[0, 0], y[0, 1])                                   # channels stay apart
    net = SRNet(4)
    reference = bilinear_upsampling_(torch.nn.ConvTranspose2d(32, 32, 3, stride=2, padding=1, output_padding=1))
    assert all(torch.equal(stage[0].weight, reference.weight) for stage in net.upsample)
    assert all(not stage[0].bias.detach().any() for stage in net.upsample)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        bilinear_upsampling_(torch.nn.ConvTranspose2d(2, 3, 3, stride=2))
