"""ELLG's experiments at smoke size: the baseline, saliency scored against masks, ELLG rounds."""
import numpy as np
import pandas as pd
import pytest
import torch

from fundus_lib.config import resolve
from fundus_lib.experiments import ellg

NOTEBOOK = "14_ellg_lesion_learning_and_generation"


def smoke(**overrides):
    return resolve({"profile": "smoke", **overrides}, notebook=NOTEBOOK)


def test_blocks_and_gmsm_layers_follow_the_original_stages():
    assert [ellg.n_blocks_for(s) for s in (64, 112, 223, 224, 447, 448, 512)] == [3, 3, 3, 4, 4, 5, 5]
    for size in (96, 224, 448):
        model = ellg.build_model(smoke(image_size=size, width=4))
        low, high = ellg.gmsm_layers(model)
        with torch.no_grad(), ellg.explain.LayerRecorder(model, [low, high]) as rec:
            model(torch.zeros(1, 3, size, size))
        assert rec.activations[low].shape[-1] > rec.activations[high].shape[-1]  # the low layer is finer
    paper = ellg.build_model(smoke(image_size=448, width=32))
    with torch.no_grad(), ellg.explain.LayerRecorder(paper, ellg.gmsm_layers(paper)) as rec:
        paper(torch.zeros(1, 3, 448, 448))
    assert [a.shape[-1] for a in rec.activations.values()] == [27, 6]  # the paper's 27 x 27 and 6 x 6 blocks


def test_fov_masks_fill_dark_pixels_inside_the_field():
    images = np.zeros((1, 9, 9, 3))
    images[0, 1:8, 1:8] = 0.5
    images[0, 4, 4] = 0.0  # a dark lesion inside the field stays inside
    fov = ellg.fov_masks(images)
    assert fov[0, 4, 4] and fov.sum() == 49


@pytest.fixture(scope="module")
def setup():
    cfg = smoke()
    data = ellg.prepare(cfg)
    result = ellg.baseline(cfg, data, seeds=[0, 1])
    return cfg, data, result


def test_baseline_is_tidy_with_validation_thresholds_and_majority(setup):
    cfg, data, result = setup
    frame = result.frame
    assert set(frame["config"]) == {ellg.BASELINE, ellg.MAJORITY}
    assert len(frame.query("config == @ellg.BASELINE and metric == 'kappa'")) == 2
    assert frame.query("config == @ellg.MAJORITY and metric == 'kappa'")["value"].eq(0).all()
    trained = result.runs[0]
    assert trained.thresholds.shape == (4,) and np.all(np.diff(trained.thresholds) >= 0)
    assert trained.test_scores.shape == (len(data.split("test")),)
    assert data.has_masks and data.test.masks.shape[1:] == (8, cfg.image_size, cfg.image_size)


def test_saliency_table_scores_every_recipe_and_the_random_floor(setup):
    cfg, data, result = setup
    table = ellg.saliency_table(cfg, data, result.runs, ellg.method_rows())
    assert set(table.frame["config"]) == set(ellg.method_rows())
    assert set(table.frame["metric"]) == set(ellg.SALIENCY_METRICS)
    assert table.frame["value"].between(0, 1).all()
    n_images = len(ellg.lesion_images(data.test))
    assert table.extra["per_image"][("GMSM", "auc")].shape == (2, n_images)
    versus = ellg.versus_random(table, "auc", ["GMSM"], n_resamples=200)
    row = versus.iloc[0]
    assert row["low"] <= row["mean"] <= row["high"] and row["diff_low"] <= row["difference"] <= row["diff_high"]
    assert 0.3 < row["random"] < 0.7  # a random map's AUC is about 0.5


def test_saliency_maps_are_heat_maps_and_the_gate_applies(setup):
    cfg, data, result = setup
    model = result.runs[0].model
    x = data.test.tensor(range(3))
    maps = ellg.saliency_maps(model, x, ellg.Recipe("gradcam++", ("low", "high"), None), t=0.0)
    assert maps.shape == (3, cfg.image_size, cfg.image_size) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    flat = ellg.saliency_maps(model, x, ellg.Recipe("gradcam++", ("high",), None), t=1e9)
    assert np.allclose(flat, 0)  # a gate above every value leaves nothing (Eq. 2)


def test_saliency_table_refuses_data_without_masks(setup):
    cfg, data, result = setup
    blind = ellg.Data(data.manifest, data.loaders, False, data.test, data.image_size)
    with pytest.raises(ValueError, match="no lesion masks"):
        ellg.saliency_table(cfg, blind, result.runs, ellg.method_rows())


def test_ellg_rounds_generate_with_provenance_and_train_a_control(setup):
    cfg, data, result = setup
    rounds = ellg.ellg_rounds(cfg, data, {0: result.runs[0]}, rounds=["combined"])
    frame = rounds.frame
    assert {ellg.BASELINE, ellg.ELLG, ellg.CONTROL} == set(frame["config"])
    assert {"kappa", "accuracy", "kappa_round1"} <= set(frame.query("config == @ellg.ELLG")["metric"])
    generated = rounds.extra["generated"]
    if not generated.empty:  # a smoke model may classify no DR image correctly: then nothing is generated
        assert {"source", "target", "r", "tau", "mixed_label", "true_grade", "round", "seed"} <= set(generated.columns)
        assert generated["tau"].between(0.5, 0.8).all() and generated["r"].between(0.5, 1.0).all()
        assert len(generated) <= min(cfg.n_generated, len(data.split("train")))
        agreement = ellg.label_agreement(generated)
        assert 0 <= agreement["agree"] <= 1
    assert rounds.runs[0].model is not result.runs[0].model  # the baseline model is left as it was
    with pytest.raises(ValueError, match="rounds must be"):
        ellg.ellg_rounds(cfg, data, {0: result.runs[0]}, rounds=["generated"])


def test_write_generated_gives_training_rows(tmp_path):
    from fundus_lib.generation import Generated
    item = Generated(np.full((8, 8, 3), 0.5), np.zeros((8, 8), bool), 2, "a", "b", 3, 0, 0.7, 0.6)
    rows = ellg.write_generated([item], tmp_path, "ellg/x")
    assert rows.loc[0, "split"] == "train" and int(rows.loc[0, "dr_grade"]) == 2
    assert rows.loc[0, "ellg_source"] == "a" and (tmp_path / "ellg_x-0000.png").is_file()
    assert ellg.label_agreement(pd.DataFrame([item.provenance()])) == {}
