"""Splits: equality with scikit-learn, grouping by patient, stratification, leakage detection."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from fundus_lib.data.manifest import make_manifest
from fundus_lib.data.splits import LeakageError, assign_splits, check_no_leakage, stratified_kfold


def table(n: int = 60, patients: bool = True, seed: int = 0) -> pd.DataFrame:
    """A manifest without files: grades 0-4 with a skewed distribution, two eyes per patient."""
    rng = np.random.default_rng(seed)
    grades = rng.choice(5, size=n, p=[0.4, 0.2, 0.2, 0.1, 0.1])
    rows = [{"image_id": f"im{i:03d}", "image_path": f"/data/im{i:03d}.png", "dr_grade": int(grades[i]),
             "patient_id": f"pt{i // 2:03d}" if patients else None} for i in range(n)]
    return make_manifest(rows)


def test_kfold_equals_sklearn_stratified_kfold_without_patients():
    manifest = table(patients=False)
    ours = stratified_kfold(manifest, 5, seed=7)
    theirs = StratifiedKFold(5, shuffle=True, random_state=7).split(np.zeros(60), manifest["dr_grade"].astype(str))
    for (train, val), (train_ref, val_ref) in zip(ours, theirs):
        assert np.array_equal(train, train_ref) and np.array_equal(val, val_ref)


def test_kfold_equals_sklearn_stratified_group_kfold_with_patients():
    manifest = table()
    ours = stratified_kfold(manifest, 4, seed=3)
    theirs = list(StratifiedGroupKFold(4, shuffle=True, random_state=3).split(
        np.zeros(60), manifest["dr_grade"].astype(str), manifest["patient_id"].astype(str)))
    assert len(ours) == len(theirs) == 4
    for (train, val), (train_ref, val_ref) in zip(ours, theirs):
        assert np.array_equal(val, val_ref) and np.array_equal(train, train_ref)
    all_val = np.concatenate([val for _, val in ours])
    assert sorted(all_val.tolist()) == list(range(60))  # every row validated exactly once
    for train, val in ours:
        assert not set(manifest["patient_id"].iloc[train]) & set(manifest["patient_id"].iloc[val])


def test_rows_without_patient_are_their_own_group():
    manifest = table()
    manifest.loc[:9, "patient_id"] = pd.NA
    folds = stratified_kfold(manifest, 3)
    assert sorted(np.concatenate([val for _, val in folds]).tolist()) == list(range(60))


def test_assign_splits_fractions_groups_and_strata():
    manifest = table(n=120)
    out = assign_splits(manifest, val=0.2, test=0.2, seed=1)
    counts = out["split"].value_counts()
    assert counts.sum() == 120 and set(counts.index) == {"train", "val", "test"}
    # k = 5 for test (1/5 of 120) and k = round(0.8 / 0.2) = 4 for val (1/4 of the rest), +- one patient.
    assert abs(counts["test"] - 24) <= 2 and abs(counts["val"] - 24) <= 2
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    for name in ("train", "val", "test"):
        assert set(out.loc[out["split"] == name, "dr_grade"]) == {0, 1, 2, 3, 4}
    assert out.drop(columns="split").equals(manifest.drop(columns="split"))
    assert out["split"].equals(assign_splits(manifest, val=0.2, test=0.2, seed=1)["split"])
    assert not out["split"].equals(assign_splits(manifest, val=0.2, test=0.2, seed=2)["split"])


def test_assign_splits_carves_validation_from_an_official_training_split():
    manifest = table(n=80, patients=False)
    manifest["split"] = pd.array(["train"] * 60 + ["test"] * 20, dtype="string")
    out = assign_splits(manifest, val=0.25, test=0.0, source_split="train")
    assert (out["split"].iloc[60:] == "test").all()
    assert out["split"].iloc[:60].value_counts().to_dict() == {"train": 45, "val": 15}


def test_assign_splits_rejects_bad_fractions_and_empty_selection():
    manifest = table(n=20)
    with pytest.raises(ValueError, match="leave rows for training"):
        assign_splits(manifest, val=0.5, test=0.5)
    with pytest.raises(ValueError, match="val must be a fraction"):
        assign_splits(manifest, val=-0.1)
    with pytest.raises(ValueError, match="no rows"):
        assign_splits(manifest, source_split="val")
    with pytest.raises(ValueError, match="stratify column 'grade'"):
        assign_splits(manifest, stratify="grade")


def test_clean_splits_pass_in_every_input_form():
    manifest = assign_splits(table(n=120), seed=0)
    check_no_leakage(manifest)
    parts = {name: part for name, part in manifest.groupby("split")}
    check_no_leakage(parts)
    check_no_leakage(list(parts.values()))


def test_same_image_id_in_two_splits_is_leakage():
    manifest = table(n=10)
    train, test = manifest.iloc[:6], manifest.iloc[5:].copy()
    test["patient_id"] = pd.array([f"other{i}" for i in range(5)], dtype="string")
    with pytest.raises(LeakageError, match=r"image_id value\(s\).*'im005' in \['test', 'train'\]"):
        check_no_leakage({"train": train, "test": test})


def test_same_patient_in_two_splits_is_leakage():
    manifest = table(n=10)
    manifest["split"] = pd.array(["train"] * 5 + ["val"] * 5, dtype="string")  # pt002 has im004 and im005
    with pytest.raises(LeakageError, match=r"patient_id.*'pt002' in \['train', 'val'\]"):
        check_no_leakage(manifest)


def test_same_file_under_two_ids_is_leakage_after_path_normalisation():
    first = table(n=3)
    second = make_manifest([{"image_id": "copy", "image_path": "/data/./sub/../im001.png"}])
    with pytest.raises(LeakageError, match="image_path"):
        check_no_leakage([first, second])
    check_no_leakage([first, second], keys=("image_id",))


def test_single_manifest_needs_split_column_values():
    manifest = table(n=4).drop(columns="split")
    with pytest.raises(ValueError, match="'split' column"):
        check_no_leakage(manifest)
