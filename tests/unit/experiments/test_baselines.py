"""Notebook 10's experiment at smoke size: labels, loss, the majority baseline, individual vs joint training."""
import numpy as np
import pandas as pd
import pytest
import torch

from fundus_lib import metrics
from fundus_lib.config import resolve
from fundus_lib.data.pipeline import synthetic_benchmark
from fundus_lib.experiments import baselines, common
from fundus_lib.models.canet import canet_loss

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def cfg():
    return resolve({"profile": "smoke", "image_size": 32, "epochs": 1, "batch_size": 8, "device": "cpu",
                    "num_workers": 0, "data_path": "memory"}, notebook="10_baseline_cnn_grading")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return synthetic_benchmark(16, 8, 12, 32, 0, root=tmp_path_factory.mktemp("synthetic"), difficulty=0.8)


@pytest.fixture(scope="module")
def trained(cfg, manifest):
    keep = {}
    return baselines.individual_vs_joint(cfg, manifest, SEEDS, keep=keep), keep


def test_dr_labels_are_grades_or_referable():
    grades = np.array([0, 1, 2, 3, 4])
    assert baselines.dr_labels(grades, 5).tolist() == [0, 1, 2, 3, 4]
    assert baselines.dr_labels(grades, 2).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="n_dr_classes"):
        baselines.dr_labels(grades, 3)
    with pytest.raises(ValueError, match="task"):
        baselines.task_labels({"dr": grades}, "glaucoma", 5)


@pytest.mark.parametrize("n_dr", [2, 5])
def test_joint_loss_is_canet_loss_without_attention(n_dr):
    torch.manual_seed(0)
    outputs = {"dr": torch.randn(6, n_dr), "dme": torch.randn(6, 3)}
    batch = {"dr": torch.tensor([0, 1, 2, 3, 4, 2]), "dme": torch.tensor([0, 1, 2, 2, 0, 1])}
    total, parts = baselines.GradingLoss(n_dr)(outputs, batch)
    mapped = {"dr": torch.as_tensor(baselines.dr_labels(batch["dr"], n_dr)), "dme": batch["dme"]}
    assert torch.isclose(total, canet_loss(outputs, mapped, lam=0)[0])
    assert set(parts) == {"dr", "dme"}


def test_majority_baseline_scores_the_training_majority():
    manifest = pd.DataFrame({"split": ["train"] * 4 + ["test"] * 4,
                             "dr_grade": [2, 2, 0, 3, 2, 0, 4, 2], "dme_grade": [2, 0, 2, 2, 2, 2, 0, 1]})
    scores = baselines.majority_baseline(manifest, ("dr", "dme"), 5)
    assert scores["dr_acc"] == pytest.approx(0.5)        # predicts DR 2
    assert scores["dme_acc"] == pytest.approx(0.5)       # predicts DME 2
    assert scores["joint_acc"] == pytest.approx(0.25)    # only the first test eye is (2, 2)
    assert scores["dr_kappa"] == 0.0 and scores["dr_auc"] == 0.5
    assert list(baselines.majority_baseline(manifest, ("dr",), 2)) == ["dr_acc", "dr_auc", "dr_kappa"]
    with pytest.raises(ValueError, match="tasks"):
        baselines.majority_baseline(manifest, ("dme",), 5)


def test_individual_vs_joint_is_a_tidy_frame_over_every_seed(trained):
    frame, keep = trained
    assert list(frame.columns) == list(common.COLUMNS)
    assert list(dict.fromkeys(frame["config"])) == [baselines.INDIVIDUAL, baselines.JOINT, baselines.MAJORITY]
    expected = {"joint_acc", *(f"{t}_{m}" for t in ("dr", "dme") for m in baselines.TASK_METRICS)}
    for config, rows in frame.groupby("config"):
        assert set(rows["metric"]) == expected, config
        assert sorted(rows["seed"].unique()) == SEEDS
    assert frame["value"].between(-1, 1).all()  # kappa may be negative
    assert common.wide(frame, "joint_acc")[baselines.MAJORITY].nunique() == 1  # one baseline, every seed
    assert sorted(keep) == SEEDS and all(set(by_kind) == {"dr", "dme", "joint"} for by_kind in keep.values())
    run = keep[0]["joint"]
    assert run.outputs["dr"].shape == (12, 5) and run.outputs["dme"].shape == (12, 3)
    assert {"train_loss", "val_loss", "val_dr_kappa", "val_joint_acc"} <= set(run.history.columns)


def test_individual_scores_pair_the_two_networks_image_by_image(trained, cfg):
    frame, keep = trained
    dr, dme = keep[1]["dr"], keep[1]["dme"]
    correct = ((dr.outputs["dr"].argmax(1) == dr.targets["dr"]) & (dme.outputs["dme"].argmax(1) == dme.targets["dme"]))
    value = frame.query("config == @baselines.INDIVIDUAL and seed == 1 and metric == 'joint_acc'")["value"].item()
    assert value == pytest.approx(correct.mean())
    assert common.paired(frame, "joint_acc", baselines.JOINT, baselines.INDIVIDUAL)  # a verdict sentence


def test_dr_only_datasets_train_the_dr_network_alone(cfg, manifest):
    frame = baselines.individual_vs_joint(cfg, manifest, [0], tasks=("dr",))
    assert set(frame["config"]) == {baselines.INDIVIDUAL, baselines.MAJORITY}
    assert set(frame["metric"]) == {"dr_acc", "dr_auc", "dr_kappa"}


def test_parameter_counts_and_bad_kinds(cfg):
    sizes = baselines.parameter_counts(cfg)
    assert sizes.loc["joint", "resnet50, M"] == pytest.approx(23.5, abs=0.1)
    assert sizes.loc["joint", "resnet18, M"] < sizes.loc["individual, both networks", "resnet18, M"]
    with pytest.raises(ValueError, match="kind"):
        baselines.make_model(cfg, "both")


def test_present_class_auc_is_the_macro_auc_when_every_grade_occurs():
    rng = np.random.default_rng(0)
    labels, logits = np.repeat(np.arange(5), 4), rng.normal(size=(20, 5))
    probs = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    assert baselines.present_class_auc(labels, logits) == pytest.approx(metrics.roc_auc(labels, probs))
    assert np.isfinite(baselines.present_class_auc(labels[labels < 3], logits[labels < 3]))  # grades 3-4 absent
    assert np.isnan(baselines.present_class_auc(np.zeros(4, dtype=int), logits[:4]))
