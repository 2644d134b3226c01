"""fundus_lib.runner: every notebook runs, failures are reported by name with the failing cell."""
import nbformat
import pytest

from fundus_lib import runner


def _notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'quick'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_a_failing_notebook_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    _notebook(tmp_path / "notebooks" / "01_broken.ipynb", "raise RuntimeError('deliberate failure')")
    _notebook(tmp_path / "notebooks" / "02_fine.ipynb",
              "from fundus_lib.nbtools import record\nprint(profile)\n"
              "import os, json, pathlib\n"
              "pathlib.Path(os.environ['FUNDUS_METRICS_PATH']).write_text(json.dumps("
              "{'answer': {'value': 42, 'bounds': None}}))")
    monkeypatch.setenv("FUNDUS_HOME", str(tmp_path))
    status = runner.main(["--profile", "smoke"])
    assert status == 1
    summary = next((tmp_path / "runs").glob("*/summary.md")).read_text()
    assert "| 01_broken | FAILED |" in summary and "| 02_fine | ok |" in summary
    assert "deliberate failure" in summary and "answer=42" in summary
    executed = next((tmp_path / "runs").glob("*/02_fine.ipynb"))
    assert "smoke" in nbformat.read(executed, as_version=4).cells[-1].outputs[0]["text"]
    assert "01_broken.ipynb failed at cell" in capsys.readouterr().err


def test_in_place_is_only_for_the_quick_profile():
    with pytest.raises(SystemExit):
        runner.main(["--profile", "smoke", "--in-place"])


def test_discover_filters_by_prefix(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in ("00_a", "10_b", "11_c"):
        (tmp_path / "notebooks" / f"{name}.ipynb").write_text("{}")
    assert [p.stem for p in runner.discover(tmp_path, ["1"])] == ["10_b", "11_c"]
    with pytest.raises(SystemExit, match="no notebook"):
        runner.discover(tmp_path, ["99"])
