"""pyproject.toml and environment.yml declare the same dependencies with the same lower bounds."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
#: conda-forge package names that differ from their PyPI names
CONDA_NAME = {"torch": "pytorch", "opencv-python-headless": "py-opencv"}


def _split(requirement: str) -> tuple[str, str]:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement.strip())
    assert match, f"cannot parse requirement {requirement!r}"
    return match.group(1).lower(), match.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        requirements += group
    return dict(_split(CONDA_NAME.get(_split(r)[0], _split(r)[0]) + _split(r)[1]) for r in requirements)


def conda_requirements() -> dict[str, str]:
    dependencies = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    plain = [d for d in dependencies if isinstance(d, str) and not d.startswith(("python", "pip"))]
    return dict(_split(d) for d in plain)


def test_environment_yml_and_pyproject_declare_the_same_set():
    pip, conda = pyproject_requirements(), conda_requirements()
    assert set(pip) == set(conda), f"only in pyproject: {sorted(set(pip) - set(conda))}; " \
                                   f"only in environment.yml: {sorted(set(conda) - set(pip))}"
    differing = {name: (pip[name], conda[name]) for name in pip if pip[name] != conda[name]}
    assert not differing, f"version bounds differ (pyproject, environment.yml): {differing}"


def test_python_versions_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    assert f"python{project['requires-python']}" in dependencies
