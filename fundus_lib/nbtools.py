"""Notebook helpers: environment report, recorded results, source display.

``record(key, value)`` writes results into a JSON "metrics sidecar" of the executed notebook. The
runner (``make run``) and the notebook tests point ``FUNDUS_METRICS_PATH`` at the file beside the
executed notebook; interactively it goes to ``runs/<notebook>/metrics.json``. The tests read the
sidecar back: every recorded number must be finite and inside the bounds the notebook declared.

One sidecar holds one run: the first ``record()`` after a ``resolve()`` (a new run of the
notebook, in a fresh kernel or re-run from the top) starts the file afresh, later calls add to
it. Keys recorded by an earlier run, or by an earlier version of the notebook, never linger.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np

from fundus_lib.config import RunConfig, active_config, project_root
from fundus_lib.utils import atomic_write

#: Sidecar path -> the configuration whose run last wrote it in this process (see the docstring).
_RUN_OF_SIDECAR: dict[Path, RunConfig | None] = {}


def git_commit(root: Path | None = None) -> str:
    """The short git commit of the project ("unknown" outside a git checkout)."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root or project_root(),
                                capture_output=True, text=True, timeout=5, check=True)
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(cfg: RunConfig | None = None) -> dict[str, str]:
    """Versions, device and run facts as a dict (what :func:`print_env` prints)."""
    import torch
    import torchvision

    from fundus_lib.utils import choose_device

    cfg = cfg or active_config()
    device = choose_device(cfg.device if cfg is not None and "device" in cfg.values else "auto")
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "cpu threads": str(torch.get_num_threads()),
        "git commit": git_commit(),
    }
    if cfg is not None:
        facts["notebook"] = cfg.notebook
        facts["profile"] = str(cfg.values.get("profile"))
        data_dir = cfg.values.get("data_dir")
        facts["data"] = cfg.data_label + (f" from {data_dir}" if data_dir else "")
    return facts


def print_env(cfg: RunConfig | None = None) -> None:
    """Print one compact line per environment fact (versions, device, git commit, profile, and the data
    the run uses: "synthetic benchmark" or e.g. "IDRiD (real) from /datasets/IDRiD")."""
    facts = environment(cfg)
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key:<{width}} : {value}")


def metrics_path(cfg: RunConfig | None = None) -> Path:
    """Where :func:`record` writes: ``$FUNDUS_METRICS_PATH`` or ``runs/<notebook>/metrics.json``."""
    if os.environ.get("FUNDUS_METRICS_PATH"):
        return Path(os.environ["FUNDUS_METRICS_PATH"])
    cfg = cfg or active_config()
    if cfg is None:
        raise RuntimeError("record() needs a resolved configuration: call fundus_lib.config.resolve(...) first, "
                           "or set FUNDUS_METRICS_PATH")
    return cfg.project_root / "runs" / cfg.notebook / "metrics.json"


def _plain(value: Any) -> Any:
    """NumPy / torch scalars and arrays to JSON-ready Python values; reject what JSON cannot hold."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"record() stores numbers, strings, lists and dicts; got {type(value).__name__}")


def record(key: str, value: Any, *, bounds: tuple[float, float] | None = None, cfg: RunConfig | None = None) -> Any:
    """Store a result of this run in the metrics sidecar (atomically) and return the value.

    ``bounds=(low, high)`` declares the valid range of every number in ``value`` (e.g. ``(0, 1)``
    for an accuracy); the notebook tests check it, and that every number is finite.
    The sidecar also carries ``_meta``: notebook, profile, the data the run used (``data``: its
    :attr:`~fundus_lib.config.RunConfig.data_label`; ``data_dir``) and the parameters.
    The first call of a run (per :func:`~fundus_lib.config.resolve`) replaces the sidecar of an
    earlier run. A sidecar that cannot be written raises an :class:`OSError` naming it.
    """
    if not isinstance(key, str) or not key or key.startswith("_"):
        raise ValueError(f"record key must be a non-empty string not starting with '_', got {key!r}")
    cfg = cfg or active_config()
    path = metrics_path(cfg).resolve()
    same_run = path in _RUN_OF_SIDECAR and _RUN_OF_SIDECAR[path] is cfg
    data = json.loads(path.read_text()) if same_run and path.is_file() else {}
    if cfg is not None:
        data["_meta"] = {
            "notebook": cfg.notebook, "profile": cfg.values.get("profile"),
            "data": cfg.data_label, "data_dir": cfg.values.get("data_dir"),
            "parameters": _plain(cfg.as_dict()),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    data[key] = {"value": _plain(value), "bounds": list(bounds) if bounds is not None else None}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as stream:
            stream.write(json.dumps(data, indent=2, sort_keys=True))
    except OSError as error:
        raise OSError(error.errno, f"record() cannot write the metrics sidecar {path}: {error.strerror or error}; "
                                   "set FUNDUS_METRICS_PATH to a file in a writable folder") from error
    _RUN_OF_SIDECAR[path] = cfg
    return value


def numbers_in(value: Any) -> list[Number]:
    """Every number inside a recorded value (nested lists/dicts), for the sidecar checks."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return []


def check_sidecar(path: str | Path) -> list[str]:
    """Problems in a metrics sidecar: no results, non-finite numbers, numbers outside declared bounds."""
    path = Path(path)
    if not path.is_file():
        return [f"no metrics sidecar at {path}: the notebook recorded nothing"]
    data = json.loads(path.read_text())
    results = {k: v for k, v in data.items() if not k.startswith("_")}
    problems = [] if results else [f"{path} holds no recorded results"]
    for key, entry in results.items():
        numbers = numbers_in(entry["value"])
        if any(not math.isfinite(n) for n in numbers):
            problems.append(f"{key}: non-finite value {entry['value']}")
        if entry.get("bounds") is not None:
            low, high = entry["bounds"]
            outside = [n for n in numbers if math.isfinite(n) and not low <= n <= high]
            if outside:
                problems.append(f"{key}: {outside} outside the declared bounds [{low}, {high}]")
    return problems


def show_source(obj: Any):
    """Display the source code of a function or class with syntax highlighting (returns the display
    object, so it renders as a cell's result; its ``.data`` is the plain source)."""
    from IPython.display import Code

    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError) as error:
        raise TypeError(f"cannot show the source of {obj!r}: {error}") from error
    return Code(source, language="python")


__all__ = ["print_env", "environment", "record", "check_sidecar", "show_source", "metrics_path", "git_commit"]
