"""Tests for fundus_lib.models.clpi: Table II geometry by gradient, patch/image equivalence, hand-counted
parameters, Eq. 1, where the gradients go, losses, schedule, and a smoke run of both training stages."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fundus_lib.models import build_model
from fundus_lib.models.clpi import (CLPI, LesionAttentionGenerator, PatchClassifier, clpi_loss, expand_attention,
                                    generator_plan, parameter_counts, patch_loss, warmup_cosine, weighted_input)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def generator() -> LesionAttentionGenerator:
    """Paper-width generator in eval mode, its BN statistics taken from one batch so that
    activations (and logits) are of order 1 rather than shrinking layer by layer."""
    torch.manual_seed(0)
    model = LesionAttentionGenerator("paper")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 256, 256))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def test_plan_is_table_ii_and_the_authors_code():
    # (out channels, kernel, stride) copied from Table II and from clfnet/lesionnet.py.
    assert generator_plan("paper") == [(32, 5, 1), (64, 2, 2), (128, 2, 2), (256, 2, 2), (512, 2, 2),
                                       (1024, 2, 2), (1024, 2, 2), (1024, 1, 1)]
    assert generator_plan("authors") == [(32, 5, 1), (32, 2, 2), (64, 2, 2), (128, 2, 2), (256, 2, 2),
                                         (512, 2, 2), (1024, 2, 2), (1024, 1, 1), (1024, 1, 1)]
    with pytest.raises(ValueError, match="widths must be one of"):
        generator_plan("wide")
    with pytest.raises(ValueError, match="at least 8"):
        generator_plan((32, 64, 128))


def test_receptive_field_is_68_measured_by_gradient(generator):
    image = torch.randn(1, 3, 256, 256, requires_grad=True)
    logits = generator(image)["patch_logits"]
    assert logits.shape == (1, 4, 4, 4)
    logits[0, :, 1, 2].sum().backward()
    rows = image.grad[0].abs().sum(dim=(0, 2)).nonzero().flatten()
    cols = image.grad[0].abs().sum(dim=(0, 1)).nonzero().flatten()
    # Unit (1, 2) sees rows 64 - 2 .. 64 + 65 and columns 128 - 2 .. 128 + 65: 68 x 68, stride 64.
    assert (rows.min().item(), rows.max().item()) == (62, 129)
    assert (cols.min().item(), cols.max().item()) == (126, 193)
    assert len(rows) == len(cols) == 68


def test_a_68_pixel_patch_gives_one_output(generator):
    patches = torch.randn(3, 3, 68, 68)
    assert generator.classify_windows(patches).shape == (3, 4, 1, 1)
    assert PatchClassifier(generator)(patches)["patch_logits"].shape == (3, 4)
    with pytest.raises(ValueError, match="68, 68"):
        PatchClassifier(generator)(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="LesionAttentionGenerator"):
        PatchClassifier(torch.nn.Identity())


@torch.no_grad()
def test_whole_1024_image_equals_its_68_pixel_windows_at_stride_64(generator):
    torch.manual_seed(1)
    image = torch.randn(1, 3, 1024, 1024)
    whole = generator(image)
    assert whole["patch_logits"].shape == (1, 4, 16, 16)
    assert torch.allclose(whole["attention"].sum(dim=1), torch.ones(1, 16, 16))
    padded = F.pad(image, (2, 2, 2, 2))  # the generator's zero border (Table II's padding of the 5x5 conv)
    cells = [(0, 0), (0, 15), (15, 0), (15, 15), (7, 8), (3, 12)]  # corners, edges' neighbours, interior
    windows = torch.cat([padded[:, :, 64 * i:64 * i + 68, 64 * j:64 * j + 68] for i, j in cells])
    per_window = PatchClassifier(generator)(windows)["patch_logits"]
    expected = torch.stack([whole["patch_logits"][0, :, i, j] for i, j in cells])
    assert expected.abs().max().item() > 0.1  # logits of order 1: the tolerance below is meaningful
    assert (per_window - expected).abs().max().item() < 1e-5
    # Table II's literal padding 2 on the patch too breaks the equivalence (see the module docstring).
    literal = generator(windows)["patch_logits"].flatten(1)
    assert (literal - expected).abs().max().item() > 1e-2


def test_generator_parameters_hand_counted_from_table_ii():
    # conv weights (no bias) + BN (weight, bias) per layer, then the 1x1 head to 4 classes (no bias).
    paper = (3 * 32 * 25 + 64) + (32 * 64 * 4 + 128) + (64 * 128 * 4 + 256) + (128 * 256 * 4 + 512) \
        + (256 * 512 * 4 + 1024) + (512 * 1024 * 4 + 2048) + (1024 * 1024 * 4 + 2048) + (1024 * 1024 + 2048) \
        + 1024 * 4
    authors = (3 * 32 * 25 + 64) + (32 * 32 * 4 + 64) + (32 * 64 * 4 + 128) + (64 * 128 * 4 + 256) \
        + (128 * 256 * 4 + 512) + (256 * 512 * 4 + 1024) + (512 * 1024 * 4 + 2048) + 2 * (1024 * 1024 + 2048) \
        + 1024 * 4
    assert paper == 8_050_976 and authors == 4_909_408
    assert n_params(LesionAttentionGenerator("paper")) == paper
    assert n_params(LesionAttentionGenerator("authors")) == authors


def test_clpi_parameter_counts_by_part():
    counts = parameter_counts(CLPI(n_dr=5))
    # torchvision DenseNet-121: 7,978,856 parameters, of which the ImageNet classifier 1024*1000 + 1000;
    # a 12-channel first conv adds 64 * 9 * 7 * 7 weights.
    densenet = 7_978_856 - (1024 * 1000 + 1000) + 64 * 9 * 49
    fusion = 1025 * 1024 + 2 * 1024  # 1x1 conv on [F ; 1 - P_0] (no bias, as in the code) + BN
    assert (densenet, fusion) == (6_982_080, 1_051_648)
    assert counts == {"generator": 8_050_976, "grading_backbone": densenet, "fusion": fusion,
                      "classifier": 1024 * 5 + 5, "total": 16_089_829}
    no_shortcut = parameter_counts(CLPI(n_dr=2, widths="authors", shortcut=False))
    assert no_shortcut["fusion"] == 1024 * 1024 + 2 * 1024 and no_shortcut["classifier"] == 1024 * 2 + 2


def test_attention_expansion_and_weighted_input_eq_1():
    p = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float32)
    assert torch.equal(expand_attention(p, (4, 4))[0, 0], expected)  # Appendix A, Fig. 9
    with pytest.raises(ValueError, match="duplication"):
        expand_attention(p, (5, 4))
    image = torch.rand(2, 3, 4, 4)
    attention = torch.rand(2, 4, 4, 4)
    weighted = weighted_input(image, attention)
    assert weighted.shape == (2, 12, 4, 4)
    for i in range(4):
        for j in range(3):
            assert torch.equal(weighted[:, 3 * i + j], (attention[:, i] + 1) * image[:, j])


@pytest.fixture(scope="module")
def small_clpi() -> CLPI:
    torch.manual_seed(2)
    return CLPI(n_dr=5, widths="authors")


@torch.no_grad()
def test_forward_outputs_and_shapes(small_clpi):
    out = small_clpi(torch.randn(2, 3, 128, 128))
    assert out["dr"].shape == (2, 5)
    assert out["patch_logits"].shape == out["attention"].shape == (2, 4, 2, 2)
    assert torch.allclose(out["attention"], out["patch_logits"].softmax(dim=1))
    full = CLPI(n_dr=2, widths="authors", grading_scale=1.0)  # DenseNet features 2x2, shortcut 1x1 duplicated
    assert full(torch.randn(2, 3, 64, 64))["dr"].shape == (2, 2)


def test_random_first_conv_filters_are_not_tiled(small_clpi):
    # Tiled filters would make the first conv blind to the attention: sum_i (P_i + 1) I = 5 I.
    weight = small_clpi.backbone.features.conv0.weight
    assert weight.shape[1] == 12
    assert all(not torch.allclose(weight[:, :3], weight[:, 3 * i:3 * i + 3]) for i in (1, 2, 3))


def test_bad_arguments_are_rejected(small_clpi):
    with pytest.raises(ValueError, match="multiples of 64"):
        small_clpi(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match="multiple of 0.5"):
        CLPI(grading_scale=0.3)
    with pytest.raises(ValueError, match="DenseNet"):
        CLPI(backbone="resnet50")
    with pytest.raises(ValueError, match="n_dr"):
        CLPI(n_dr=1)
    with pytest.raises(ValueError, match="H, W >= 64"):
        LesionAttentionGenerator("authors")(torch.randn(1, 3, 32, 32))


def generator_grads(model: CLPI) -> list[torch.Tensor | None]:
    return [p.grad for p in model.generator.parameters()]


def backward_grade_loss(model: CLPI) -> None:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = model(torch.randn(2, 3, 64, 64))
    clpi_loss(out, {"dr": torch.tensor([0, 4])}).backward()


def test_grade_loss_reaches_the_generator_only_through_the_shortcut(small_clpi):
    model = small_clpi.train()
    backward_grade_loss(model)
    assert model.generator.head.weight.grad.norm() > 1e-2
    shortcut_weights = model.fusion[0].weight[:, -1].detach().clone()
    with torch.no_grad():
        model.fusion[0].weight[:, -1] = 0  # cut the shortcut: the I_AM path alone remains
    try:
        backward_grade_loss(model)
        assert all(g is None or g.abs().sum() == 0 for g in generator_grads(model))
        assert model.backbone.features.conv0.weight.grad.abs().sum() > 0  # the backbone still learns
    finally:
        with torch.no_grad():
            model.fusion[0].weight[:, -1] = shortcut_weights


def test_without_shortcut_the_gradient_goes_through_the_backbone():
    torch.manual_seed(4)
    model = CLPI(n_dr=5, widths="authors", shortcut=False).train()
    backward_grade_loss(model)
    assert model.generator.head.weight.grad.norm() > 1e-2  # exactly 0 were the 4 maps' first-conv filters tiled


def test_frozen_generator_gets_no_gradient_and_keeps_its_statistics():
    torch.manual_seed(5)
    model = CLPI(n_dr=5, widths="authors", train_generator=False).train()
    assert not model.generator.training and model.fc.training
    statistics = model.generator.features[0][1].running_mean.clone()
    backward_grade_loss(model)
    assert all(g is None for g in generator_grads(model))
    assert torch.equal(model.generator.features[0][1].running_mean, statistics)
    patches = PatchClassifier(model.generator).train()  # pre-training still works on the frozen model's generator
    patch_loss(patches(torch.randn(4, 3, 68, 68)), {"patch_labels": torch.tensor([0, 1, 2, 3])}).backward()
    assert all(g is not None for g in generator_grads(model))


def test_losses_are_cross_entropy_of_the_named_outputs():
    torch.manual_seed(6)
    logits, labels = torch.randn(5, 4), torch.randint(0, 4, (5,))
    assert torch.allclose(patch_loss({"patch_logits": logits}, {"patch_labels": labels}),
                          F.cross_entropy(logits, labels))
    dense, grid = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    assert torch.allclose(patch_loss({"patch_logits": dense}, {"patch_labels": grid}), F.cross_entropy(dense, grid))
    grades, dr = torch.randn(3, 5), torch.tensor([0, 2, 4])
    assert torch.allclose(clpi_loss({"dr": grades}, {"dr": dr}), F.cross_entropy(grades, dr))
    assert torch.allclose(clpi_loss({"dr": grades[:, :2]}, {"referable": dr > 1}, target="referable"),
                          F.cross_entropy(grades[:, :2], (dr > 1).long()))
    with pytest.raises(KeyError, match="patch_labels"):
        patch_loss({"patch_logits": logits}, {"dr": labels})
    with pytest.raises(KeyError, match="'dr'"):
        clpi_loss({"patch_logits": logits}, {"dr": labels})


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    scheduler = warmup_cosine(0.05)(optimizer, 100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0 and math.isclose(rates[1], 0.01) and math.isclose(rates[5], 0.05)
    assert math.isclose(rates[5 + 95 // 2], 0.05 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert all(a >= b for a, b in zip(rates[5:], rates[6:])) and rates[-1] < 1e-3
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_cosine(1.0)


def test_registry_builds_clpi_and_its_generator():
    assert isinstance(build_model("clpi", n_dr=2, widths="authors"), CLPI)
    assert isinstance(build_model("clpi_generator", widths="authors"), LesionAttentionGenerator)


def test_smoke_patch_pretraining_then_end_to_end_grading(tmp_path):
    from fundus_lib.data.patches import PatchLoader, lesion_patch_set, patch_count_table
    from fundus_lib.data.pipeline import make_loaders, synthetic_benchmark
    from fundus_lib.train import fit

    manifest = synthetic_benchmark(8, 2, 2, 64, seed=3, root=tmp_path)
    train = manifest[manifest["split"] == "train"]
    patches = lesion_patch_set(train, negatives_per_image=4, seed=0)
    counts = patch_count_table({"train": patches}).loc["train"]
    assert counts["background"] == 4 * (train["dr_grade"] == 0).sum() and counts["lesion images"] > 0
    # Stage 1 (Sec. IV-B): the generator learns the 4 patch classes from a fixed handful of patches.
    labels = patches["patch_labels"]
    few = torch.cat([(labels == c).nonzero().flatten()[:6] for c in labels.unique()])
    subset = {"image": patches["image"][few], "patch_labels": labels[few]}
    torch.manual_seed(7)
    model = CLPI(n_dr=5, widths="authors")
    loader = PatchLoader(subset, batch_size=len(few), generator=torch.Generator().manual_seed(0))
    pretrain = fit(PatchClassifier(model.generator), patch_loss, loader, epochs=3, lr=1e-3, device="cpu",
                   progress=False)
    assert pretrain["train_loss"].iloc[-1] < pretrain["train_loss"].iloc[0]
    # Stage 2: end-to-end grading from image-level labels, with the paper's warm-up + cosine schedule.
    loaders = make_loaders(manifest, ("dr",), image_size=64, batch_size=8, augment=False, data_path="memory",
                           splits=("train",))
    grading = fit(model, clpi_loss, loaders["train"], epochs=4, lr=1e-3, device="cpu", progress=False,
                  scheduler=warmup_cosine(0.25), scheduler_interval="batch")
    assert grading["train_loss"].iloc[-1] < grading["train_loss"].iloc[0]
