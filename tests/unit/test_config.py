"""fundus_lib.config: presets, environment overrides and one clear error for every bad parameter."""
from pathlib import Path

import pytest
import yaml

from fundus_lib.config import PARAMETERS, ConfigError, literal_parameters, resolve


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A throw-away project with one notebook's presets."""
    folder = tmp_path / "configs" / "99_demo"
    folder.mkdir(parents=True)
    quick = {"profile": "quick", "seed": 0, "device": "auto", "data_dir": None, "image_size": 128,
             "epochs": 5, "lr": 0.001}
    (folder / "quick.yaml").write_text(yaml.safe_dump(quick))
    (folder / "smoke.yaml").write_text(yaml.safe_dump({**quick, "profile": "smoke", "image_size": 32, "epochs": 1}))
    return tmp_path


def params(**overrides):
    base = {"profile": "quick", "seed": None, "device": None, "data_dir": None, "image_size": None,
            "epochs": None, "lr": None}
    return {**base, **overrides}


def test_none_values_come_from_the_profile_preset(project):
    cfg = resolve(params(profile="smoke"), "99_demo", root=project)
    assert (cfg.image_size, cfg.epochs, cfg.profile) == (32, 1, "smoke")
    assert cfg.data_dir is None  # nullable: stays None -> synthetic benchmark
    assert cfg.is_synthetic


def test_explicit_values_win_over_preset_and_ints_become_floats(project):
    cfg = resolve(params(epochs=7, lr=1), "99_demo", root=project)
    assert cfg.epochs == 7 and cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_environment_fills_none_but_not_explicit_values(project, monkeypatch):
    monkeypatch.setenv("FUNDUS_DATA_DIR", "/datasets/idrid")
    monkeypatch.setenv("FUNDUS_EPOCHS", "12")
    cfg = resolve(params(), "99_demo", root=project)
    assert cfg.data_dir == "/datasets/idrid" and cfg.epochs == 12
    cfg = resolve(params(epochs=3), "99_demo", root=project)
    assert cfg.epochs == 3


@pytest.mark.parametrize("bad, fragment", [
    ({"image_sz": 3}, "unknown parameter 'image_sz'"),
    ({"image_size": -3}, "image_size=-3 is below the minimum"),
    ({"profile": "fast"}, "profile='fast'"),
    ({"epochs": "ten"}, "epochs='ten' has type str; expected int"),
    ({"lr": True}, "lr=True has type bool"),
])
def test_each_bad_parameter_is_named(project, bad, fragment):
    with pytest.raises(ConfigError) as error:
        resolve(params(**bad), "99_demo", root=project)
    assert fragment in str(error.value)


def test_all_problems_are_reported_at_once_with_a_hint(project):
    with pytest.raises(ConfigError) as error:
        resolve(params(image_sz=3, image_size=-3, profile="fast", epochs="ten"), "99_demo", root=project)
    message = str(error.value)
    for fragment in ("image_sz", "did you mean 'image_size'", "image_size=-3", "profile='fast'", "epochs='ten'"):
        assert fragment in message


def test_full_profile_has_no_preset_so_every_value_must_be_given(project):
    with pytest.raises(ConfigError, match="epochs: no value"):
        resolve(params(profile="full", seed=0, device="cuda", image_size=224, lr=3e-4), "99_demo", root=project)


def test_literal_parameters_ignores_modules_functions_constants_and_private_names():
    import math
    namespace = {"math": math, "f": print, "_hidden": 1, "In": [], "LESIONS": ("MA",), "epochs": 3, "name": "x",
                 "sizes": [1, 2]}
    assert literal_parameters(namespace) == {"epochs": 3, "name": "x", "sizes": [1, 2]}


def test_every_committed_preset_uses_only_declared_parameters():
    root = Path(__file__).resolve().parents[2]
    for preset in sorted((root / "configs").glob("*/*.yaml")):
        data = yaml.safe_load(preset.read_text())
        unknown = sorted(set(data) - set(PARAMETERS))
        assert not unknown, f"{preset} uses parameters missing from PARAMETERS: {unknown}"
        problems = [p for name, value in data.items() for p in PARAMETERS[name].problems(name, value)]
        assert not problems, f"{preset}: {problems}"
