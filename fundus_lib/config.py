"""Run configuration for the notebooks: profiles, presets and validated parameters.

Every notebook has ONE cell tagged ``parameters`` holding literal assignments (papermill injects
its own values after it), followed by ``cfg = resolve(globals(), notebook="11_canet")``.
:func:`resolve` then

1. keeps the literal-valued names of the namespace (the parameters; imports are ignored),
2. rejects names the notebook does not declare (its ``configs/<notebook>/quick.yaml`` lists them),
3. fills every ``None`` from, in order: an environment variable ``FUNDUS_<NAME>`` (e.g.
   ``FUNDUS_DATA_DIR``, ``FUNDUS_DEVICE``; read as the parameter's declared type, so a path stays
   the text it is), then the profile preset ``configs/<notebook>/<profile>.yaml`` (profiles
   "smoke", "quick" and "gpu"; "full" has no preset: a ``configs/<notebook>/full-<dataset>.yaml``
   file passed to papermill gives every value),
4. checks every value's type, range and choices against :data:`PARAMETERS`,
5. decides what data the run uses, by one rule (:func:`data_problems`): ``data_dir`` set means a
   real dataset, named by ``dataset``; it never silently falls back to the synthetic benchmark,

and raises ONE :class:`ConfigError` listing every bad or unknown parameter.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

PROFILES: tuple[str, ...] = ("smoke", "quick", "gpu", "full")
PRESET_PROFILES: tuple[str, ...] = ("smoke", "quick", "gpu")
DATASETS: tuple[str, ...] = (
    "synthetic", "idrid_grading", "idrid_segmentation", "messidor", "messidor2", "aptos", "eyepacs",
    "ddr_grading", "ddr_segmentation", "retinal_lesions",
)
#: How each dataset is named in titles, table headers and sentences (see :attr:`RunConfig.data_label`).
DATASET_NAMES: dict[str, str] = {
    "synthetic": "synthetic benchmark", "idrid_grading": "IDRiD", "idrid_segmentation": "IDRiD segmentation",
    "messidor": "Messidor", "messidor2": "Messidor-2", "aptos": "APTOS 2019", "eyepacs": "EyePACS",
    "ddr_grading": "DDR", "ddr_segmentation": "DDR segmentation", "retinal_lesions": "Retinal-Lesions",
}
#: How make_loaders serves batches: "auto" decides by size, "memory" (uint8 tensors, augmentation on
#: the device) or "stream" (DataLoader workers); see fundus_lib.data.pipeline.choose_data_path.
DATA_PATHS: tuple[str, ...] = ("auto", "memory", "stream")
_LITERAL_TYPES = (int, float, str, bool, list, tuple, dict, type(None))
_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})


class ConfigError(ValueError):
    """One or more notebook parameters are unknown or invalid; the message lists all of them."""


@dataclass(frozen=True)
class Param:
    """Declaration of one parameter: its type, allowed values and meaning.

    ``nullable`` parameters may stay ``None`` after resolution (for example ``data_dir``: None
    means "generate the synthetic benchmark").
    """

    kind: type
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    nullable: bool = False

    def problems(self, name: str, value: Any) -> list[str]:
        """Why ``value`` is not acceptable for parameter ``name`` (empty list when it is)."""
        if value is None:
            return [] if self.nullable else [f"{name}: no value (None) and no preset; expected {self.describe()}"]
        if self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is list:
            ok = isinstance(value, (list, tuple))
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            return [f"{name}={value!r} has type {type(value).__name__}; expected {self.describe()}"]
        items = value if self.kind is list else [value]
        if self.choices is not None:
            bad = [item for item in items if item not in self.choices]
            if bad:
                which = f": {bad} not allowed, every item" if self.kind is list else ""
                return [f"{name}={value!r}{which} must be one of {self._choices_text()}"]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                which = f" holds {item!r}, which" if self.kind is list else ""
                return [f"{name}={value!r}{which} is not a finite number; expected {self.describe()}"]
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if self.minimum is not None and item < self.minimum:
                    return [f"{name}={value!r} is below the minimum {self.minimum}; expected {self.describe()}"]
                if self.maximum is not None and item > self.maximum:
                    return [f"{name}={value!r} is above the maximum {self.maximum}; expected {self.describe()}"]
        return []

    def _choices_text(self) -> str:
        return ", ".join(repr(choice) for choice in self.choices or ())

    def describe(self) -> str:
        """The expected value in words: type, allowed choices or closed range, nullability."""
        text = self.kind.__name__
        if self.choices is not None:
            text += f", one of {self._choices_text()}"
        if self.minimum is not None or self.maximum is not None:
            text += f" in [{self.minimum if self.minimum is not None else '-inf'}, " \
                    f"{self.maximum if self.maximum is not None else 'inf'}]"
        return text + (" or None" if self.nullable else "")


#: Every parameter any notebook may declare, with its type, range and meaning.
PARAMETERS: dict[str, Param] = {
    "profile": Param(str, "smoke (CI), quick (CPU default), gpu (synthetic at paper scale, one GPU), "
                          "full (real data, GPU)", choices=PROFILES),
    "seed": Param(int, "random seed for data generation, initialisation and shuffling", 0, 2**31 - 1),
    "device": Param(str, "auto | cpu | cuda | mps", choices=("auto", "cpu", "cuda", "mps")),
    "dataset": Param(str, "dataset key: 'synthetic' or a real source (see data/README.md)", choices=DATASETS),
    "data_dir": Param(str, "folder of a real dataset; None = synthetic benchmark under data/generated",
                      nullable=True),
    "output_dir": Param(str, "where checkpoints and figures go; None = runs/<notebook>", nullable=True),
    "image_size": Param(int, "side of the square network input, in pixels", 32, 4096),
    "preview_size": Param(int, "side of images shown in figures, in pixels", 32, 4096),
    "n_train": Param(int, "synthetic training images (None for a real dataset)", 1, 1_000_000, nullable=True),
    "n_val": Param(int, "synthetic validation images (None for a real dataset)", 1, 1_000_000, nullable=True),
    "n_test": Param(int, "synthetic test images (None for a real dataset)", 1, 1_000_000, nullable=True),
    "n_images": Param(int, "images generated for a gallery or statistics", 1, 1_000_000),
    "epochs": Param(int, "training epochs", 1, 100_000),
    "batch_size": Param(int, "mini-batch size", 1, 4096),
    "lr": Param(float, "learning rate", 1e-8, 10.0),
    "weight_decay": Param(float, "L2 weight decay", 0.0, 1.0),
    "num_workers": Param(int, "DataLoader worker processes", 0, 64),
    "data_path": Param(str, "how batches are served: auto (by size), memory (tensors, GPU augmentation) or "
                            "stream (DataLoader workers)", choices=DATA_PATHS),
    "compile": Param(bool, "train torch.compile(model): pays off on long GPU runs, not for short ones"),
    "backbone": Param(str, "torchvision feature extractor",
                      choices=("resnet18", "resnet34", "resnet50", "densenet121", "densenet161", "inception_v3")),
    "weights": Param(str, "backbone initialisation: 'none', 'imagenet' or a path to a state dict"),
    "n_dr_classes": Param(int, "DR classes: 2 (referable) or 5 (ICDR grades)", choices=(2, 5)),
    "folds": Param(int, "cross-validation folds", 2, 20),
    "repeats": Param(int, "independent seeds per configuration (error bars)", 1, 50),
    "seed_workers": Param(int, "processes that train a table's seeds side by side (on a CPU, one core each); "
                               "1 = one seed after the other in the notebook's process", 1, 64),
    "lam": Param(float, "loss weight lambda: CANet Eq. 7 auxiliary heads; L-Net Eq. 2 segmentation term", 0.0, 1.0),
    "lambdas": Param(list, "lambda values of a sweep", 0.0, 1.0),
    "freeze_backbone": Param(bool, "train only the heads on feature maps of a frozen shared backbone, "
                                   "computed once (else every model trains end to end)"),
    "pretrain_images": Param(int, "synthetic images (disjoint from train/val/test) on which the shared "
                                  "backbone first learns image-level lesion presence; 0 = none", 0, 1_000_000),
    "pretrain_epochs": Param(int, "epochs of that lesion-presence pretraining", 0, 100_000),
    "output_stride": Param(int, "input size / last feature-map size of the backbone (16: a ResNet's last "
                                "stage keeps its resolution)", choices=(16, 32)),
    "domain": Param(str, "synthetic camera domain", choices=("cam_a", "cam_b", "cam_c", "low_quality")),
    "difficulty": Param(float, "synthetic lesion difficulty: 0 easy .. 1 hard (smaller, fainter); None for a real "
                               "dataset", 0.0, 1.0, nullable=True),
    "interactive": Param(bool, "build ipywidgets explorers (off in CI)"),
    "patience": Param(int, "early-stopping patience in epochs (validation split only)", 1, 10_000),
    "seg_epochs": Param(int, "epochs of the segmentation (L-Net) stage", 1, 100_000),
    "grade_epochs": Param(int, "epochs of the grading (SiAN / classifier) stage", 1, 100_000),
    "seg_image_size": Param(int, "input side of the segmentation network, in pixels", 75, 4096),
    "variants": Param(list, "L-Net variants to compare", choices=("32s", "16s", "8s", "4s", "2s")),
    "crop_size": Param(int, "side of the lesion-centred training crops and of the sliding test windows of "
                            "L-Net, in pixels (<= seg_image_size)", 32, 4096),
    "crops_per_epoch": Param(int, "lesion-centred training crops drawn per L-Net epoch (None: as many as "
                                  "training images)", 1, 10_000_000, nullable=True),
    "losses": Param(list, "segmentation losses to compare", choices=("wce", "focal", "dice", "dual")),
    "dice_per_lesion": Param(bool, "L-Net's Dice loss (Eq. 3) computed per lesion and averaged over lesions "
                                   "(False: the paper's Dice pooled over all lesions)"),
    "paper_schedule": Param(bool, "train with the paper's optimiser, lr-drop rule and augmentation "
                                  "(else a short CPU schedule)"),
    "run_ablation": Param(bool, "train the attention / fusion ablation (Table 7 of L-Net/SiAN)"),
    "lr_scale": Param(int, "super-resolution factor: the LR input is the HR image down-sampled by it "
                           "(DeepMT-DR: 4, the authors' scripts: 8)", choices=(2, 4, 8)),
    "seg_width": Param(int, "first width of DeepMT-DR's segmentation U-Net (paper: 64, i.e. 64-1024)", 2, 256),
    "grade_lr": Param(float, "learning rate of the grading stages (DeepMT-DR stage 2; lr: stage 1, joint_lr: stage 3)", 1e-8, 10.0),
    "joint_lr": Param(float, "DeepMT-DR: Adam learning rate of stage 3, the joint fine-tuning from the stage-2 model", 1e-8, 10.0),
    "class_weighted": Param(bool, "DeepMT-DR's grading cross-entropy weighted by inverse class frequency "
                                  "(the paper); False = unweighted"),
    "sr_epochs": Param(int, "epochs of super-resolution warm-up (MSE + TV alone) before DeepMT-DR's stage 1",
                       0, 100_000),
    "loss_weights": Param(dict, "overrides of DeepMT-DR's loss weights by name (see "
                                "fundus_lib.experiments.deepmt.LOSS_WEIGHTS); {} = the spec's weights"),
    "grading_backbone": Param(str, "CLPI's grading backbone: densenet121 (paper), densenet161, or densenet_small "
                                   "(growth 16, 2-4-6-4 dense layers: CPU profiles)",
                              choices=("densenet121", "densenet161", "densenet_small")),
    "generator_widths": Param(list, "widths of CLPI's lesion attention generator convs (Table II: "
                                    "[32, 64, 128, 256, 512, 1024, 1024, 1024])", 1, 8192),
    "lesion_dataset": Param(str, "dataset whose lesion masks give CLPI's patches when the grading data has none; "
                                 "None = the grading data's own masks", nullable=True,
                            choices=("idrid_segmentation", "ddr_segmentation")),
    "lesion_data_dir": Param(str, "folder of lesion_dataset's official download (None: FUNDUS_LESION_DATA_DIR)",
                             nullable=True),
    "patch_epochs": Param(int, "epochs of CLPI's patch pre-training of the lesion attention generator", 1, 100_000),
    "patches_per_class": Param(int, "lesion patches drawn per class and epoch (class-balanced pre-training)",
                               1, 1_000_000),
    "negatives_per_image": Param(int, "background patches cut from each No-DR image", 0, 10_000),
    "ablation_rows": Param(list, "CLPI ablation rows (Table VIII, Fig. 6) to train",
                           choices=("CLPI", "CLPI w/o end-to-end", "CLPI w/o shortcut", "CLPI-", "DenseNet")),
    "discard_fractions": Param(list, "shares of lesion annotations discarded before patch pre-training (Fig. 8)",
                               0.0, 0.99),
    "test_domains": Param(list, "synthetic camera domains the graders are also tested on (Table VI's shape)",
                          choices=("cam_a", "cam_b", "cam_c", "low_quality")),
    "width": Param(int, "channels of the o_O net's first block (ELLG's DR detection net; paper: 32)", 1, 512),
    "rounds": Param(list, "ELLG rounds after the baseline, in order: 'original' (original images) or "
                          "'combined' (original + generated images); paper: 4 alternating rounds",
                    choices=("original", "combined")),
    "round_epochs": Param(int, "epochs per ELLG round; the learning rate drops 10x after each third "
                               "(paper: 30)", 1, 100_000),
    "round_lr": Param(float, "learning rate at the start of each ELLG round (paper: 3e-5)", 1e-8, 10.0),
    "gate_t": Param(float, "gate threshold t of ELLG's Eq. 2, in the raw saliency map's units (paper: 1.00)",
                    -1e6, 1e6),
    "n_generated": Param(int, "lesion images generated per 'combined' ELLG round", 0, 1_000_000),
}


@dataclass(frozen=True)
class RunConfig:
    """The resolved parameters of one notebook run (attribute access: ``cfg.epochs``)."""

    notebook: str
    values: Mapping[str, Any]
    project_root: Path

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values")  # not there yet while unpickling (a worker process): no recursion
        if values is None or name not in values:
            raise AttributeError(f"parameter {name!r} is not declared by notebook {self.__dict__.get('notebook')!r}")
        return values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @property
    def is_synthetic(self) -> bool:
        """True when the run uses the synthetic benchmark (every number is then labelled synthetic)."""
        return self.values.get("dataset", "synthetic") == "synthetic"

    @property
    def data_label(self) -> str:
        """The data this run uses, as titles, headers and sentences name it: "synthetic benchmark", or
        the dataset followed by "(real)", e.g. "IDRiD (real)". Notebooks never type the data's name."""
        dataset = self.values.get("dataset", "synthetic")
        return DATASET_NAMES[dataset] if dataset == "synthetic" else f"{DATASET_NAMES[dataset]} (real)"

    @property
    def generated_dir(self) -> Path:
        """Where generated data (synthetic datasets, caches) lives: ``data/generated``."""
        return self.project_root / "data" / "generated"

    @property
    def run_dir(self) -> Path:
        """Checkpoints and artefacts of this notebook: ``output_dir`` or ``runs/<notebook>``."""
        given = self.values.get("output_dir")
        return Path(given) if given else self.project_root / "runs" / self.notebook

    def __repr__(self) -> str:
        width = max(len(k) for k in self.values) if self.values else 0
        lines = [f"RunConfig({self.notebook})"] + [f"  {k:<{width}} = {v!r}" for k, v in self.values.items()]
        return "\n".join(lines)


