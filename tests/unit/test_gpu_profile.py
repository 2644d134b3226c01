"""The `gpu` profile: a validated preset per notebook at paper-like scale, and the committed results format."""
import json
from pathlib import Path

import pytest
import yaml

from fundus_lib import runner
from fundus_lib.config import resolve

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PAPER_BACKBONES = {"resnet50", "densenet121", "inception_v3"}


def _preset(notebook, profile):
    return yaml.safe_load((ROOT / "configs" / notebook / f"{profile}.yaml").read_text())


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_notebook_has_a_gpu_preset_that_resolves(notebook):
    gpu, quick = _preset(notebook, "gpu"), _preset(notebook, "quick")
    assert set(gpu) == set(quick), f"{notebook}: gpu.yaml and quick.yaml must declare the same parameters"
    cfg = resolve({"profile": "gpu"}, notebook, root=ROOT)  # raises ConfigError on any bad value
    assert cfg.profile == "gpu"


@pytest.mark.parametrize("notebook", [nb for nb in NOTEBOOKS if "n_train" in _preset(nb, "gpu")])
def test_gpu_presets_train_at_paper_like_scale_on_the_synthetic_benchmark(notebook):
    gpu, quick = _preset(notebook, "gpu"), _preset(notebook, "quick")
    assert gpu["dataset"] == "synthetic" and gpu["data_dir"] is None
    images = gpu["n_train"] + gpu["n_val"] + gpu["n_test"]
    assert images >= 1000 and images > 2 * (quick["n_train"] + quick["n_val"] + quick["n_test"])
    assert 224 <= gpu["image_size"] <= 1024  # 1024: CLPI's generator input, as in the paper
    if "backbone" in gpu:
        assert gpu["backbone"] in PAPER_BACKBONES
        assert gpu["weights"] == "none"  # defaults never need the network


def test_results_file_carries_hardware_commit_date_minutes_and_every_metric(tmp_path):
    sidecar = tmp_path / "10_demo.metrics.json"
    sidecar.write_text(json.dumps({"_meta": {"data": "synthetic", "parameters": {"epochs": 3}},
                                   "kappa": {"value": 0.61, "bounds": [-1, 1]}}))
    result = runner.NotebookResult("10_demo", "ok", 4.25)
    path = runner.write_results(result, sidecar, "gpu", tmp_path)
    assert path == tmp_path / "results" / "10_demo" / "gpu.json"
    data = json.loads(path.read_text())
    assert data["metrics"] == {"kappa": {"value": 0.61, "bounds": [-1, 1]}}
    assert data["minutes"] == 4.25 and data["profile"] == "gpu" and data["data"] == "synthetic"
    assert data["hardware"] and data["commit"] and data["date"][:4].isdigit()
    assert data["parameters"] == {"epochs": 3}
