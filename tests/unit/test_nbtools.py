"""fundus_lib.nbtools: the metrics sidecar, its checks, the environment report, show_source."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

from fundus_lib import nbtools
from fundus_lib.config import resolve


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    folder = tmp_path / "configs" / "99_demo"
    folder.mkdir(parents=True)
    (folder / "quick.yaml").write_text(yaml.safe_dump({"profile": "quick", "seed": 1, "device": "cpu"}))
    monkeypatch.setenv("FUNDUS_METRICS_PATH", str(tmp_path / "out" / "demo.metrics.json"))
    return resolve({"profile": "quick", "seed": None, "device": None}, "99_demo", root=tmp_path)


def test_record_writes_plain_json_with_meta(cfg, tmp_path):
    nbtools.record("accuracy", np.float32(0.75), bounds=(0, 1))
    nbtools.record("per_class", torch.tensor([1.0, 2.0]))
    data = json.loads((tmp_path / "out" / "demo.metrics.json").read_text())
    assert data["accuracy"] == {"value": 0.75, "bounds": [0, 1]}
    assert data["per_class"]["value"] == [1.0, 2.0]
    assert data["_meta"]["profile"] == "quick" and data["_meta"]["data"] == "synthetic benchmark"
    assert data["_meta"]["parameters"]["seed"] == 1
    assert nbtools.check_sidecar(tmp_path / "out" / "demo.metrics.json") == []


def test_check_sidecar_flags_non_finite_and_out_of_bounds(cfg, tmp_path):
    nbtools.record("kappa", 1.5, bounds=(-1, 1))
    nbtools.record("loss", math.nan)
    problems = nbtools.check_sidecar(tmp_path / "out" / "demo.metrics.json")
    assert any("kappa" in p and "outside" in p for p in problems)
    assert any("loss" in p and "non-finite" in p for p in problems)


def test_check_sidecar_flags_a_missing_file(tmp_path):
    assert "no metrics sidecar" in nbtools.check_sidecar(tmp_path / "absent.json")[0]


def test_record_rejects_bad_keys_and_values(cfg):
    with pytest.raises(ValueError, match="record key"):
        nbtools.record("_meta", 1)
    with pytest.raises(TypeError, match="record\\(\\) stores"):
        nbtools.record("thing", object())


def test_environment_reports_versions_device_and_profile(cfg):
    facts = nbtools.environment(cfg)
    assert facts["torch"] == torch.__version__
    assert facts["device"].startswith("cpu") and facts["profile"] == "quick"
    assert facts["data"] == "synthetic benchmark"


def test_show_source_returns_the_code(cfg):
    shown = nbtools.show_source(nbtools.record)
    assert "def record(" in shown.data
    with pytest.raises(TypeError, match="cannot show the source"):
        nbtools.show_source(42)
