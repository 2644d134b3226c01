"""fundus_lib.config: presets, environment overrides and one clear error for every bad parameter."""
from pathlib import Path

import pytest
import yaml

from fundus_lib.config import PARAMETERS, ConfigError, literal_parameters, parse_env, resolve


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


@pytest.mark.parametrize("name, text, expected", [
    ("data_dir", "/x #2", "/x #2"),              # text stays text: no YAML comment, no number
    ("data_dir", "2024", "2024"),
    ("epochs", "3", 3),
    ("lr", "1e-3", 0.001),
    ("interactive", "false", False),
    ("interactive", "Yes", True),
    ("lambdas", "[0.0, 0.5]", [0.0, 0.5]),
    ("data_dir", "none", None),
])
def test_environment_values_parse_by_the_declared_type(name, text, expected):
    assert parse_env(name, text) == expected


@pytest.mark.parametrize("name, text", [("epochs", "3.5"), ("interactive", "maybe"), ("lambdas", "0.5"), ("lr", "fast")])
def test_a_bad_environment_value_names_the_variable(name, text):
    with pytest.raises(ConfigError, match=f"FUNDUS_{name.upper()}={text!r} cannot be read as"):
        parse_env(name, text)


@pytest.fixture
def data_project(tmp_path: Path) -> Path:
    """A project whose notebook declares dataset and data_dir (quick preset: synthetic)."""
    folder = tmp_path / "configs" / "98_data"
    folder.mkdir(parents=True)
    (folder / "quick.yaml").write_text(yaml.safe_dump({"profile": "quick", "dataset": "synthetic", "data_dir": None}))
    return tmp_path


def test_a_data_dir_without_a_dataset_is_refused_listing_the_datasets(data_project, monkeypatch):
    monkeypatch.setenv("FUNDUS_DATA_DIR", str(data_project))
    with pytest.raises(ConfigError) as error:
        resolve({"profile": "quick", "dataset": None, "data_dir": None}, "98_data", root=data_project)
    message = str(error.value)
    assert "from FUNDUS_DATA_DIR" in message and "dataset is 'synthetic' (quick preset)" in message
    assert "'idrid_grading'" in message and "'retinal_lesions'" in message


def test_a_real_dataset_needs_an_existing_data_dir(data_project):
    with pytest.raises(ConfigError, match="dataset='aptos' .* needs data_dir"):
        resolve({"profile": "quick", "dataset": "aptos", "data_dir": None}, "98_data", root=data_project)
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve({"profile": "quick", "dataset": "aptos", "data_dir": str(data_project / "nowhere")}, "98_data",
                root=data_project)


def test_data_label_names_the_data_of_the_run(data_project):
    synthetic = resolve({"profile": "quick", "dataset": None, "data_dir": None}, "98_data", root=data_project)
    real = resolve({"profile": "quick", "dataset": "idrid_grading", "data_dir": str(data_project)}, "98_data",
                   root=data_project)
    assert synthetic.data_label == "synthetic benchmark"
    assert real.data_label == "IDRiD (real)" and "synthetic" not in real.data_label


def test_a_resolved_config_pickles_for_worker_processes():
    import pickle

    cfg = resolve({"profile": "smoke"}, notebook="13_lnet_sian_lesion_segmentation")
    again = pickle.loads(pickle.dumps(cfg))
    assert again.as_dict() == cfg.as_dict() and again.notebook == cfg.notebook
    with pytest.raises(AttributeError, match="not declared"):
        again.no_such_parameter
