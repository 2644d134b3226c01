"""L-Net / SiAN experiments at smoke size: crops, sliding windows, the table functions and their frames."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fundus_lib.config import resolve
from fundus_lib.data.manifest import LESIONS
from fundus_lib.experiments import lnet
from fundus_lib.utils import torch_threads

NOTEBOOK = "13_lnet_sian_lesion_segmentation"


def smoke(**overrides):
    return resolve({"profile": "smoke", **overrides}, notebook=NOTEBOOK)


@pytest.fixture(scope="module")
def data():
    return lnet.seg_data(smoke())


def test_crops_are_centred_on_lesions_at_native_scale(data):
    loader = lnet.LesionCropLoader(data.splits["train"], size=32, batch_size=6, batches=3, lesion_share=1.0,
                                   generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    batch = batches[0]
    assert batch["image"].shape == (6, 3, 32, 32) and batch["masks"].shape == (6, len(LESIONS), 32, 32)
    assert torch.equal(batch["lesion_present"], batch["masks"].amax(dim=(2, 3)))
    assert batch["mask_valid"].shape == (6, len(LESIONS))
    assert all(b["lesion_present"].sum(dim=1).gt(0).all() for b in batches)  # every crop shows a lesion
    again = next(iter(lnet.LesionCropLoader(data.splits["train"], size=32, batch_size=6, batches=3, lesion_share=1.0,
                                            generator=torch.Generator().manual_seed(0))))
    assert torch.equal(again["image"], batch["image"])  # the seed decides the crops


def test_crop_loader_rejects_bad_sizes(data):
    with pytest.raises(ValueError, match="crop_size"):
        lnet.LesionCropLoader(data.splits["train"], size=10_000, batch_size=2, batches=1)
    with pytest.raises(ValueError, match="batches"):
        lnet.LesionCropLoader(data.splits["train"], size=32, batch_size=2, batches=0)


class _Bright(nn.Module):
    """A 'segmenter' whose lesion logit is the first input channel: exact under any tiling."""

    def forward(self, x):
        masks = x[:, :1].repeat(1, 2, 1, 1)
        return {"masks": masks, "presence": masks.amax(dim=(2, 3))}


def test_sliding_window_matches_the_whole_image_for_a_pointwise_net():
    model = lnet.SlidingWindow(_Bright(), window=16, stride=8).eval()
    x = torch.randn(2, 3, 40, 40)
    out = model(x)
    assert out["masks"].shape == (2, 2, 40, 40)
    torch.testing.assert_close(torch.sigmoid(out["masks"]), torch.sigmoid(x[:, :1].repeat(1, 2, 1, 1)), atol=1e-5,
                               rtol=1e-4)
    assert torch.equal(model.train()(x[:, :, :16, :16])["masks"], x[:, :1, :16, :16].repeat(1, 2, 1, 1))


def test_variants_and_losses_share_runs_and_return_tidy_frames(data):
    seeds = [0]
    losses = lnet.losses(data, ["dice", "dual"], seeds)
    variants = lnet.variants(data, ["16s"], seeds)
    assert set(losses["config"]) == {"Dice", "dual loss"} and set(variants["config"]) == {"L-Net-16s"}
    assert len(data.runs) == 2  # L-Net-16s with the dual loss is trained once for both tables
    present = data.present_lesions
    expected = {"pixel_f1", "image_f1"} | {f"{kind} · {l}" for kind in ("pixel_f1", "image_f1") for l in present}
    assert set(variants["metric"]) == expected
    assert variants["value"].between(0, 1).all()
    trivial = lnet.trivial_segmentation(data)
    assert trivial.query("config == 'all-negative'")["value"].eq(0).all()
    with pytest.raises(ValueError, match="losses"):
        lnet.losses(data, ["hinge"], seeds)
    with pytest.raises(ValueError, match="variants"):
        lnet.variants(data, [], seeds)


def test_dice_and_dual_runs_continue_one_shared_prefix_to_the_weights_of_separate_runs():
    cfg = smoke(seg_epochs=2)  # the rate drops (and the dual loss takes over) after epoch 1
    data = lnet.seg_data(cfg)
    dice = lnet.lnet_run(data, "16s", "dice", 0)
    dual = lnet.lnet_run(data, "16s", "dual", 0)
    assert [p.name for p in Path(data.scratch.name).iterdir()] == ["16s-seed0-prefix"]  # trained once
    assert dice.history["epoch"].tolist() == dual.history["epoch"].tolist() == [1, 2]
    assert dice.history["train_loss"].iloc[0] == dual.history["train_loss"].iloc[0]
    lnet.seed_everything(0)
    alone = lnet.SlidingWindow(lnet.build_lnet(cfg, "16s"), window=data.eval_window)
    history = lnet.train(cfg, alone, lnet.make_loss(cfg, "dice"), data.crops(0), data.loaders["val"],
                         epochs=cfg.seg_epochs, metrics_fn=lnet.lesion_scores, monitor="val_score", seed=0,
                         desc="Dice from scratch", device=data.device)
    np.testing.assert_allclose(history["train_loss"], dice.history["train_loss"], rtol=1e-6)
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(tensor, dice.model.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    assert dice.probs is None
    again = lnet.lnet_run(data, "16s", "dice", 0, keep_probs=True)  # predicted from the kept model, not retrained
    assert again is dice and again.probs.shape == data.test_masks.shape and len(data.runs) == 2


def test_seed_workers_train_the_seeds_side_by_side_to_the_same_results():
    sequential, parallel = (smoke(repeats=2, seed_workers=w) for w in (1, 2))
    seeds = [0, 1]
    with torch_threads(max(1, (os.cpu_count() or 1) // 2)):  # the workers' thread count
        frames = [lnet.variants(lnet.seg_data(cfg), ["16s"], seeds) for cfg in (sequential, parallel)]
        np.testing.assert_allclose(frames[0]["value"], frames[1]["value"], atol=1e-3)
        kept = [{}, {}]
        frames = [lnet.grading(lnet.grade_data(cfg), None, ["plain"], seeds, keep=k)
                  for cfg, k in zip((sequential, parallel), kept)]
    np.testing.assert_allclose(frames[0].query("metric != 'seconds'")["value"],
                               frames[1].query("metric != 'seconds'")["value"], atol=1e-3)
    assert set(kept[1]) == {("plain", 0), ("plain", 1)}


def test_grading_and_ablation_beside_the_majority_baseline(data):
    cfg = smoke()
    grades = lnet.grade_data(cfg)
    run = lnet.lnet_run(data, "16s", "dual", 0)
    keep = {}
    frame = lnet.grading(grades, run.model, ["plain", "SiAN"], [0], keep=keep)
    assert set(frame["config"]) == {"plain", "SiAN", "majority"}
    assert frame.query("config == 'majority' and metric == 'kappa'")["value"].eq(0).all()
    assert keep[("SiAN", 0)]["masks"].shape[1] == len(LESIONS) and "masks" not in keep[("plain", 0)]
    ablation = lnet.sian_attention(grades, run.model, [0], rows=["SiAN · CW-MaxPool · input image"])
    assert set(ablation["config"]) == {"SiAN · CW-MaxPool · input image", "majority"}
    classifier = lnet.presence_classifier(grades, [0], data.present_lesions)
    assert np.isfinite(classifier["value"]).all()
    with pytest.raises(ValueError, match="rows"):
        lnet.grading(grades, run.model, ["ABN"], [0])


def test_thresholds_are_chosen_per_lesion_and_default_to_one_half():
    masks = np.zeros((2, len(LESIONS), 8, 8), dtype=bool)
    masks[0, 0, :4] = True
    masks[1, 1, 2:6, 2:6] = True
    probs = np.where(masks, 0.35, 0.05).astype(np.float32)
    probs[1, 1, 0, 0] = 0.25  # one false pixel between 0.2 and 0.3
    probs[0, 2, 0, 0] = 0.95  # a false alarm of a lesion without any annotated pixel
    thresholds = lnet.choose_thresholds(probs, masks, np.ones((2, len(LESIONS))))
    assert thresholds.tolist() == [0.1, 0.3] + [0.5] * (len(LESIONS) - 2)  # nothing annotated: 0.5


def test_per_lesion_dice_weighs_every_lesion_equally():
    target = torch.zeros(1, 2, 16, 16)
    target[0, 0, :12] = 1  # a large lesion
    target[0, 1, 0, 0] = 1  # a one-pixel lesion
    batch = {"masks": target, "mask_valid": torch.ones(1, 2), "lesion_present": target.amax(dim=(2, 3))}
    missed_small = torch.where(target.bool(), 8.0, -8.0)
    missed_small[0, 1] = -8.0
    outputs = {"masks": missed_small}
    pooled = float(lnet.DiceSegLoss()(outputs, batch))
    per_lesion = float(lnet.PerLesionDiceLoss()(outputs, batch))
    assert pooled < 0.01 and per_lesion > 0.2  # the pooled Dice barely notices the missed small lesion


def test_make_loss_builds_the_dual_schedule_with_the_configured_dice():
    schedule = lnet.make_loss(smoke(dice_per_lesion=True), "dual")
    assert isinstance(schedule, lnet.DualLossSchedule) and isinstance(schedule.dual.seg, lnet.PerLesionDiceLoss)
    assert isinstance(lnet.make_loss(smoke(dice_per_lesion=False), "dice"), lnet.DiceSegLoss)
    with pytest.raises(ValueError, match="losses"):
        lnet.make_loss(smoke(), "hinge")


def test_schedule_warms_up_then_drops_once():
    cfg = smoke(seg_epochs=3)
    factory, interval = lnet.make_scheduler(cfg, epochs=3, steps_per_epoch=10)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = factory(optimizer, 30)
    rates = []
    for _ in range(30):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert interval == "batch" and rates[0] < 1.0 and max(rates) == pytest.approx(1.0)
    assert rates[19] == pytest.approx(1.0) and rates[20] == pytest.approx(0.1)  # drop after 2 of 3 epochs


def test_paired_pixel_f1_of_a_run_against_itself_is_zero(data):
    comparison = lnet.paired_pixel_f1(data, ("16s", "dual"), ("16s", "dual"), [0], names=("a", "b"))
    assert comparison.effect == 0 and comparison.low == 0 and comparison.high == 0
    run = lnet.lnet_run(data, "16s", "dual", 0, keep_probs=True)
    assert run.masks().shape == data.test_masks.shape and run.thresholds.index.tolist() == list(LESIONS)


def test_paired_kappa_of_a_grader_against_itself_is_zero():
    grades = lnet.GradeData(smoke(), {}, np.array([0, 1]), np.array([0, 1, 2, 3, 4, 2]), torch.device("cpu"))
    logits = np.eye(5)[[0, 1, 2, 3, 3, 2]]
    outputs = {(name, seed): {"dr": logits} for name in ("a", "b") for seed in (0, 1)}
    comparison = lnet.paired_kappa(grades, outputs, "a", "b", [0, 1])
    assert comparison.effect == 0 and comparison.low == comparison.high == 0 and comparison.method == "bootstrap"
