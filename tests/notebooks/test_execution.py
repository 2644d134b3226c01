"""Every notebook runs end to end in the smoke profile: papermill injects the smoke parameters
(prepare only), nbval executes the notebook once (lax mode: only cells marked NBVAL_CHECK_OUTPUT,
whose output is the same in every profile, are compared with the committed output), then the
recorded metrics sidecar is checked."""
import json
import os
import subprocess
import sys

import papermill as pm
import pytest
import yaml

from fundus_lib.nbtools import check_sidecar
from tests.notebooks.conftest import ROOT, notebook_params

CELL_TIMEOUT_S = 300


def kernel_env(sidecar) -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "FUNDUS_HOME": str(ROOT), "FUNDUS_METRICS_PATH": str(sidecar),
            "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::DeprecationWarning",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


@pytest.mark.notebook
@notebook_params()
def test_notebook_runs_in_the_smoke_profile(notebook, tmp_path):
    smoke = yaml.safe_load((ROOT / "configs" / notebook.stem / "smoke.yaml").read_text())
    prepared = tmp_path / notebook.name
    pm.execute_notebook(str(notebook), str(prepared), parameters=smoke, prepare_only=True,
                        kernel_name="python3", progress_bar=False)
    sidecar = tmp_path / f"{notebook.stem}.metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", f"--nbval-cell-timeout={CELL_TIMEOUT_S}",
         "-p", "no:cacheprovider", "-q", "--no-header", str(prepared)],
        cwd=tmp_path, env=kernel_env(sidecar), capture_output=True, text=True)
    assert result.returncode == 0, f"{notebook.name} failed under nbval:\n{result.stdout[-6000:]}"
    assert check_sidecar(sidecar) == []
    meta = json.loads(sidecar.read_text())["_meta"]
    assert meta["profile"] == "smoke" and meta["notebook"] == notebook.stem
