"""fundus_lib.data.pipeline.load_dataset end to end on official-layout fixtures of real datasets:
configuration -> source -> splits -> field-of-view crop -> cache at the run's image size."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fundus_lib.config import resolve
from fundus_lib.data.manifest import ManifestError
from fundus_lib.data.pipeline import load_dataset
from fundus_lib.data.splits import check_no_leakage
from fundus_lib.data.synthetic import generate
from fundus_lib.data import demo_layouts as source_fixtures
from fundus_lib.data.demo_layouts import build_idrid, build_messidor

IMAGE_SIZE = 32
#: 16 training images, 8 of them DR 0: enough for a 15 % validation share stratified by grade (the
#: fixture's three are too few for assign_splits; see the report on small training sets).
_TRAIN_DR = [0] * 8 + [1, 2, 2, 3, 3, 4, 4, 2]
IDRID_GRADES = {"train": {f"IDRiD_{i + 1:03d}": (dr, 0 if dr < 2 else i % 3) for i, dr in enumerate(_TRAIN_DR)},
                "test": source_fixtures.IDRID_GRADES["test"]}


def _write_photograph(path: Path, value: int = 120) -> Path:
    """A 64 x 96 (3:2) fundus-like photograph in place of the fixtures' 6 x 8 placeholder, which the
    cache rejects as a thumbnail: a synthetic fundus (seeded by ``value`` and the file name, so
    different images differ) centred on a black background, as cameras frame the eye."""
    seed = value * 1000 + sum(path.name.encode())
    photograph = np.zeros((64, 96, 3), np.uint8)
    photograph[:, 16:80] = generate(1, size=64, seed=seed).images[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photograph).save(path)
    return path


#: Three images per Messidor base (36 in all, at least 7 per DR grade) instead of the fixture's two,
#: for the same reason; the byte-identical copy (second Base34 image) stays.
MESSIDOR_ROWS = {
    base: [(f"{name[:9]}{j}{name[10:]}" if j >= 2 else name, department, (dr + j) % 4 if j >= 2 else dr, dme)
           for j, (name, department, dr, dme) in enumerate(rows + [rows[0]])]
    for base, rows in source_fixtures.MESSIDOR_ROWS.items()
}


@pytest.fixture(autouse=True)
def photographs(monkeypatch):
    monkeypatch.setattr(source_fixtures, "write_image", _write_photograph)


@pytest.fixture
def idrid(tmp_path, monkeypatch):
    monkeypatch.setattr(source_fixtures, "IDRID_GRADES", IDRID_GRADES)
    return build_idrid(tmp_path / "IDRiD")


def _cfg(project: Path, dataset: str, data_dir: Path):
    """A resolved configuration of a demo notebook whose project folder is ``project``."""
    folder = project / "configs" / "99_demo"
    folder.mkdir(parents=True, exist_ok=True)
    preset = {"profile": "quick", "seed": 0, "dataset": "synthetic", "data_dir": None, "image_size": IMAGE_SIZE,
              "n_train": None, "n_val": None, "n_test": None}
    (folder / "quick.yaml").write_text(yaml.safe_dump(preset))
    return resolve({"profile": "quick", "dataset": dataset, "data_dir": str(data_dir)}, "99_demo", root=project)


def _assert_cached(manifest, project: Path, dataset: str) -> None:
    cache = project / "data" / "generated" / "cache" / f"{dataset}-{IMAGE_SIZE}"
    for path in manifest["image_path"]:
        assert Path(path).is_relative_to(cache), path
        with Image.open(path) as image:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_idrid_keeps_its_official_test_split_and_carves_validation_from_training(tmp_path, idrid):
    manifest = load_dataset(_cfg(tmp_path / "project", "idrid_grading", idrid))
    counts = manifest["split"].value_counts().to_dict()
    assert counts.get("test") == len(IDRID_GRADES["test"])
    assert counts.get("train", 0) + counts.get("val", 0) == len(IDRID_GRADES["train"]) and counts.get("val", 0) >= 1
    expected = {f"{split}/{name}": grades for split, rows in IDRID_GRADES.items() for name, grades in rows.items()}
    got = {row.image_id: (row.dr_grade, row.dme_grade) for row in manifest.itertuples()}
    assert got == expected
    assert set(manifest.loc[manifest["image_id"].str.startswith("test/"), "split"]) == {"test"}
    _assert_cached(manifest, tmp_path / "project", "idrid_grading")


def test_messidor_without_official_split_gets_grouped_train_val_test(tmp_path, monkeypatch):
    monkeypatch.setattr(source_fixtures, "MESSIDOR_ROWS", MESSIDOR_ROWS)
    data = build_messidor(tmp_path / "Messidor")
    manifest = load_dataset(_cfg(tmp_path / "project", "messidor", data))
    assert len(manifest) == sum(len(rows) for rows in MESSIDOR_ROWS.values())
    assert set(manifest["split"]) == {"train", "val", "test"}
    check_no_leakage(manifest)  # the byte-identical copy shares a patient, so it stays with its original
    _assert_cached(manifest, tmp_path / "project", "messidor")
    # a second call reuses the cache: same manifest, no image rewritten
    first = Path(manifest["image_path"].iloc[0])
    stamp = first.stat().st_mtime_ns
    again = load_dataset(_cfg(tmp_path / "project", "messidor", data))
    assert again["image_path"].tolist() == manifest["image_path"].tolist() and first.stat().st_mtime_ns == stamp
    assert np.array_equal(again["dr_grade"].to_numpy(), manifest["dr_grade"].to_numpy())


def test_a_broken_official_folder_stops_with_the_sources_error(tmp_path, idrid):
    next((idrid / "B. Disease Grading" / "2. Groundtruths").glob("a.*.csv")).unlink()
    with pytest.raises(ManifestError, match="IDRiD"):
        load_dataset(_cfg(tmp_path / "project", "idrid_grading", idrid))