_ACTIVE: RunConfig | None = None


def active_config() -> RunConfig | None:
    """The configuration returned by the latest :func:`resolve` call in this process."""
    return _ACTIVE


def project_root() -> Path:
    """The project folder: ``$FUNDUS_HOME``, else the first parent of the working directory holding
    ``configs/`` and ``pyproject.toml``, else the folder above the installed package."""
    if os.environ.get("FUNDUS_HOME"):
        return Path(os.environ["FUNDUS_HOME"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "configs").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    return Path(__file__).resolve().parent.parent


def load_preset(notebook: str, profile: str, root: Path | None = None) -> dict[str, Any]:
    """Read ``configs/<notebook>/<profile>.yaml`` as a dict (raises ConfigError naming the file)."""
    path = (root or project_root()) / "configs" / notebook / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset file {path} for notebook {notebook!r}, profile {profile!r}")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of parameter: value, got {type(data).__name__}")
    return data


def literal_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The literal-valued, public, lower-case names of a namespace (a notebook's ``globals()``).

    Modules, functions, classes, IPython's own names and UPPER_CASE constants (e.g. an imported
    ``LESIONS``) are skipped, so calling ``resolve(globals(), ...)`` right after the parameters cell
    sees exactly the parameters (which are lower_case by convention).
    """
    return {
        name: value for name, value in namespace.items()
        if not name.startswith("_") and name not in _IPYTHON_NAMES and not name.isupper()
        and isinstance(value, _LITERAL_TYPES)
    }


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_env(name: str, text: str) -> Any:
    """The value of environment variable ``FUNDUS_<NAME>`` read as parameter ``name``'s declared type.

    Text stays text (``FUNDUS_DATA_DIR="/x #2"`` is the folder ``/x #2``); int, float and bool
    parameters parse their literal (``3``; ``1e-3`` or YAML's ``.nan``; ``true``/``false``/``yes``/``no``/``1``/``0``),
    lists a YAML/JSON list (``[0.0, 0.5]``); ``none`` or ``null`` leaves a nullable parameter unset.
    Raises :class:`ConfigError` naming the variable when the text is not of that type.
    """
    variable = f"FUNDUS_{name.upper()}"
    spec = PARAMETERS[name]
    if spec.nullable and text.strip().lower() in ("none", "null"):
        return None
    if spec.kind is str:
        return text
    stripped = text.strip()
    try:
        if spec.kind is int:
            return int(stripped)
        if spec.kind is float:
            try:
                return float(stripped)
            except ValueError:  # YAML spellings: ".nan", ".inf" (refused later as not finite)
                value = yaml.safe_load(stripped)
                if isinstance(value, float):
                    return value
                raise
        if spec.kind is bool:
            if stripped.lower() in _TRUE + _FALSE:
                return stripped.lower() in _TRUE
            raise ValueError
        value = yaml.safe_load(stripped)
        if not isinstance(value, spec.kind):
            raise ValueError
        return value
    except (ValueError, yaml.YAMLError):
        raise ConfigError(f"{variable}={text!r} cannot be read as {spec.kind.__name__}; expected {spec.describe()}") from None


def data_problems(values: Mapping[str, Any], origin: Mapping[str, str]) -> list[str]:
    """The one rule for the data a run uses (empty list when it holds).

    ``data_dir`` (a parameter or ``FUNDUS_DATA_DIR``) names a real dataset folder, so ``dataset``
    must say which dataset's layout it holds: a ``data_dir`` with ``dataset`` "synthetic" (or
    unset) is refused rather than silently ignored. A real ``dataset`` needs an existing
    ``data_dir``. ``origin`` says where each value came from, for the message.
    """
    if "dataset" not in values or "data_dir" not in values:
        return []
    dataset, data_dir = values["dataset"], values["data_dir"]
    real = [name for name in DATASETS if name != "synthetic"]
    if data_dir is not None and dataset in (None, "synthetic"):
        return [f"data_dir={data_dir!r} ({origin['data_dir']}) is a real dataset folder, but dataset is "
                f"{dataset!r} ({origin['dataset']}); set dataset to the layout it holds, one of {real} "
                "(see data/README.md), or unset data_dir to use the synthetic benchmark"]
    if dataset not in (None, "synthetic") and dataset in DATASETS:
        if data_dir is None:
            return [f"dataset={dataset!r} ({origin['dataset']}) needs data_dir, the folder of its official "
                    "download (see data/README.md): pass -p data_dir or set FUNDUS_DATA_DIR"]
        if isinstance(data_dir, str) and not Path(data_dir).expanduser().is_dir():
            return [f"data_dir={data_dir!r} ({origin['data_dir']}) is not a folder"]
    return []


def resolve(params: Mapping[str, Any], notebook: str, root: Path | None = None) -> RunConfig:
    """Validate a notebook's parameters and fill the ``None`` ones (see the module docstring).

    Raises :class:`ConfigError` listing every unknown name, bad type, value out of range or
    choice not allowed — all at once, so a papermill run fails with one readable message.
    """
    global _ACTIVE
    root = root or project_root()
    given = literal_parameters(params)
    declared = list(load_preset(notebook, "quick", root))
    if "profile" not in declared:
        declared.insert(0, "profile")
    problems: list[str] = []

    for name in given:
        if name not in declared:
            hint = difflib.get_close_matches(name, declared, n=1)
            problems.append(f"unknown parameter {name!r} for notebook {notebook!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else "")
                            + f"; declared: {declared}")
        elif name not in PARAMETERS:
            problems.append(f"parameter {name!r} is declared by {notebook!r} but missing from "
                            "fundus_lib.config.PARAMETERS (add its type and range there)")

    values: dict[str, Any] = {name: given.get(name) for name in declared}
    origin = {name: "parameter" for name in declared}
    for name in declared:
        env = os.environ.get(f"FUNDUS_{name.upper()}")
        if values[name] is None and env is not None and name in PARAMETERS:
            try:
                values[name] = parse_env(name, env)
                origin[name] = f"from FUNDUS_{name.upper()}"
            except ConfigError as error:
                problems.append(str(error))

    profile = values.get("profile")
    if profile in PRESET_PROFILES:
        preset = load_preset(notebook, profile, root)
        for name in declared:
            if values[name] is None:
                values[name] = preset.get(name)
                origin[name] = f"{profile} preset"
    for name in declared:
        spec = PARAMETERS.get(name)
        if spec is not None:
            if spec.kind is float and isinstance(values[name], int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
            problems.extend(spec.problems(name, values[name]))
    problems.extend(data_problems(values, {name: origin[name] if values[name] is not None else "not set"
                                           for name in declared}))

    if problems:
        raise ConfigError(f"invalid parameters for notebook {notebook!r}:\n  - " + "\n  - ".join(problems))
    _ACTIVE = RunConfig(notebook=notebook, values=values, project_root=root)
    return _ACTIVE
