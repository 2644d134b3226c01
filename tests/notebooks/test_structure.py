"""Every notebook follows the course conventions (see DESIGN.md, "Notebooks")."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fundus_lib.config import PARAMETERS, resolve
from tests.notebooks.conftest import NOTEBOOKS, ROOT, notebook_params, parameters_cells, read

MAX_BYTES = 2 * 1024 * 1024
DEVICE_LITERAL = re.compile(r"""(["'](cuda(:\d+)?|cpu|mps)["'])|\.cuda\(\)""")
ABSOLUTE_PATH = re.compile(r"""["'](/(home|Users|tmp|work|data|mnt|root)\b[^"']*|[A-Za-z]:\\\\[^"']*)["']""")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks found in notebooks/"


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except ValueError:
        return False


def _parameter_statements(notebook) -> list[ast.AnnAssign]:
    return ast.parse(parameters_cells(read(notebook))[0].source).body


@notebook_params()
def test_one_parameters_cell_of_annotated_literal_assignments(notebook):
    """Each line is `name: type = literal  # meaning`: papermill --help-notebook shows the type and
    meaning, resolve() sees the literal, and the type is the one fundus_lib.config.PARAMETERS checks."""
    cells = parameters_cells(read(notebook))
    assert len(cells) == 1, f"{notebook.name}: expected exactly one cell tagged 'parameters', found {len(cells)}"
    tree = ast.parse(cells[0].source)
    assert tree.body, f"{notebook.name}: the parameters cell is empty"
    lines = cells[0].source.splitlines()
    for statement in tree.body:
        assert isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
            and isinstance(statement.annotation, ast.Name) and statement.value is not None \
            and _literal(statement.value), \
            f"{notebook.name}: parameters cell line {statement.lineno} is not `name: type = literal`"
        name, kind = statement.target.id, statement.annotation.id
        assert name in PARAMETERS and kind == PARAMETERS[name].kind.__name__, \
            f"{notebook.name}: {name} is annotated {kind}, fundus_lib.config.PARAMETERS checks " \
            f"{PARAMETERS[name].kind.__name__ if name in PARAMETERS else 'nothing'}"
        assert re.search(r"  # \S", lines[statement.lineno - 1]), f"{notebook.name}: {name} has no `# meaning`"
    names = [s.target.id for s in tree.body]
    assert "profile" in names, f"{notebook.name}: the parameters cell must set `profile`"


@notebook_params()
def test_parameters_match_the_presets(notebook):
    names = {s.target.id for s in _parameter_statements(notebook)}
    for profile in ("smoke", "quick"):
        preset = ROOT / "configs" / notebook.stem / f"{profile}.yaml"
        assert preset.is_file(), f"missing preset {preset}"
        keys = set(yaml.safe_load(preset.read_text()))
        assert keys == names, f"{preset.name} keys differ from the parameters cell: {sorted(keys ^ names)}"


@notebook_params()
def test_papermill_help_shows_every_parameter_with_type_and_meaning(notebook):
    result = subprocess.run([str(Path(sys.executable).with_name("papermill")), "--help-notebook", str(notebook)],
                            capture_output=True, text=True, check=True)
    assert "Unknown type" not in result.stdout
    for statement in _parameter_statements(notebook):
        name, kind = statement.target.id, statement.annotation.id
        assert re.search(rf"^  {name}: {kind} \(default ", result.stdout, re.M), f"{name} missing from:\n{result.stdout}"


@notebook_params()
def test_resolve_follows_the_parameters_cell(notebook):
    nb = read(notebook)
    index = nb.cells.index(parameters_cells(nb)[0])
    following = next(c for c in nb.cells[index + 1:] if c.cell_type == "code")
    assert f'resolve(globals(), notebook="{notebook.stem}")' in following.source, \
        f"{notebook.name}: the cell after the parameters must call resolve(globals(), notebook=...)"


@notebook_params()
def test_opening_and_closing_sections(notebook):
    markdown = [c.source for c in read(notebook).cells if c.cell_type == "markdown"]
    assert markdown and markdown[0].lstrip().startswith("# "), f"{notebook.name}: first cell must be a # title"
    opening = "\n".join(markdown[:3]).lower()
    for fragment in ("what you will learn", "prerequisites", "run time"):
        assert fragment in opening, f"{notebook.name}: opening lacks '{fragment}'"
    headings = [line.strip().lower() for text in markdown for line in text.splitlines() if line.startswith("#")]
    for section in ("summary", "exercises", "references"):
        assert any(section in h for h in headings), f"{notebook.name}: no '{section}' section"


@notebook_params()
def test_committed_notebook_is_executed_small_and_records_results(notebook):
    assert notebook.stat().st_size < MAX_BYTES, f"{notebook.name} is {notebook.stat().st_size} bytes (limit 2 MB)"
    nb = read(notebook)
    code = [c for c in nb.cells if c.cell_type == "code"]
    unexecuted = [i for i, c in enumerate(code) if c.source.strip() and c.execution_count is None]
    assert not unexecuted, f"{notebook.name}: code cells {unexecuted} carry no output; run `make notebooks`"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{notebook.name}: committed outputs contain an error"
    assert any("record(" in c.source for c in code), f"{notebook.name}: no cell records results"
    profile_cell = parameters_cells(nb)[0].source
    assert re.search(r"""^profile(\s*:\s*str)?\s*=\s*["']quick["']""", profile_cell, re.M), \
        f"{notebook.name}: committed notebooks default to (and carry outputs of) the quick profile"


@notebook_params()
def test_no_hard_coded_devices_or_absolute_paths(notebook):
    for index, cell in enumerate(read(notebook).cells):
        if cell.cell_type != "code":
            continue
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("#"))
        assert not DEVICE_LITERAL.search(source), f"{notebook.name} cell {index}: hard-coded device"
        assert not ABSOLUTE_PATH.search(source), f"{notebook.name} cell {index}: absolute path"


FULL_CONFIGS = sorted((ROOT / "configs").glob("*/full-*.yaml"))
#: Notebooks that take a dataset parameter, and the real datasets their full configs must cover.
FULL_DATASETS = {
    "00_getting_started": {"aptos", "eyepacs", "idrid_grading"},
    "10_baseline_cnn_grading": {"aptos", "eyepacs", "idrid_grading"},
    "11_canet_cross_disease_attention": {"idrid_grading", "messidor"},
    "12_clpi_patch_lesion_attention": {"messidor2", "messidor"},
    "13_lnet_sian_lesion_segmentation": {"retinal_lesions"},
    "14_ellg_lesion_learning_and_generation": {"aptos", "eyepacs"},
    "15_deepmt_dr_multitask_low_resolution": {"ddr_segmentation", "idrid_segmentation"},
}


@pytest.mark.parametrize("config", FULL_CONFIGS, ids=[f"{c.parent.name}/{c.name}" for c in FULL_CONFIGS])
def test_full_configs_resolve_for_their_notebook(config, tmp_path):
    values = yaml.safe_load(config.read_text())
    assert values["profile"] == "full", f"{config}: a full-*.yaml sets profile: full"
    assert values.get("dataset") not in (None, "synthetic"), f"{config}: a full profile names a real dataset"
    declared = set(yaml.safe_load((config.parent / "quick.yaml").read_text()))
    assert set(values) == declared, f"{config} keys differ from the notebook's parameters: {sorted(set(values) ^ declared)}"
    cfg = resolve({**values, "data_dir": str(tmp_path)}, notebook=config.parent.name, root=ROOT)
    assert not cfg.is_synthetic and "synthetic" not in cfg.data_label


@notebook_params()
def test_every_notebook_with_a_dataset_has_its_full_configs(notebook):
    names = {s.target.id for s in _parameter_statements(notebook)}
    if "dataset" not in names:
        return
    configs = sorted((ROOT / "configs" / notebook.stem).glob("full-*.yaml"))
    datasets = {yaml.safe_load(config.read_text())["dataset"] for config in configs}
    assert notebook.stem in FULL_DATASETS, f"{notebook.name} takes a dataset: list its real datasets in FULL_DATASETS"
    assert datasets == FULL_DATASETS[notebook.stem], f"{notebook.name}: full configs cover {sorted(datasets)}"


#: A string literal that calls the data synthetic in words (the bare dataset key "synthetic" is a value, not a label).
SYNTHETIC_WORDS = re.compile(r"""(["'])(?!synthetic\1)[^"'\n]*\bsynthetic\b[^"'\n]*\1""", re.I)


@notebook_params()
def test_notebooks_with_a_dataset_take_data_labels_from_the_config(notebook):
    """In a notebook that can run on real data, no string in its code (titles, prints, headers) calls the data
    "synthetic":
    it writes cfg.data_label, so a real-data run never says synthetic and a synthetic one always does.
    (Notebooks 01 and 02 show generated images whatever the run, and have no dataset parameter.)"""
    names = {s.target.id for s in _parameter_statements(notebook)}
    if "dataset" not in names:
        return
    offending = []
    for index, cell in enumerate(read(notebook).cells):
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            code = line.split("  #")[0]
            if not code.lstrip().startswith("#") and SYNTHETIC_WORDS.search(code):
                offending.append(f"cell {index}: {line.strip()}")
    assert not offending, f"{notebook.name} types 'synthetic' where cfg.data_label belongs:\n" + "\n".join(offending)
    code = "\n".join(cell.source for cell in read(notebook).cells if cell.cell_type == "code")
    assert "cfg.data_label" in code, f"{notebook.name} never names its data with cfg.data_label"
