"""Tests for fundus_lib.models.o_o: the o_O net's layer table, parameter counts, stages and thresholds."""
from __future__ import annotations

import copy
import itertools
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn

from fundus_lib.metrics import quadratic_weighted_kappa
from fundus_lib.models import build_model
from fundus_lib.models import o_o
from fundus_lib.models.o_o import (DEFAULT_THRESHOLDS, STAGES, Maxout, OONet, RMSPool2d, apply_thresholds,
                                   architecture, fit_thresholds, layer_table, parameter_count,
                                   transfer_conv_weights)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=None)
def _built(n_blocks: int, input_size: int, width: int, untied_biases: bool = True) -> OONet:
    """Each net initialised once (orthogonal init dominates the run time); deep-copy before changing it."""
    torch.manual_seed(n_blocks * 1000 + width)
    return OONet(n_blocks, input_size, width, untied_biases=untied_biases).eval()


# Output sizes of net B in the original solution outline (layers 2-19) for 448 px input.
OUTLINE_SIZES = [224, 225, 112, 56, 57, 56, 27, 28, 27, 28, 13, 14, 13, 14, 6, 5, 2]


def test_sizes_follow_the_original_outline_and_the_paper_blocks():
    rows = architecture()
    assert [r.size for r in rows if r.size is not None] == OUTLINE_SIZES
    ends = {r.name.split(".")[1]: r.size for r in rows if r.name.startswith("features.")}
    assert (ends["block2"], ends["block3"], ends["block4"]) == (27, 13, 6)  # ELLG Sec. 2.1
    kinds = [r.kind for r in rows]
    assert kinds.count("conv") == 12 and kinds.count("maxpool") == 4 and kinds[-8:] == [
        "rmspool", "dropout", "dense", "maxout", "dropout", "dense", "maxout", "output"]
    assert all(r.kernel == 4 for r in rows if r.kind == "conv")


def _hand_count(untied: bool) -> int:
    convs = [(3, 32, 224), (32, 32, 225), (32, 64, 56), (64, 64, 57), (64, 64, 56), (64, 128, 28), (128, 128, 27),
             (128, 128, 28), (128, 256, 14), (256, 256, 13), (256, 256, 14), (256, 512, 5)]
    weights = sum(i * o * 16 for i, o, _ in convs)
    biases = sum(o * s * s if untied else o for _, o, s in convs)
    dense = (512 * 2 * 2 * 1024 + 1024) + (512 * 1024 + 1024) + (512 + 1)
    return weights + biases + dense


@pytest.mark.parametrize("untied, expected", [(True, 12_465_121), (False, 8_181_633)])
def test_parameter_count_of_the_512px_net(untied, expected):
    assert _hand_count(untied) == expected
    assert parameter_count(untied_biases=untied) == expected
    assert int(layer_table(untied_biases=untied)["parameters"].sum()) == expected
    with torch.device("meta"):  # shapes only: no memory, no orthogonal initialisation to wait for
        assert n_params(OONet(untied_biases=untied)) == expected


@pytest.mark.parametrize("image_size", sorted(STAGES))
def test_stage_nets_counts_and_forward_shapes_match_the_table(image_size):
    n_blocks, crop = STAGES[image_size]
    model = _built(n_blocks, crop, 2)
    assert n_params(model) == parameter_count(n_blocks, crop, width=2)
    shapes = {}
    hooks = [model.get_submodule(r.name).register_forward_hook(
        lambda m, i, o, name=r.name: shapes.__setitem__(name, tuple(o.shape[1:])))
        for r in architecture(n_blocks, crop, 2)]
    with torch.no_grad():
        out = model(torch.randn(2, 3, crop, crop))
    for h in hooks:
        h.remove()
    for r in architecture(n_blocks, crop, 2):
        if r.size is not None:
            assert shapes[r.name] == (r.units, r.size, r.size), r.name
        else:  # the first dropout still sees the (C, s, s) map that the first dense layer flattens
            assert int(np.prod(shapes[r.name])) == r.units, r.name
    assert set(out) == {"score"} and out["score"].shape == (2,) and torch.isfinite(out["score"]).all()
    table = layer_table(n_blocks, crop, width=2)
    assert list(table["layer"]) == [r.name for r in architecture(n_blocks, crop, 2)]
    assert model.block_names == tuple(f"features.block{b}" for b in range(1, n_blocks + 1))


def test_registry_builds_the_net():
    model = build_model("o_o", n_blocks=3, input_size=112, width=2)
    assert isinstance(model, OONet) and model.n_blocks == 3


def test_initialisation_follows_the_original():
    model = _built(3, 112, 4)
    conv = model.features.block1.conv2
    flat = conv.weight.reshape(conv.weight.shape[0], -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(flat.shape[0]), atol=1e-5, rtol=0)
    assert conv.bias is None and conv.untied_bias.shape == (4, 57, 57)
    assert torch.all(conv.untied_bias == o_o.BIAS_INIT)
    assert torch.all(model.head.dense1.bias == o_o.BIAS_INIT)
    assert torch.all(model.head.output.bias == 0)
    tied = _built(3, 112, 4, False).features.block1.conv1
    assert tied.bias.shape == (4,) and torch.all(tied.bias == o_o.BIAS_INIT)


