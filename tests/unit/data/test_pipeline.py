"""fundus_lib.data.pipeline: configuration -> manifest -> loaders."""
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fundus_lib.config import resolve
from fundus_lib.data.pipeline import available_tasks, has_labels, load_dataset, make_loaders, split_seed, synthetic_benchmark
from fundus_lib.data.splits import check_no_leakage


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    return synthetic_benchmark(6, 4, 4, 64, seed=3, root=root)


def test_synthetic_benchmark_has_three_disjoint_seeded_splits(manifest):
    assert manifest["split"].value_counts().to_dict() == {"train": 6, "val": 4, "test": 4}
    check_no_leakage(manifest)
    assert len({split_seed(3, s) for s in ("train", "val", "test")}) == 3
    assert manifest["image_id"].str.startswith(("train/", "val/", "test/")).all()


def test_synthetic_benchmark_is_generated_once_and_reused(manifest, tmp_path_factory):
    first = Path(manifest["image_path"].iloc[0])
    stamp = first.stat().st_mtime_ns
    again = synthetic_benchmark(6, 4, 4, 64, seed=3, root=first.parents[2])
    assert again["image_path"].tolist() == manifest["image_path"].tolist()
    assert first.stat().st_mtime_ns == stamp


def test_make_loaders_yields_requested_keys_and_deterministic_eval(manifest):
    loaders = make_loaders(manifest, tasks=("dr", "masks"), image_size=32, batch_size=4, num_workers=0, seed=1)
    assert set(loaders) == {"train", "val", "test"}
    batch = next(iter(loaders["train"]))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["masks"].shape == (4, 8, 32, 32)
    assert {"dr", "mask_valid", "meta"} <= set(batch)
    first = torch.cat([b["image"] for b in loaders["val"]])
    second = torch.cat([b["image"] for b in loaders["val"]])
    assert torch.equal(first, second)
    assert len(loaders["test"].dataset) == 4


def test_make_loaders_needs_a_train_split(manifest):
    with pytest.raises(ValueError, match="no 'train' rows"):
        make_loaders(manifest[manifest["split"] != "train"], tasks=("dr",), image_size=32, batch_size=2,
                     num_workers=0)


def _cfg(tmp_path, **values):
    folder = tmp_path / "configs" / "99_demo"
    folder.mkdir(parents=True, exist_ok=True)
    preset = {"profile": "quick", "seed": 0, "dataset": "synthetic", "data_dir": None, "image_size": 32,
              "n_train": 4, "n_val": 2, "n_test": 2}
    (folder / "quick.yaml").write_text(yaml.safe_dump(preset))
    return resolve({"profile": "quick", **values}, "99_demo", root=tmp_path)


def test_load_dataset_generates_under_the_project_data_folder(tmp_path):
    manifest = load_dataset(_cfg(tmp_path))
    assert len(manifest) == 8
    assert all(Path(p).is_relative_to(tmp_path / "data" / "generated") for p in manifest["image_path"])


def test_load_dataset_real_source_needs_data_dir(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset(_cfg(tmp_path, dataset="aptos"))


def test_load_dataset_synthetic_needs_image_counts(tmp_path):
    _cfg(tmp_path)  # writes the preset that declares the parameters
    full = {"profile": "full", "seed": 0, "dataset": "synthetic", "data_dir": None, "image_size": 32,
            "n_train": 4, "n_val": None, "n_test": 2}  # "full" has no preset to fill n_val
    with pytest.raises(ValueError, match=r"needs \['n_val'\]"):
        load_dataset(resolve(full, "99_demo", root=tmp_path))


def test_data_path_auto_holds_small_sets_in_memory_and_streams_large_ones(manifest, monkeypatch):
    from fundus_lib.data import pipeline
    from fundus_lib.data.in_memory import TensorLoader

    assert pipeline.choose_data_path(manifest, ("dr",), 512) == "memory"
    monkeypatch.setattr(pipeline, "_total_memory", lambda: 1000)
    assert pipeline.choose_data_path(manifest, ("dr",), 512) == "stream"
    assert pipeline.choose_data_path(manifest, ("dr",), 512, "memory") == "memory"
    with pytest.raises(ValueError, match="data_path"):
        pipeline.choose_data_path(manifest, ("dr",), 512, "disk")
    memory = make_loaders(manifest, tasks=("dr",), image_size=32, batch_size=4, data_path="memory")
    stream = make_loaders(manifest, tasks=("dr",), image_size=32, batch_size=4, num_workers=0, data_path="stream")
    assert isinstance(memory["train"], TensorLoader) and not isinstance(stream["train"], TensorLoader)
    for a, b in zip(memory["test"], stream["test"]):  # same pixels for evaluation on both paths
        torch.testing.assert_close(a["image"], b["image"], atol=1e-6, rtol=0)


def test_load_dataset_makes_images_at_the_size_asked(tmp_path):
    from PIL import Image

    cfg = _cfg(tmp_path)
    for asked, size in ((None, cfg.image_size), (40, 40)):  # default: the run's image_size
        with Image.open(load_dataset(cfg, image_size=asked)["image_path"].iloc[0]) as image:
            assert image.size == (size, size)


def test_available_tasks_drops_what_the_dataset_lacks_with_a_note(manifest, capsys):
    dr_only = manifest.assign(dme_grade=pd.NA)
    assert available_tasks(manifest, ("dr", "dme", "masks"), "synthetic benchmark") == ("dr", "dme", "masks")
    assert capsys.readouterr().out == ""
    assert available_tasks(dr_only, ("dr", "dme"), "APTOS 2019 (real)") == ("dr",)
    assert "APTOS 2019 (real) has no DME labels, so the 'dme' task is left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="labels none of the tasks"):
        available_tasks(dr_only, ("dme",), "APTOS 2019 (real)")
    without_masks = manifest.assign(**{column: pd.NA for column in manifest if column.startswith("mask_")})
    assert has_labels(manifest, "masks") and not has_labels(without_masks, "masks")
    with pytest.raises(ValueError, match="task must be one of"):
        has_labels(manifest, "grade")
