"""README.md and data/README.md cannot rot: every shell command and Python snippet in them runs here,
smoke-sized, or is checked another way for a reason stated below.

- Fenced ``python`` blocks run in order in one namespace (as a reader following the page would),
  with the real-data paths and sizes swapped for fixture trees and tiny sizes (:data:`SUBSTITUTIONS`).
- Inline ``load_source("<name>", root)`` calls of data/README.md run on that source's fixture tree.
- Shell commands (lines of fenced ``bash`` blocks, and inline commands starting with make, papermill,
  conda or kaggle) are each listed in exactly one table: :data:`DRY_RUN` (make targets that install,
  execute every notebook or start a server: ``make -n`` must show their recipe), papermill commands
  (``--help-notebook`` runs as written; a notebook execution runs with ``--prepare-only`` and its
  injected parameters must pass ``fundus_lib.config.resolve``), or :data:`NOT_RUN` with the reason.
  A command in no table, or a table entry no longer in the READMEs, fails.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fundus_lib.config import resolve
from fundus_lib.data import demo_layouts as source_fixtures

ROOT = Path(__file__).resolve().parents[2]
READMES = (ROOT / "README.md", ROOT / "data" / "README.md")
PAPERMILL = Path(sys.executable).with_name("papermill")

#: make targets checked with `make -n` (running them installs, runs every notebook for minutes, recurses
#: into this test suite or starts JupyterLab): command -> a fragment its recipe must contain.
DRY_RUN = {
    "make run": "-m fundus_lib.runner --profile quick",
    "make run PROFILE=gpu": "-m fundus_lib.runner --profile gpu",
    "make test": "-m pytest tests",
    "make notebooks": "-m fundus_lib.runner --profile quick --in-place",
    "make lab": "jupyter lab notebooks/",
    "make bench": "benchmarks/*.py",
    "make install": "--require-hashes -r requirements/course.lock",
    "make install TORCH_INDEX=https://download.pytorch.org/whl/cpu":
        "--index-url https://download.pytorch.org/whl/cpu",
    "make lock": "uv pip compile pyproject.toml",
    "make clean": "rm -rf .venv",
}
#: commands that are not run, and why.
NOT_RUN = {
    "conda env create -f environment.yml && conda activate fundus-dr":
        "conda is not installed where the tests run; tests/unit/test_packaging.py checks that environment.yml "
        "declares the same dependencies and floors as pyproject.toml",
    "torchrun --nproc_per_node=4 my_training_script.py":
        "needs several GPUs and the reader's own script; tests/unit/test_train.py runs fit() under "
        "torch.distributed.run with two gloo processes and checks it matches one process",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29500 my_training_script.py":
        "needs two GPU machines; the single-machine case above is tested with gloo",
    "kaggle competitions download -c aptos2019-blindness-detection":
        "downloads the dataset with a Kaggle account; tests/unit/data/test_source_aptos.py reads its layout",
}
#: (README, text in a python block) -> smoke-sized replacement; "{...}" names a fixture path.
SUBSTITUTIONS = {
    ("data/README.md", '"/data/IDRiD"'): '"{idrid}"',
    ("data/README.md", '"data/generated/my-set"'): '"{tmp}/my-set"',
    ("data/README.md", "n=200, size=256"): "n=3, size=64",
}
#: source name -> fixture builder (fundus_lib/data/demo_layouts.py), for the inline load_source calls.
BUILDERS = {
    "idrid": source_fixtures.build_idrid, "messidor": source_fixtures.build_messidor,
    "messidor2": source_fixtures.build_messidor2, "aptos": source_fixtures.build_aptos,
    "eyepacs": source_fixtures.build_eyepacs, "ddr": source_fixtures.build_ddr,
    "retinal_lesions": source_fixtures.build_retinal_lesions,
}
INLINE_COMMAND = re.compile(r"`((?:\.venv/bin/)?(?:make|papermill|conda|kaggle) [^`]+)`")
INLINE_LOAD = re.compile(r'`(load_source\("(\w+)", root\))`')


def fenced(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)


def shell_commands() -> dict[str, Path]:
    """Every shell command of both READMEs -> the README it is in (continuations joined, comments cut)."""
    commands: dict[str, Path] = {}
    for readme in READMES:
        for block in fenced(readme, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.sub(r"\s+#\s.*$", "", line).strip()
                if command:
                    commands[" ".join(command.split())] = readme
        for command in INLINE_COMMAND.findall(readme.read_text().replace("\n", " ")):
            commands[" ".join(command.split())] = readme
    return commands


def _is_papermill(command: str) -> bool:
    return "papermill " in command


def test_every_command_is_checked_and_every_check_is_still_in_a_readme():
    commands = shell_commands()
    unchecked = [c for c in commands if c not in DRY_RUN and c not in NOT_RUN and not _is_papermill(c)]
    assert not unchecked, f"README commands without a check in tests/unit/test_readme.py: {unchecked}"
    stale = [c for c in [*DRY_RUN, *NOT_RUN] if c not in commands]
    assert not stale, f"checks for commands no README has any more: {stale}"
    assert all(reason for reason in NOT_RUN.values())


@pytest.mark.parametrize("command", sorted(DRY_RUN))
def test_make_targets_show_their_recipe(command):
    result = subprocess.run(["make", "-n", "-B", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert DRY_RUN[command] in result.stdout, result.stdout


def _papermill_commands() -> list[str]:
    return sorted(c for c in shell_commands() if _is_papermill(c))


@pytest.mark.slow
@pytest.mark.parametrize("command", _papermill_commands())
def test_papermill_commands(command, tmp_path):
    """--help-notebook runs as written. A notebook execution (minutes, a GPU and a real dataset for the
    full configurations) is prepared with the same arguments (--prepare-only), on a fixture IDRiD
    tree in place of the real one, and its injected parameters must resolve."""
    idrid = source_fixtures.build_idrid(tmp_path / "IDRiD")
    words = shlex.split(command)
    env = dict(os.environ)
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = str(idrid) if value.startswith("/data") else value
    assert words[0].endswith("papermill"), command
    arguments = [str(idrid) if word.startswith(("/data/", "/datasets/")) else word for word in words[1:]]
    if "--help-notebook" in arguments:
        result = subprocess.run([str(PAPERMILL), *arguments], cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0 and "Unknown type" not in result.stdout, result.stdout + result.stderr
        assert "Parameters inferred for notebook" in result.stdout
        return
    notebook, output = Path(arguments[0]), tmp_path / Path(arguments[1]).name
    arguments[1] = str(output)
    result = subprocess.run([str(PAPERMILL), *arguments, "--prepare-only"], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    prepared = nbformat.read(output, as_version=4)
    namespace: dict = {}
    for cell in prepared.cells:
        if {"parameters", "injected-parameters"} & set(cell.metadata.get("tags", [])):
            exec(cell.source, namespace)  # noqa: S102 - literal assignments only (tests/notebooks checks)
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("FUNDUS_")]:
            patch.delenv(name)  # only the command's own environment counts
        for name, value in env.items():
            if name.startswith("FUNDUS_"):
                patch.setenv(name, value)
        cfg = resolve(namespace, notebook=notebook.stem, root=ROOT)
    if "/data" in command:
        assert cfg.data_dir == str(idrid)


def test_python_blocks_run_in_order(tmp_path):
    for readme in READMES:
        relative = str(readme.relative_to(ROOT))
        fixtures = {"idrid": source_fixtures.build_idrid(tmp_path / relative / "IDRiD"), "tmp": tmp_path / relative}
        namespace: dict = {}
        for block in fenced(readme, "python"):
            for (where, text), replacement in SUBSTITUTIONS.items():
                if where == relative and text in block:
                    block = block.replace(text, replacement.format(**fixtures))
            exec(compile(block, f"{relative} python block", "exec"), namespace)  # noqa: S102 - the README's own code
        if relative == "data/README.md":
            assert len(namespace["manifest"]) == 3 and set(namespace["manifest"]["source"]) == {"synthetic"}
    for (where, text) in SUBSTITUTIONS:
        assert any(text in block for block in fenced(ROOT / where, "python")), f"{text!r} is no longer in {where}"


@pytest.mark.parametrize("snippet,source", sorted(set(INLINE_LOAD.findall(READMES[1].read_text()))))
def test_inline_load_source_calls_run_on_fixture_trees(snippet, source, tmp_path):
    from fundus_lib.data.sources import load_source  # noqa: F401 - used by the snippet

    builder = next(BUILDERS[prefix] for prefix in sorted(BUILDERS, key=len, reverse=True) if source.startswith(prefix))
    root = builder(tmp_path / source)
    manifest = eval(snippet, {"load_source": load_source, "root": root})  # noqa: S307 - the README's own call
    assert len(manifest) > 0
