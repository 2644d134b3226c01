"""Packaging: pyproject.toml and environment.yml declare the same dependencies and floors; the floors
and requires-python are true; the lock file pins what pyproject asks for, with hashes; `make install`
uses it, and the opt-in CPU-only install takes only PyTorch from its index."""
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

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


# ------------------------------------------------------------------ floors, Python, lock file, install

LOCK = ROOT / "requirements" / "course.lock"
TORCH_PAIR = ROOT / "requirements" / "torch-pair.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_for(torchvision: Version) -> Version:
    """The torch release a torchvision release is built for: 0.N pairs with 2.(N - 15) (0.21 -> 2.6,
    0.29 -> 2.14; torchvision's README table, checked against the installed metadata below)."""
    assert torchvision.major == 0 and torchvision.minor >= 15, f"no torch 2.x pairs with torchvision {torchvision}"
    return Version(f"2.{torchvision.minor - 15}")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def floor(requirement: Requirement) -> Version:
    (bound,) = [spec for spec in requirement.specifier if spec.operator == ">="]
    return Version(bound.version)


def lock_entries() -> dict[str, dict]:
    """name -> {"pins": [(version, marker)], "hashes": n, "via": {names}} from the uv-written lock."""
    entries: dict[str, dict] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line.rstrip(" \\"))
            current = entries.setdefault(requirement.name, {"pins": [], "hashes": 0, "via": set()})
            (pin,) = requirement.specifier
            assert pin.operator == "==", f"lock entry not pinned: {line}"
            current["pins"].append((Version(pin.version), requirement.marker))
        elif current is not None and line.strip().startswith("--hash=sha256:"):
            current["hashes"] += 1
        elif current is not None and line.strip().startswith("# via"):
            current["via"] |= {word for word in line.strip()[len("# via"):].split() if word}
        elif current is not None and line.strip().startswith("#   "):
            current["via"].add(line.strip()[1:].split()[0])
    return entries


def test_torchvision_pairing_rule_matches_the_installed_metadata():
    installed = Version(metadata.version("torchvision"))
    (torch_requirement,) = [Requirement(r) for r in metadata.requires("torchvision") if r.startswith("torch")]
    wanted = torch_for(installed)
    assert any(Version(spec.version).release[:2] == wanted.release for spec in torch_requirement.specifier), \
        f"torchvision {installed} declares {torch_requirement}, the rule says torch {wanted}"


def test_torch_floor_is_the_one_the_torchvision_floor_needs():
    requirements = {Requirement(r).name: Requirement(r) for r in project()["dependencies"]}
    torch_floor, torchvision_floor = floor(requirements["torch"]), floor(requirements["torchvision"])
    assert torch_floor == torch_for(torchvision_floor), \
        f"torchvision>={torchvision_floor} installs only with torch {torch_for(torchvision_floor)}, " \
        f"so the torch floor {torch_floor} is not a true floor"


def test_requires_python_admits_only_versions_the_tests_run_on():
    """The tests import tomllib (new in 3.11), so the package must not claim 3.10."""
    supported = SpecifierSet(project()["requires-python"])
    assert "3.10" not in supported and "3.11" in supported
    assert Version(".".join(map(str, sys.version_info[:2]))) in supported


def test_lock_pins_the_torch_pair_and_satisfies_every_requirement():
    entries = lock_entries()
    pair = {Requirement(line).name: Requirement(line) for line in TORCH_PAIR.read_text().splitlines()
            if line and not line.startswith("#")}
    for name, requirement in pair.items():
        assert [str(version) for version, _ in entries[name]["pins"]] == [next(iter(requirement.specifier)).version]
    assert entries["torch"]["pins"][0][0].release[:2] == torch_for(entries["torchvision"]["pins"][0][0]).release
    declared = list(project()["dependencies"]) + [r for group in project()["optional-dependencies"].values()
                                                  for r in group]
    for line in declared:
        requirement = Requirement(line)
        assert requirement.name in entries, f"{requirement.name} is declared but not locked (run `make lock`)"
        for version, _ in entries[requirement.name]["pins"]:
            assert version in requirement.specifier, f"lock pins {requirement.name}=={version}, pyproject wants {line}"
    unhashed = sorted(name for name, entry in entries.items() if entry["hashes"] < len(entry["pins"]))
    assert not unhashed, f"lock entries without hashes: {unhashed}"


