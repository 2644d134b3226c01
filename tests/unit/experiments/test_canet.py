"""CANet's experiments at smoke size: the rows, both training modes, the baseline and the pitfall."""
import numpy as np
import pytest
import torch

from fundus_lib.config import resolve
from fundus_lib.experiments import canet
from fundus_lib.models.backbones import build_backbone

NOTEBOOK = "11_canet_cross_disease_attention"


def smoke(**overrides):
    return resolve({"profile": "smoke", **overrides}, notebook=NOTEBOOK)


def test_paper_rows_follow_tables_iv_and_v():
    rows = canet.paper_rows(0.25, [0.0, 0.25, 1.0])
    assert list(rows)[0] == canet.JOINT and rows[canet.JOINT].options == {"dropout": 0.3}
    assert rows["CANet (d-S only)"].options == {"dr_to_dme": False, "dme_to_dr": False}
    assert rows[canet.final_name(0.25)].lam == 0.25
    assert {"CANet (λ=0)", "CANet (λ=1)"} <= set(rows) and "CANet (λ=0.25)" not in rows
    assert rows["Joint training (complex_v2)"].model == "joint_complex_v2"
    assert "MTMR-Net (Liu et al.)" in rows
    assert "Multi-task net (Chen et al.)" not in canet.paper_rows(multitask=False)


def test_output_stride_16_gives_the_paper_grid_at_half_the_input():
    trunk = canet.set_output_stride(build_backbone("resnet18"), 16)
    with torch.no_grad():
        assert trunk(torch.zeros(1, 3, 112, 112))["layer4"].shape[-2:] == (7, 7)
    with pytest.raises(ValueError, match="output_stride"):
        canet.set_output_stride(build_backbone("resnet18"), 8)


def test_ablation_frozen_trunk_is_tidy_with_majority_rows():
    cfg = smoke()
    rows = {name: row for name, row in canet.paper_rows(0.25).items()
            if name in (canet.JOINT, canet.final_name(0.25))}
    result = canet.ablation(cfg, rows, seeds=[0, 1], track_test=[canet.final_name(0.25)],
                            keep_models=[canet.final_name(0.25)])
    frame = result.frame
    assert set(frame["config"]) == {*rows, canet.MAJORITY}
    for metric in ("joint_acc", "dr_kappa", "dme_kappa", "dr_acc", "dme_acc"):
        assert len(frame.query("metric == @metric and config == @canet.JOINT")) == 2
    assert frame.query("config == @canet.MAJORITY and metric == 'dr_kappa'")["value"].eq(0).all()
    final = result.run(canet.final_name(0.25))
    assert len(final.test_correct) == cfg.epochs and final.model is not None
    assert result.run(canet.JOINT).model is None
    with torch.no_grad():  # the kept model runs on images again (the trunk is put back)
        out = final.model(torch.zeros(2, 3, cfg.image_size, cfg.image_size), return_attention=True)
    assert out["att_spatial_dr"].shape[1] == 1


def test_ablation_end_to_end():
    cfg = smoke(freeze_backbone=False)
    result = canet.ablation(cfg, {canet.JOINT: canet.paper_rows()[canet.JOINT]}, seeds=[0])
    assert result.trunk is None
    assert np.isfinite(result.frame["value"]).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="rows is empty"):
        canet.ablation(smoke(), {}, seeds=[0])
    with pytest.raises(ValueError, match="seeds is empty"):
        canet.ablation(smoke(), canet.paper_rows(), seeds=[])


def test_selection_optimism_and_luckiest_draw():
    correct = np.zeros((3, 40), dtype=bool)
    correct[0, :20] = True
    assert canet.selection_optimism(correct, 0, 40) == 0.0  # the chosen one is best on every fold
    assert canet.selection_optimism(correct, 1, 40) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="fold_size"):
        canet.selection_optimism(correct, 0, 41)
    assert canet.luckiest_draw(0.8, 100, 1) == pytest.approx(0.0, abs=1e-9)
    assert canet.luckiest_draw(0.8, 100, canet.AUTHORS_CANDIDATES) > canet.luckiest_draw(0.8, 100, 5) > 0
