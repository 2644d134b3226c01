"""Tests for fundus_lib.explain: CAM / Grad-CAM / Grad-CAM++ against a hand-written reference of
pytorch-grad-cam's pipeline on a model with analytic gradients, ELLG's gate and fusion, hook
clean-up, and the saliency metrics on hand-made maps and against scikit-learn."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score, roc_auc_score
from torch import nn

from fundus_lib import explain
from fundus_lib.explain import (LayerRecorder, energy_inside, fuse, gate, gmsm, gradient_maps, heat_map, layer_maps,
                                normalise, pointing_game, saliency, saliency_auc, saliency_iou, saliency_scores,
                                select_score, upsample)
from fundus_lib.models.o_o import OONet

K, H, W, C = 4, 10, 14, 3  # channels, input size (non-square), classes


class Analytic(nn.Module):
    """features = 2x2 average pool of the input; logits_c = <V_c, f> + q/2 |f|^2, so d logit_c / d f = V_c + q f."""

    def __init__(self, v: torch.Tensor, q: float) -> None:
        super().__init__()
        self.features = nn.AvgPool2d(2)
        self.v = nn.Parameter(v)
        self.q = q

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        logits = torch.einsum("ckhw,bkhw->bc", self.v, f) + 0.5 * self.q * (f ** 2).sum(dim=(1, 2, 3))[:, None]
        return {"logits": logits, "score": logits[:, 0]}


def _analytic(q: float, seed: int = 0) -> tuple[Analytic, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(C, K, H // 2, W // 2, generator=g, dtype=torch.float64)
    v[:, :, ::3, ::2] = 0.0  # zero gradients (when q = 0), as behind a ReLU
    return Analytic(v, q).double().eval(), torch.rand(2, K, H, W, generator=g, dtype=torch.float64)


def _scale_cam_image(cams: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """pytorch-grad-cam's utils/image.py scale_cam_image (size given as (width, height) for cv2)."""
    out = []
    for img in cams:
        img = img - np.min(img)
        img = img / (1e-7 + np.max(img))
        out.append(cv2.resize(np.float32(img), size) if size is not None else img)
    return np.float32(out)


def _reference(model: Analytic, x: torch.Tensor, classes: np.ndarray, method: str) -> np.ndarray:
    """pytorch-grad-cam's BaseCAM pipeline for one target layer, written out with the analytic gradients."""
    a = x.numpy().reshape(2, K, H // 2, 2, W // 2, 2).mean(axis=(3, 5))
    g = model.v.detach().numpy()[classes] + model.q * a
    if method == "gradcam":
        weights = g.mean(axis=(2, 3))
    else:
        g2, g3 = g ** 2, g ** 3
        aij = g2 / (2 * g2 + a.sum(axis=(2, 3))[:, :, None, None] * g3 + 1e-6)
        aij = np.where(g != 0, aij, 0)
        weights = (np.maximum(g, 0) * aij).sum(axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * a).sum(axis=1), 0)
    per_layer = _scale_cam_image(cam, (W, H))[:, None]
    return _scale_cam_image(np.maximum(per_layer, 0).mean(axis=1))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("q", [0.0, 0.3])
@pytest.mark.parametrize("output, target", [("score", None), ("logits", 2), ("logits", [1, 0]), ("logits", None)])
def test_gradcam_and_gradcam_pp_equal_the_reference(method, q, output, target):
    model, x = _analytic(q)
    logits = model(x)["logits"].detach()
    if output == "score":
        classes = np.zeros(2, dtype=int)
    elif target is None:
        classes = logits.argmax(dim=1).numpy()
    else:
        classes = np.broadcast_to(np.asarray(target), (2,))
    ours = saliency(model, x, "features", method=method, output=output, target=target)
    assert ours.shape == (2, H, W)
    np.testing.assert_allclose(ours.numpy(), _reference(model, x, classes, method), atol=1e-5)
    if q == 0.0:  # the maps must differ between methods, or the test could not tell them apart
        other = "gradcam" if method == "gradcam++" else "gradcam++"
        assert not torch.allclose(ours, saliency(model, x, "features", method=other, output=output, target=target))


class GapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, K, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(K, C)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"dr": self.fc(self.features(x).mean(dim=(2, 3)))}


def test_cam_equals_gradcam_times_area_on_a_gap_linear_head():
    torch.manual_seed(0)
    model, x = GapNet().eval(), torch.randn(2, 3, 8, 6)
    cam = layer_maps(model, x, "features", method="cam", head="fc", target=1)["features"]
    grad = layer_maps(model, x, "features", method="gradcam", target=1)["features"]
    torch.testing.assert_close(cam, grad * 8 * 6, rtol=1e-5, atol=1e-6)
    acts = model.features(x).detach()
    torch.testing.assert_close(cam, torch.einsum("k,bkhw->bhw", model.fc.weight[1].detach(), acts))
    # equal heat maps up to the normalisation's 1e-7, which weighs more on the 48x smaller Grad-CAM range
    torch.testing.assert_close(saliency(model, x, "features", method="cam", head=model.fc, target=1),
                               saliency(model, x, "features", method="gradcam", target=1), rtol=0, atol=1e-4)


def test_select_score_regression_and_classes():
    scores = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(select_score({"score": scores}), scores)
    torch.testing.assert_close(select_score(scores[:, None]), scores)
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    torch.testing.assert_close(select_score({"dr": logits, "dme": logits}, "dr"), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(select_score(logits, target=2), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(select_score(logits, target=[2, 1]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="output must name"):
        select_score({"dr": logits, "dme": logits})
    with pytest.raises(ValueError, match="'grade' is not among"):
        select_score({"dr": logits}, "grade")
    with pytest.raises(ValueError, match="target"):
        select_score(logits, target=3)
    with pytest.raises(ValueError, match="target"):
        select_score(logits, target=[0, 1, 2])
    with pytest.raises(ValueError, match="target"):
        select_score(scores, target=1)  # a regression score has the single class 0


def test_gate_is_relu_at_zero_and_eq2_removes_sub_threshold_fluctuations():
    raw = torch.tensor([[[-1.0, 0.5], [1.0, 3.0]]])
    torch.testing.assert_close(gate(raw), torch.relu(raw))
    torch.testing.assert_close(gate(raw, 1.0), torch.tensor([[[1.0, 1.0], [1.0, 3.0]]]))
    torch.testing.assert_close(normalise(gate(raw, 1.0)), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalise(gate(raw)), torch.tensor([[[0.0, 0.5 / 3], [1 / 3, 1.0]]]), atol=1e-6, rtol=0)
    fluctuation = torch.tensor([[[0.2, 0.3], [0.25, 0.6]]])  # a normal image: nothing reaches t = 1
    assert normalise(gate(fluctuation)).max() == pytest.approx(1.0, abs=1e-6)  # ReLU magnifies it to full range
    assert torch.all(normalise(gate(fluctuation, explain.GMSM_T)) == 0)  # the gate removes it
    with pytest.raises(ValueError, match="t must be"):
        gate(raw, float("nan"))


def test_upsample_is_half_pixel_bilinear_like_cv2():
    small = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    ramp = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(upsample(small, (4, 4))[0], torch.outer(ramp, ramp))
    rng = np.random.default_rng(0)
    m = rng.random((5, 7)).astype(np.float32)
    for size in [(10, 14), (13, 9)]:
        np.testing.assert_allclose(upsample(torch.from_numpy(m)[None], size)[0].numpy(),
                                   cv2.resize(m, size[::-1]), atol=1e-5)


def test_heat_map_does_not_depend_on_the_raw_scale():
    raw = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)) - 0.3
    reference = heat_map(raw, (10, 14))
    assert reference.amax(dim=(1, 2)).min() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(heat_map(raw * 1e-8, (10, 14)), reference, atol=1e-5, rtol=0)  # range << 1e-7
    torch.testing.assert_close(reference, normalise(upsample(gate(raw), (10, 14))), atol=1e-5, rtol=0)


def test_fuse_is_eq3_mean_of_normalised_maps():
    low = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    high = torch.tensor([[[4.0, 0.0, 0.0, 0.0]] * 4]) + torch.eye(4)[None] * 2  # (1, 4, 4)
    expected = 0.5 * (torch.outer(torch.tensor([0.0, 0.25, 0.75, 1.0]), torch.tensor([0.0, 0.25, 0.75, 1.0]))
                      + high[0] / 6)
    torch.testing.assert_close(fuse([low, high], (4, 4))[0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least one"):
        fuse([], (4, 4))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_are_removed_and_parameter_grads_untouched():
    model, x = _analytic(0.3)
    layer_maps(model, x, "features", output="score")
    assert _hook_count(model) == 0 and model.v.grad is None
    with pytest.raises(RuntimeError, match="boom"):
        with LayerRecorder(model, [model.features]):
            assert _hook_count(model) == 1
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_recorder_gives_the_same_maps_as_layer_maps():
    model, x = _analytic(0.3)
    with LayerRecorder(model, "features") as recorder:
        outputs = model(x.clone().requires_grad_())
    maps = gradient_maps(select_score(outputs, "logits", 1), recorder.activations, "gradcam++")
    expected = layer_maps(model, x, "features", output="logits", target=1)["features"]
    torch.testing.assert_close(maps["features"], expected)


def test_differentiable_modes():
    model, x = _analytic(0.3)
    x.requires_grad_()
    maps = {mode: layer_maps(model, x, "features", method="gradcam", output="score", differentiable=mode)["features"]
            for mode in ("none", "activations", "full")}
    assert not maps["none"].requires_grad
    # constant weights w = mean_ij (V_0 + q f): d sum(map) / dx = w / 4 on every pixel (2x2 average pool)
    f = torch.nn.functional.avg_pool2d(x.detach(), 2)
    weights = (model.v.detach()[0] + model.q * f).mean(dim=(2, 3))
    grad_x, grad_v = torch.autograd.grad(maps["activations"].sum(), [x, model.v], allow_unused=True)
    torch.testing.assert_close(grad_x, (weights / 4)[:, :, None, None].expand_as(x))
    assert grad_v is None
    (grad_v,) = torch.autograd.grad(maps["full"].sum(), [model.v])  # second order: the weights depend on V
    assert grad_v.abs().sum() > 0
    for m in maps.values():
        torch.testing.assert_close(m.detach(), maps["none"])
    with pytest.raises(ValueError, match="differentiable must be"):
        layer_maps(model, x, "features", output="score", differentiable=True)


def test_maps_of_a_batch_equal_maps_of_single_images_on_the_o_o_net():
    torch.manual_seed(0)
    model = OONet(3, 112, width=2).eval()
    x = torch.randn(2, 3, 112, 112)
    batch = gmsm(model, x, "features.block1", "features.block3", t=0.0)
    assert batch.shape == (2, 112, 112) and batch.min() >= 0 and batch.max() <= 1
    assert torch.all(batch.amax(dim=(1, 2)) >= 0.5)  # at least one of the two maps is not flat
    single = torch.cat([gmsm(model, x[i:i + 1], "features.block1", "features.block3", t=0.0) for i in range(2)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(gmsm(model, x, "features.block1", "features.block3"),
                               saliency(model, x, model.block_names[::2], t=explain.GMSM_T))


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features, self.side, self.spare = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": self.features(x).mean(dim=(1, 2, 3)), "side": self.side(x).mean(dim=(1, 2, 3))}


def test_bad_arguments_name_the_argument():
    model, x = TwoBranch(), torch.randn(2, 3, 4, 4)
    cases = [
        (dict(layers="nope"), "no submodule 'nope'"),
        (dict(layers=nn.Conv2d(3, 2, 1)), "layers must be"),
        (dict(layers="spare", output="score"), "did not run"),
        (dict(layers="side", output="score"), "does not depend on 'side'"),
        (dict(layers=[], output="score"), "at least one layer"),
        (dict(layers="features", output="score", method="lime"), "method must be"),
        (dict(layers="features", output="score", method="cam"), "head is required"),
        (dict(layers="features", output="score", head="side"), "head is required"),
        (dict(layers="features", output="score", method="cam", head="side"), "head must be the nn.Linear"),
        (dict(layers="features"), "output must name"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            layer_maps(model, x, **kwargs)
    with pytest.raises(ValueError, match="images must be"):
        layer_maps(model, x[0], "features", output="score")
    assert _hook_count(model) == 0


# ------------------------------------------------------------------------------ saliency metrics

def _hand_made() -> tuple[np.ndarray, np.ndarray]:
    """Three 6x6 images: peak on the lesion, peak 2 px right of the lesion, no lesion."""
    maps = np.zeros((3, 6, 6))
    masks = np.zeros((3, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps[0, 1:3, 1:3] = [[0.5, 1.0], [0.5, 0.5]]
    maps[0, 4, 4] = 0.25
    masks[1, 2, 1:3] = True
    maps[1, 2, 4] = 1.0
    maps[1, 2, 2] = 0.5
    maps[2, 0, 0] = 1.0
    return maps, masks


def test_pointing_game_on_hand_made_maps():
    maps, masks = _hand_made()
    np.testing.assert_array_equal(pointing_game(maps, masks), [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(pointing_game(maps, masks, tolerance=2), [1.0, 1.0, np.nan])
    fov = np.ones_like(masks)
    fov[1, :, 3:] = False  # the off-lesion peak is outside the field of view
    np.testing.assert_array_equal(pointing_game(maps, masks, fov), [1.0, 1.0, np.nan])
    flat = np.ones((1, 6, 6))
    assert pointing_game(flat, masks[:1])[0] == 0.0  # a constant map points nowhere
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, masks, tolerance=-1)


def test_auc_iou_energy_on_hand_made_maps():
    maps, masks = _hand_made()
    assert saliency_auc(masks.astype(float), masks)[0] == 1.0
    assert saliency_auc(1.0 - masks, masks)[1] == 0.0
    assert np.isnan(saliency_auc(maps, masks)[2])
    # image 0: map >= 0.5 on exactly the 4 lesion pixels; image 1: {(2,4), (2,2)} vs lesion {(2,1), (2,2)}
    np.testing.assert_allclose(saliency_iou(maps, masks), [1.0, 1 / 3, np.nan])
    np.testing.assert_allclose(saliency_iou(maps, masks, threshold=0.75), [0.25, 0.0, np.nan])
    np.testing.assert_allclose(energy_inside(maps, masks), [2.5 / 2.75, 0.5 / 1.5, np.nan])
    assert energy_inside(np.zeros((1, 6, 6)), masks[:1])[0] == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        energy_inside(-maps, masks)
    table = saliency_scores(maps, masks)
    assert list(table.columns) == ["pointing_game", "auc", "iou", "energy"] and len(table) == 3
    assert table.iloc[2].isna().all()


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_and_iou_equal_sklearn_inside_the_fov(seed):
    rng = np.random.default_rng(seed)
    maps = rng.random((4, 9, 11))
    masks = rng.random((4, 9, 11)) < 0.2
    yy, xx = np.mgrid[:9, :11]
    fov = np.broadcast_to((yy - 4) ** 2 + (xx - 5) ** 2 <= 20, maps.shape)
    aucs, ious = saliency_auc(maps, masks, fov), saliency_iou(maps, masks, fov, threshold=0.7)
    for i in range(4):
        truth, values = masks[i][fov[i]], maps[i][fov[i]]
        assert aucs[i] == pytest.approx(roc_auc_score(truth, values), abs=1e-12)
        assert ious[i] == pytest.approx(jaccard_score(truth, values >= 0.7), abs=1e-12)
    assert not np.allclose(aucs, saliency_auc(maps, masks))  # the FOV matters


def test_metric_inputs_are_checked():
    maps, masks = _hand_made()
    with pytest.raises(ValueError, match="masks must have"):
        saliency_auc(maps, masks[:, :5])
    with pytest.raises(ValueError, match="fov must be binary"):
        saliency_iou(maps, masks, fov=np.full(maps.shape, 0.5))
    with pytest.raises(ValueError, match="maps must be"):
        pointing_game(maps[0], masks[0])
