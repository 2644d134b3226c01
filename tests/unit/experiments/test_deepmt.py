"""DeepMT-DR's experiments at smoke size: LR/HR pairs, the stages, the rows, every table, the bad inputs."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fundus_lib.config import resolve
from fundus_lib.data.pipeline import load_dataset
from fundus_lib.experiments import deepmt as X
from fundus_lib.models.deepmt import LESIONS
from fundus_lib.utils import torch_threads

NOTEBOOK = "15_deepmt_dr_multitask_low_resolution"
#: Smaller than the smoke profile: one seed, tiny U-Net, the fewest images that give every split.
TINY = {"profile": "smoke", "n_train": 8, "n_val": 4, "n_test": 4, "seg_width": 4, "batch_size": 4}


def tiny(**overrides):
    return resolve({**TINY, **overrides}, notebook=NOTEBOOK)


@pytest.fixture(scope="module")
def trained():
    """One seed of stage 1 and two joint rows sharing one stage-2 grader, kept for every table."""
    cfg = tiny()
    manifest = load_dataset(cfg)
    keep = {}
    grading = X.grading(cfg, manifest, [0], rows=[X.DEEPMT, X.NO_ATTENTION], keep=keep)
    return cfg, manifest, keep, grading


def test_pair_loaders_give_lr_hr_pairs_at_the_configured_scale():
    cfg = tiny(lr_scale=2)
    loaders = X.pair_loaders(cfg, load_dataset(cfg), seed=0)
    batch = next(iter(loaders["test"]))
    hr, lr = batch["hr_image"], batch["lr_image"]
    assert hr.shape[-1] == cfg.image_size and lr.shape[-1] == cfg.image_size // 2
    expected = F.interpolate(hr, scale_factor=0.5, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    assert torch.allclose(lr, expected, atol=1e-6)
    assert batch["masks"].shape[1] == 8 and batch["dr"].shape == (hr.shape[0],)


def test_sizes_weights_and_class_weights_are_checked():
    with pytest.raises(ValueError, match="multiple of 16 x lr_scale = 64"):
        X.check_sizes(96, 4)
    with pytest.raises(ValueError, match="lr_scale must be 2, 4 or 8"):
        X.check_sizes(128, 3)
    X.check_sizes(256, 8)
    assert X.loss_weights(tiny()) == X.LOSS_WEIGHTS
    assert X.loss_weights(tiny(loss_weights={"tv": 0}))["tv"] == 0.0
    with pytest.raises(ValueError, match="unknown keys"):
        X.loss_weights(tiny(loss_weights={"attention": 1.0}))
    with pytest.raises(ValueError, match=">= 0"):
        X.loss_weights(tiny(loss_weights={"tv": -1}))
    assert X.class_weights([0, 0, 0, 2], 3) == pytest.approx([4 / 9, 1.0, 4 / 3])
    labels = [0, 0, 0, 2, 2, 4]
    assert X.grade_class_weights(tiny(class_weighted=True), labels) == X.class_weights(labels)
    assert X.grade_class_weights(tiny(class_weighted=False), labels) is None


def test_lesion_masks_are_max_pooled_to_the_lr_size_for_the_lr_segmenter():
    seen = {}

    def loss(outputs, batch):
        seen.update(batch)
        return torch.zeros(()), {}

    masks = torch.zeros(1, 8, 8, 8)
    masks[0, 0, 5, 6] = 1.0  # one MA pixel
    X.OnDeepMTLesions(loss, pool=4)({}, {"masks": masks, "mask_valid": torch.ones(1, 8)})
    expected = torch.zeros(1, 4, 2, 2)
    expected[0, LESIONS.index("MA"), 1, 1] = 1.0  # the LR pixel whose 4 x 4 HR block holds it
    assert torch.equal(seen["masks"], expected) and seen["mask_valid"].shape == (1, 4)


def test_only_the_lr_directly_row_reads_the_lr_segmenter(trained):
    cfg, _, keep, _ = trained
    run = keep[0]
    assert [row for row, spec in X.ROW_SPECS.items() if spec.reads_lr] == [X.LR]
    lr_segmenter = run.lr_segmenter.hierarchy.segmenter.state_dict()
    stage1_segmenter = run.stage1.hierarchy.segmenter.state_dict()
    for row in (X.LR, X.BICUBIC):
        built = X._stage2_model(cfg, run, X.ROW_SPECS[row], 0).hierarchy.segmenter.state_dict()
        reference = lr_segmenter if row == X.LR else stage1_segmenter
        assert all(torch.equal(built[k], reference[k]) for k in reference), row
    assert not all(torch.equal(lr_segmenter[k], stage1_segmenter[k]) for k in lr_segmenter)
    outputs, _ = X.test_predictions(cfg, run, "stage 1 · LR segmenter")
    assert outputs["lesions"].shape[-1] == cfg.image_size // cfg.lr_scale


def test_a_row_trains_the_same_alone_or_after_other_rows():
    cfg = tiny()
    manifest = load_dataset(cfg)
    alone = X.train_seed(cfg, manifest, 0, [X.BICUBIC])
    after = X.train_seed(cfg, manifest, 0, [X.LR, X.HR, X.BICUBIC])
    for a, b in zip(alone.rows[X.BICUBIC].parameters(), after.rows[X.BICUBIC].parameters()):
        assert torch.equal(a, b)


def test_the_sr_net_learns_at_a_share_of_the_rate_and_frozen_parts_not_at_all():
    from fundus_lib.models.deepmt import DeepMT, configure_stage

    model = DeepMT(4, seg_width=4)
    configure_stage(model, 3)
    rates = {id(p): group["lr"] for group in X.optimizer(model, 1e-3, X.SR_LR_SHARE).param_groups
             for p in group["params"]}
    assert all(rates[id(p)] == pytest.approx(1e-3 * X.SR_LR_SHARE) for p in model.upsampler.parameters())
    assert all(rates[id(p)] == 1e-3 for p in model.hierarchy.grader.parameters())
    assert not any(id(p) in rates for p in model.hierarchy.segmenter.parameters())


def test_losses_read_the_four_deepmt_lesions():
    seen = {}

    def loss(outputs, batch):
        seen.update(batch)
        return torch.zeros(())

    masks = torch.zeros(2, 8, 4, 4)
    masks[:, 4, 0, 0] = 1  # vHE -> HE
    X.OnDeepMTLesions(loss)({}, {"masks": masks, "mask_valid": torch.ones(2, 8)})
    assert seen["masks"].shape == (2, 4, 4, 4) and seen["masks"][:, LESIONS.index("HE"), 0, 0].eq(1).all()


def test_rows_share_stage_2_and_train_stage_3_apart(trained):
    cfg, _, keep, grading = trained
    run = keep[0]
    assert list(run.stage2) == [X.ROW_SPECS[X.DEEPMT].stage2]
    assert run.rows[X.DEEPMT] is not run.rows[X.NO_ATTENTION]
    untrained = X._stage2_model(cfg, run, X.ROW_SPECS[X.DEEPMT], 0).hierarchy.grader.head[-1]
    assert not untrained.weight.any() and not untrained.bias.any()  # the grader starts from uniform probabilities
    assert run.rows[X.DEEPMT].hierarchy.attention and not run.rows[X.NO_ATTENTION].hierarchy.attention
    assert {"SR warm-up", "stage 1", "stage 1 · LR segmenter", f"stage 2 · {X.DEEPMT}", f"stage 3 · {X.DEEPMT}",
            f"stage 3 · {X.NO_ATTENTION}"} == set(run.histories)
    # stage 3 trains the SR net and the grader only: the segmenter keeps its stage-1 weights
    for a, b in zip(run.rows[X.DEEPMT].hierarchy.segmenter.parameters(), run.stage1.hierarchy.segmenter.parameters()):
        assert torch.equal(a, b)
    assert set(grading["config"]) == {X.DEEPMT, X.NO_ATTENTION, X.MAJORITY}
    assert set(grading["metric"]) == {"kappa", "accuracy"}
    assert grading.query("config == @X.MAJORITY and metric == 'kappa'")["value"].eq(0).all()
    with pytest.raises(ValueError, match="unknown"):
        X.train_seed(cfg, None, 0, rows=["DeepMT"], keep=keep)


def test_tables_are_tidy_and_scored_against_their_baselines(trained):
    cfg, manifest, keep, _ = trained
    sr = X.super_resolution(cfg, manifest, [0], keep=keep)
    assert set(sr["config"]) == {"bicubic", "SR net (stage 1)", "SR net (DeepMT-DR, stage 3)"}
    assert set(sr["metric"]) == {"psnr", "ssim"} and np.isfinite(sr["value"]).all()
    seg = X.segmentation(cfg, manifest, [0], keep=keep)
    assert set(seg["config"]) == {X.LR_INPUT, X.LR_SEGMENTER, "SR input", "HR input", "pixel prevalence"}
    assert set(seg["metric"]) <= {f"aupr_{lesion}" for lesion in LESIONS}
    assert seg["value"].between(0, 1).all()
    attention = X.attention_scores(cfg, manifest, [0], rows=[X.DEEPMT], keep=keep)
    assert set(attention["config"]) == {X.DEEPMT, "uniform map"}
    assert attention.query("config == 'uniform map' and metric == 'auc'")["value"].eq(0.5).all()
    with pytest.raises(ValueError, match="no attention link"):
        X.attention_scores(cfg, manifest, [0], rows=[X.NO_ATTENTION], keep=keep)
    outputs, targets = X.test_predictions(cfg, keep[0], "stage 1 · LR")
    assert outputs["lesions"].shape[-1] == cfg.image_size // cfg.lr_scale and "hr_image" in targets


def test_per_image_scores_and_predictions_feed_the_paired_bootstrap(trained):
    cfg, manifest, keep, grading = trained
    scores = X.sr_image_scores(cfg, manifest, [0], keep=keep)
    sr = X.super_resolution(cfg, manifest, [0], keep=keep).set_index(["config", "metric"])["value"]
    for metric, by in scores.items():
        for config, values in by.items():
            assert values.shape == (1, cfg.n_test)
            assert values.mean() == pytest.approx(sr[config, metric])  # the table is the mean of the images
    predicted, truth = X.grade_predictions(cfg, manifest, [0], rows=[X.DEEPMT, X.NO_ATTENTION], keep=keep)
    assert predicted[X.DEEPMT].shape == (1, cfg.n_test) and truth.shape == (cfg.n_test,)
    kappa = grading.query("config == @X.DEEPMT and metric == 'kappa'")["value"].iloc[0]
    assert X.kappa(truth, predicted[X.DEEPMT][0]) == pytest.approx(kappa, nan_ok=True)
    table = X.bootstrap_table(scores["psnr"], [("SR net (stage 1)", "bicubic")], "psnr", n_resamples=200)
    row = table.iloc[0]
    assert row["difference"] == pytest.approx(sr["SR net (stage 1)", "psnr"] - sr["bicubic", "psnr"])
    assert row["low"] <= row["difference"] <= row["high"] and "paired bootstrap" in row["verdict"]


def test_bootstrap_table_recomputes_kappa_on_each_resample():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, X.N_GRADES, 60)
    good = np.where(rng.random((2, 60)) < 0.8, truth, rng.integers(0, X.N_GRADES, (2, 60)))
    noise = rng.integers(0, X.N_GRADES, (2, 60))
    table = X.bootstrap_table({"good": good, "noise": noise}, [("good", "noise")], "kappa", metric=X.kappa,
                              y_true=truth, n_resamples=300)
    expected = np.mean([X.kappa(truth, g) - X.kappa(truth, n) for g, n in zip(good, noise)])
    assert table.loc[0, "difference"] == pytest.approx(expected)
    assert table.loc[0, "low"] > 0 and table.loc[0, "images"] == 60 and table.loc[0, "seeds"] == 2


def test_prevalence_and_contrast_by_hand():
    masks = np.zeros((2, 4, 4, 4))
    masks[0, 0, 0, :2] = 1
    valid = np.ones((2, 4))
    valid[1, 0] = 0
    assert X.prevalence(masks, valid)["MA"] == pytest.approx(2 / 16)
    hr = torch.full((1, 3, 64, 64), 0.6)
    lesions = torch.zeros(1, 4, 64, 64)
    hr[:, 1, 20, 20] = 0.1  # a one-pixel MA
    lesions[:, 0, 20, 20] = 1
    hr[:, 1, 40:52, 40:52] = 0.1  # a 12-pixel haemorrhage
    lesions[:, 1, 40:52, 40:52] = 1
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", align_corners=False, antialias=True)
    table = X.lesion_contrast(hr, lr, lesions, 4)
    assert list(table.index) == ["MA", "HE"]
    assert table["contrast HR"].tolist() == pytest.approx([0.5, 0.5])
    assert table.loc["MA", "kept"] < 0.2 < table.loc["HE", "kept"]


def test_a_dataset_without_grades_still_gives_the_sr_table_but_refuses_grading_rows():
    cfg = tiny(sr_epochs=0)
    manifest = load_dataset(cfg).assign(dr_grade=pd.NA)
    keep = {}
    assert set(X.super_resolution(cfg, manifest, [0], keep=keep)["config"]) == {"bicubic", "SR net (stage 1)"}
    with pytest.raises(ValueError, match="no DR grades"):
        X.grading(cfg, manifest, [0], rows=[X.LR], keep=keep)


def test_seed_workers_train_the_seeds_side_by_side_to_the_same_predictions():
    sequential, parallel = (tiny(repeats=2, seed_workers=w) for w in (1, 2))
    manifest = load_dataset(sequential)
    with torch_threads(max(1, (os.cpu_count() or 1) // 2)):  # the workers' thread count
        runs = [X.train_seeds(cfg, manifest, [0, 1], rows=[X.BICUBIC]) for cfg in (sequential, parallel)]
    for seed in (0, 1):
        assert runs[1][seed].loaders  # rebuilt where the run lands: the tables read the test split from it
        first, second = (X.test_predictions(cfg, run[seed], X.BICUBIC)[0]["dr"] for cfg, run in zip((sequential, parallel), runs))
        np.testing.assert_allclose(first, second, atol=1e-3)  # one worker thread vs several
