"""CLPI experiments (fundus_lib.experiments.clpi) at smoke size: every table function runs and returns
a tidy frame with the configurations and metrics the notebook reads; the pieces are checked exactly."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fundus_lib.config import RunConfig, resolve
from fundus_lib.experiments import clpi
from fundus_lib.experiments.common import COLUMNS
from fundus_lib.models.backbones import build_backbone
from fundus_lib.models.baselines import IndividualNet
from fundus_lib.models.clpi import CLPI

ROOT = Path(__file__).resolve().parents[3]
SMOKE = yaml.safe_load((ROOT / "configs" / "12_clpi_patch_lesion_attention" / "smoke.yaml").read_text())


def make_cfg(root: Path, **overrides) -> RunConfig:
    values = {**SMOKE, "n_train": 16, "n_val": 6, "n_test": 8, "patches_per_class": 4, "batch_size": 4,
              "device": "cpu", **overrides}
    return RunConfig("12_clpi_patch_lesion_attention", values, root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = make_cfg(tmp_path_factory.mktemp("project"))
    return clpi.clpi_data(cfg, ["low_quality"])


def test_densenet_small_is_a_densenet_trunk_of_stride_32():
    backbone = build_backbone("densenet_small", in_channels=12)
    features = backbone(torch.zeros(1, 12, 64, 64))[backbone.stages[-1]]
    assert features.shape == (1, backbone.out_channels, 2, 2)
    assert sum(p.numel() for p in backbone.parameters()) < 400_000
    model = CLPI(n_dr=5, widths=[8] * 8, backbone="densenet_small").eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 128, 128))
    assert out["dr"].shape == (2, 5) and out["attention"].shape == (2, 4, 2, 2)


def test_discard_lesions_drops_each_lesion_class_and_keeps_negatives():
    labels = torch.tensor([0] * 10 + [1] * 8 + [2] * 4 + [3] * 20)
    patch_set = {"image": torch.zeros(len(labels), 3, 68, 68, dtype=torch.uint8), "patch_labels": labels,
                 "image_id": [str(i) for i in range(len(labels))]}
    kept = clpi.discard_lesions(patch_set, 0.5, seed=0)
    assert torch.bincount(kept["patch_labels"], minlength=4).tolist() == [10, 4, 2, 10]
    assert len(kept["image_id"]) == len(kept["image"]) == 26
    with pytest.raises(ValueError, match="discard fractions"):
        clpi.discard_lesions(patch_set, 1.0, seed=0)


def test_patch_and_grade_scores():
    labels = np.array([0, 1, 2, 3, 3])
    perfect = np.eye(4)[labels] * 10
    scores = clpi.patch_scores(perfect, labels)
    assert scores["balanced_accuracy"] == 1.0 and scores["AP · exudate"] == 1.0
    truth = np.array([0, 1, 3, 4, 2])
    predicted = np.array([4, 1, 0, 4, 2])  # 0 -> 4 and 3 -> 0: two unacceptable errors
    grades = clpi.grade_scores({"dr": np.eye(5)[predicted]}, {"dr": truth})
    assert grades["unacceptable"] == 2 and grades["accuracy"] == pytest.approx(0.6)
    assert set(grades) == {"kappa", "accuracy", "auc", "unacceptable"}


def test_map_scores_of_a_perfect_map():
    labels = np.zeros((2, 4, 4), dtype=int)
    labels[:, 1, 2] = 3
    labels[:, 0, 0] = 1
    maps = np.zeros((2, 4, 4, 4))
    maps[:, 0] = 1.0
    maps[:, 3, 1, 2], maps[:, 0, 1, 2] = 1.0, 0.0
    maps[:, 1, 0, 0], maps[:, 0, 0, 0] = 1.0, 0.0
    scores = clpi._map_scores(maps, labels, np.ones_like(labels, dtype=bool))
    assert scores["auc · exudate"] == 1.0 and scores["pointing · exudate"] == 1.0
    assert scores[f"auc · {clpi.ANY_LESION}"] == 1.0 and "auc · haemorrhage" not in scores


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="ablation rows"):
        clpi.ablation(None, ["CLPI", "ResNet"], [0])


def test_every_table_function_returns_tidy_frames(data):
    seeds = [0]
    pretraining = clpi.pretrain_patches(data, seeds)
    assert list(pretraining.columns[:4]) == list(COLUMNS)
    assert set(pretraining["config"]) == {"generator (patches)", clpi.MAJORITY}
    assert (0.0, 0) in data.generators

    ablation = clpi.ablation(data, list(clpi.ROWS), seeds)
    assert set(ablation["config"]) == {*clpi.ROWS, clpi.MAJORITY}
    assert {"kappa", "accuracy", "auc", "unacceptable"} <= set(ablation["metric"])
    runs = data.runs
    assert isinstance(runs[("DenseNet", 0)].model.net, IndividualNet)
    assert not runs[("CLPI w/o shortcut", 0)].model.shortcut
    assert not runs[("CLPI w/o end-to-end", 0)].model.train_generator
    frozen = runs[("CLPI w/o end-to-end", 0)].model.generator.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in data.generators[(0.0, 0)].items()), \
        "without end-to-end learning the pre-trained generator must stay as it was"

    maps = clpi.attention_scores(data, seeds, rows=["CLPI", "CLPI-"])
    assert {"generator (patches)", "CLPI (end to end)", "CLPI- (end to end)", clpi.RANDOM_MAP} == set(maps["config"])
    assert maps["metric"].str.startswith(("auc · ", "pointing · ")).all()

    cross = clpi.cross_domain(data, ["CLPI", "DenseNet"], seeds)
    assert {"kappa · low_quality", "kappa · cam_a (training domain)"} <= set(cross["metric"])

    dropout = clpi.annotation_dropout(data, [0.5], seeds)
    assert list(dict.fromkeys(dropout["config"])) == ["0 % discarded", "50 % discarded"]
    reference = dropout[(dropout["config"] == "0 % discarded") & (dropout["metric"] == "reduction · balanced_accuracy")]
    assert reference["value"].tolist() == [1.0]


def test_real_data_without_lesion_masks_has_no_patches(data):
    stripped = data.manifest.assign(**{c: None for c in data.manifest.columns if c.startswith("mask_")})
    lesions, label = clpi._lesion_manifest(data.cfg, stripped)
    assert lesions is None and label is None
    lesions, label = clpi._lesion_manifest(data.cfg, data.manifest)
    assert lesions is data.manifest and label == data.cfg.data_label


def test_end_to_end_training_fine_tunes_the_generator_at_a_smaller_rate():
    from fundus_lib.experiments.clpi import GENERATOR_LR_FACTOR, _optimiser
    from fundus_lib.models.clpi import CLPI

    cfg = resolve({"profile": "smoke"}, notebook="12_clpi_patch_lesion_attention")
    model = CLPI(n_dr=5, widths=[4] * 8, backbone="densenet_small", weights=None)
    groups = _optimiser(cfg, model).param_groups
    assert [g["lr"] for g in groups] == [cfg.lr, cfg.lr * GENERATOR_LR_FACTOR]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.generator.parameters()}
