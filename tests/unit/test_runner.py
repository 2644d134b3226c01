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


def test_state_run_time_writes_the_minutes_into_the_readme_row_and_the_opening(tmp_path):
    import nbformat

    from fundus_lib.runner import state_run_time

    (tmp_path / "README.md").write_text("| # | notebook | minutes |\n|---|---|---|\n"
                                        "| 11 | [CANet](notebooks/11_x.ipynb) | Li | 2.7 |\n"
                                        "| 12 | CLPI | *planned* | — |\n")
    notebook = tmp_path / "11_x.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        "# T\n**Run time**: quick profile (the committed outputs) about 5 minutes (shared machine).")])
    nbformat.write(nb, notebook)
    assert state_run_time(notebook, 3.456, tmp_path) == []
    assert "| 11 | [CANet](notebooks/11_x.ipynb) | Li | 3.5 |" in (tmp_path / "README.md").read_text()
    assert "| 12 | CLPI | *planned* | — |" in (tmp_path / "README.md").read_text()
    assert "(the committed outputs) about 3 minutes (shared" in nbformat.read(notebook, 4).cells[0].source
    assert state_run_time(notebook, 0.4, tmp_path) == []
    assert "(the committed outputs) under 1 minute (shared" in nbformat.read(notebook, 4).cells[0].source
    other = tmp_path / "13_y.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# no run time")]), other)
    assert len(state_run_time(other, 1.0, tmp_path)) == 2  # neither place states it: both reported


def test_compact_images_palette_encodes_png_outputs_only_when_smaller(tmp_path):
    import base64
    import io

    import nbformat
    import numpy as np
    from PIL import Image

    from fundus_lib.runner import compact_images

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    rng = np.random.default_rng(0)
    few_colours = rng.integers(0, 256, (50, 3), dtype=np.uint8)[rng.integers(0, 50, (96, 128))]  # like a figure
    flat = np.full((32, 32, 3), 200, dtype=np.uint8)  # already tiny as RGB
    cell = nbformat.v4.new_code_cell("plot()", outputs=[
        nbformat.v4.new_output("display_data", data={"image/png": png(few_colours), "text/plain": "<Figure>"}),
        nbformat.v4.new_output("display_data", data={"image/png": png(flat)})])
    path = tmp_path / "nb.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)
    before = [o["data"]["image/png"] for o in nbformat.read(path, 4).cells[0].outputs]
    assert compact_images(path) > 0
    outputs = nbformat.read(path, 4).cells[0].outputs
    first = Image.open(io.BytesIO(base64.b64decode(outputs[0]["data"]["image/png"])))
    assert first.mode == "P" and first.size == (128, 96)
    assert np.abs(np.asarray(first.convert("RGB"), dtype=int) - few_colours).mean() < 4  # close to the original
    assert outputs[0]["data"]["text/plain"] == "<Figure>"
    assert all(len(o["data"]["image/png"]) <= len(b) for o, b in zip(outputs, before))