def test_lock_pins_what_this_python_runs_with_for_torch():
    """The lock and the environment the tests run in agree on the PyTorch pair (local labels such as
    +cpu aside), so the numbers in the README were measured with the locked versions."""
    entries = lock_entries()
    for name in ("torch", "torchvision"):
        installed = Version(Version(metadata.version(name)).public)
        assert installed in {version for version, _ in entries[name]["pins"]}, f"{name} {installed} is not the locked one"


def make_dry_run(*arguments: str) -> str:
    """The commands `make` would run (-n) for a target, as if it were out of date (-B)."""
    result = subprocess.run(["make", "-n", "-B", *arguments], cwd=ROOT, capture_output=True, text=True, check=True)
    return result.stdout


def test_make_lock_regenerates_the_lock_with_hashes_for_every_platform():
    commands = make_dry_run("lock")
    for option in ("uv pip compile pyproject.toml", "--generate-hashes", "--universal", "--extra notebooks",
                   "--extra dev", "--constraint requirements/torch-pair.txt", "--output-file requirements/course.lock"):
        assert option in commands
    assert LOCK.read_text().startswith("# This file was autogenerated by uv via the following command:\n#    make lock\n")


def test_make_install_uses_the_lock_by_default():
    commands = make_dry_run("install")
    assert "pip install --quiet --require-hashes -r requirements/course.lock" in commands
    assert "--index-url" not in commands and "pip install --quiet --no-deps -e ." in commands
    assert "pip check" in commands


def test_cpu_only_install_takes_torch_from_the_named_index_and_everything_else_from_the_lock(tmp_path):
    commands = make_dry_run("install", f"TORCH_INDEX={CPU_INDEX}")
    assert f"--index-url {CPU_INDEX}" in commands
    # run the recipe's own filter and version lookup on the real lock file
    awk = next(line for line in commands.splitlines() if line.startswith("awk "))
    filtered = tmp_path / "lock-without-torch.txt"
    subprocess.run(awk.replace(".venv/lock-without-torch.txt", str(filtered)), shell=True, cwd=ROOT, check=True)
    versions = subprocess.run("grep -oE '^torch(vision)?==[^ ]+' requirements/course.lock", shell=True, cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.split()
    entries = lock_entries()
    assert versions == [f"{name}=={entries[name]['pins'][0][0]}" for name in ("torch", "torchvision")]
    kept = {Requirement(line.rstrip(" \\")).name for line in filtered.read_text().splitlines()
            if line and not line.startswith((" ", "#"))}
    removed = set(entries) - kept
    assert {"torch", "torchvision", "triton"} <= removed and any(name.startswith("nvidia-") for name in removed)
    # nothing removed but the PyTorch pair itself (which the index replaces) is needed by anything kept ...
    for name in removed - {"torch", "torchvision"}:
        assert entries[name]["via"] <= removed, f"{name} is removed but needed by {entries[name]['via'] - removed}"
    # ... and everything PyTorch needs without CUDA (its requirements on macOS) stays
    mac = {"platform_system": "Darwin", "sys_platform": "darwin", "platform_machine": "arm64"}
    for package in ("torch", "torchvision"):
        for line in metadata.requires(package):
            requirement = Requirement(line)
            if requirement.name in ("torch",) or (requirement.marker and "extra" in str(requirement.marker)):
                continue
            if requirement.marker is None or Marker(str(requirement.marker)).evaluate(mac):
                assert requirement.name in kept, f"{package} needs {requirement.name} on a CPU-only install"
