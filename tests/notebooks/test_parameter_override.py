"""A parameter injected through papermill's Python API reaches the notebook's recorded results."""
import json

import papermill as pm
import pytest
import yaml

from tests.notebooks.conftest import ROOT
from tests.notebooks.test_execution import kernel_env

NOTEBOOK = ROOT / "notebooks" / "00_getting_started.ipynb"


@pytest.mark.notebook
def test_overridden_parameters_reach_the_recorded_results(tmp_path, monkeypatch):
    parameters = yaml.safe_load((ROOT / "configs" / NOTEBOOK.stem / "smoke.yaml").read_text())
    parameters.update(n_train=16, seed=7)
    sidecar = tmp_path / "metrics.json"
    for key, value in kernel_env(sidecar).items():
        monkeypatch.setenv(key, value)
    pm.execute_notebook(str(NOTEBOOK), str(tmp_path / NOTEBOOK.name), parameters=parameters,
                        kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOK.parent))
    recorded = json.loads(sidecar.read_text())
    assert recorded["n_train_images"]["value"] == 16
    assert recorded["_meta"]["parameters"]["seed"] == 7
    assert recorded["_meta"]["profile"] == "smoke"


@pytest.mark.notebook
def test_a_bad_injected_parameter_fails_with_one_clear_error(tmp_path, monkeypatch):
    parameters = {"profile": "fast", "image_size": -3, "epochs": "ten"}
    for key, value in kernel_env(tmp_path / "metrics.json").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(pm.PapermillExecutionError) as failure:
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / NOTEBOOK.name), parameters=parameters,
                            kernel_name="python3", progress_bar=False, cwd=str(NOTEBOOK.parent))
    assert failure.value.ename == "ConfigError"
    for fragment in ("profile='fast'", "image_size=-3", "epochs='ten'"):
        assert fragment in failure.value.evalue