def test_maxout_and_rms_pool_on_hand_values():
    x = torch.tensor([[1.0, 5.0, -2.0, -3.0]])
    torch.testing.assert_close(Maxout(2)(x), torch.tensor([[5.0, -2.0]]))  # consecutive pairs
    patch = torch.arange(9.0).reshape(1, 1, 3, 3)
    expected = torch.sqrt((patch ** 2).mean() + o_o.RMS_EPS)
    torch.testing.assert_close(RMSPool2d(3, 2)(patch), expected.reshape(1, 1, 1, 1))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="input_size=64 is too small"):
        OONet(5, 64, width=2)
    with pytest.raises(ValueError, match="n_blocks"):
        OONet(6, 448)
    with pytest.raises(ValueError, match="dropout"):
        OONet(3, 112, dropout=1.0)
    with pytest.raises(ValueError, match="input_size=112"):
        _built(3, 112, 2)(torch.zeros(1, 3, 128, 128))


def test_transfer_conv_weights_between_stages():
    small, large = _built(3, 112, 2), copy.deepcopy(_built(4, 224, 2))
    copied = transfer_conv_weights(small, large)
    expected = [f"features.block{b}.conv{i}.weight" for b, i in
                [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)]]
    assert copied == expected  # untied biases (other sizes) and the dense head are not copied
    for name in expected:
        torch.testing.assert_close(large.get_parameter(name), small.get_parameter(name))
    assert not torch.equal(large.head.dense2.weight, small.head.dense2.weight)
    tied_large = copy.deepcopy(_built(4, 224, 2, False))
    assert len(transfer_conv_weights(_built(3, 112, 2, False), tied_large)) == 16  # weights and biases of 8 convs
    with pytest.raises(ValueError, match="width"):
        transfer_conv_weights(_built(3, 112, 4), large)


# ------------------------------------------------------------------------------ thresholds

def test_apply_thresholds_boundaries():
    scores = [-1.0, 0.49, 0.5, 1.5, 2.49, 3.5, 9.0]
    np.testing.assert_array_equal(apply_thresholds(scores), [0, 0, 1, 2, 2, 4, 4])
    np.testing.assert_array_equal(apply_thresholds([0.5, 0.7], [0.5, 0.5, 1.0]), [2, 2])  # tied thresholds: empty grade
    with pytest.raises(ValueError, match="thresholds"):
        apply_thresholds([1.0], [1.5, 0.5])
    with pytest.raises(ValueError, match="scores"):
        apply_thresholds([np.nan])


def test_batched_kappa_equals_metrics_kappa():
    rng = np.random.default_rng(0)
    for _ in range(5):
        t, p = rng.integers(0, 5, 50), rng.integers(0, 5, 50)
        cm = np.bincount(t * 5 + p, minlength=25).reshape(1, 5, 5).astype(float)
        assert o_o._batched_kappa(cm)[0] == pytest.approx(quadratic_weighted_kappa(t, p, 5), abs=1e-12)


def test_fit_thresholds_separates_separable_scores():
    grades = np.repeat(np.arange(5), 4)
    scores = grades * 0.3 + np.tile([0.0, 0.05, 0.1, 0.15], 5)  # ordered but far from 0.5, 1.5, ...
    assert quadratic_weighted_kappa(grades, apply_thresholds(scores)) < 0.9
    thresholds = fit_thresholds(scores, grades)
    np.testing.assert_array_equal(apply_thresholds(scores, thresholds), grades)


def _kappa(scores, grades, thresholds):
    return quadratic_weighted_kappa(grades, apply_thresholds(scores, thresholds), 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_thresholds_is_coordinate_optimal_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 5, 60)
    scores = np.round(grades + rng.normal(0, 0.9, 60), 1)  # rounding makes ties
    thresholds = fit_thresholds(scores, grades)
    best = _kappa(scores, grades, thresholds)
    assert best >= _kappa(scores, grades, DEFAULT_THRESHOLDS)
    assert np.all(np.diff(thresholds) >= 0)
    grid = np.concatenate([np.unique(scores), np.unique(scores) + 0.05, [scores.min() - 1, scores.max() + 1]])
    for j, value in itertools.product(range(4), grid):
        moved = thresholds.copy()
        moved[j] = value
        if np.all(np.diff(moved) >= 0):
            assert _kappa(scores, grades, moved) <= best + 1e-12, (j, value)


def test_fit_thresholds_bad_arguments():
    with pytest.raises(ValueError, match="grades"):
        fit_thresholds([0.1, 0.2], [0, 7])
    with pytest.raises(ValueError, match="grades"):
        fit_thresholds([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="single class"):
        fit_thresholds([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="initial"):
        fit_thresholds([0.1, 0.2], [0, 1], initial=[0.5, 1.5])
