"""write_dataset -> load_synthetic round trip, and the source's checks of a damaged folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundus_lib.data.manifest import LESIONS, MANIFEST_COLUMNS, ManifestError, read_image, read_mask, validate_manifest
from fundus_lib.data.sources.synthetic import load_synthetic
from fundus_lib.data.synthetic import generate, write_dataset

ARGS = dict(n=5, size=96, seed=31, domain=["cam_a", "cam_b", "cam_c", "low_quality"], prior="balanced")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "set", **ARGS)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_round_trip_gives_a_valid_manifest_with_the_generated_pixels(written):
    manifest = load_synthetic(written)
    batch = generate(**{k: v for k, v in ARGS.items()})
    validate_manifest(manifest, check_files=True)
    assert list(manifest.columns[:len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert manifest["image_id"].tolist() == batch.labels["image_id"].tolist()
    assert (manifest["source"] == "synthetic").all() and manifest["split"].isna().all()
    assert (manifest["patient_id"] == manifest["image_id"]).all()
    assert manifest["dr_grade"].tolist() == batch.labels["dr_grade"].tolist()
    assert manifest["dme_grade"].tolist() == batch.labels["dme_grade"].tolist()
    assert np.allclose(manifest["disc_diameter"].astype(float), batch.labels["disc_diameter"])
    assert {"count_iHE_ST", "quality_ok", "seed", "referable"} <= set(manifest.columns)
    for i, row in manifest.iterrows():
        assert Path(row["image_path"]).is_absolute() and Path(row["image_path"]).parent == written.resolve()
        assert np.array_equal(read_image(row["image_path"]), batch.images[i])
        for k, lesion in enumerate(LESIONS):
            present = row[f"lesion_{lesion}"]
            assert present == int(batch.masks[i, k].any())  # annotated for all 8: 0 or 1, never NA
            if present:
                assert Path(row[f"mask_{lesion}"]).name == f"{row['image_id']}_{lesion}.png"
            else:
                assert pd.isna(row[f"mask_{lesion}"])
            mask = read_mask(row[f"mask_{lesion}"], row["mask_rule"], shape=batch.images.shape[1:3])
            assert np.array_equal(mask, batch.masks[i, k])


def test_split_written_with_the_dataset_reaches_the_manifest(tmp_path):
    root = write_dataset(tmp_path / "test_set", 2, 64, seed=2, split="test")
    assert (load_synthetic(root)["split"] == "test").all()


def test_missing_folder_or_labels(tmp_path):
    with pytest.raises(ManifestError, match="dataset folder not found"):
        load_synthetic(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="labels.csv"):
        load_synthetic(tmp_path)


def test_missing_image_is_named(written, tmp_path):
    folder = copy_of(written, tmp_path)
    (folder / "synth_000002.png").unlink()
    with pytest.raises(ManifestError, match="synth_000002.png"):
        load_synthetic(folder)


def test_mask_files_must_agree_with_presence(written, tmp_path):
    folder = copy_of(written, tmp_path)
    labels = pd.read_csv(folder / "labels.csv")
    row = labels.index[labels["lesion_MA"] == 1][0]
    name = labels.loc[row, "image_id"]
    (folder / f"{name}_MA.png").unlink()
    with pytest.raises(ManifestError, match=f"MA present in {name}, but its mask is missing"):
        load_synthetic(folder)
    (folder / f"{name}_MA.png").write_bytes((written / f"{name}_MA.png").read_bytes())
    labels.loc[row, "lesion_MA"] = 0
    labels.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(ManifestError, match="marks MA absent"):
        load_synthetic(folder)


def test_bad_label_table(written, tmp_path):
    folder = copy_of(written, tmp_path)
    labels = pd.read_csv(folder / "labels.csv")
    labels.drop(columns=["dme_grade"]).to_csv(folder / "labels.csv", index=False)
    with pytest.raises(ManifestError, match="dme_grade"):
        load_synthetic(folder)
    labels.assign(lesion_NV=2).to_csv(folder / "labels.csv", index=False)
    with pytest.raises(ManifestError, match="lesion_NV"):
        load_synthetic(folder)
