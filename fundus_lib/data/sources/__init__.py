"""Dataset sources: each reads one official on-disk layout and returns a manifest.

Every source is a function ``load_<name>(root, ...) -> pandas.DataFrame`` built with
:func:`fundus_lib.data.manifest.make_manifest`: absolute image paths, ``source`` set, the
official ``split`` where one exists, unique ``image_id``, ``patient_id`` where the dataset has
patients or exams, and lesion masks mapped onto the eight-lesion vocabulary. Each validates
what it reads and raises :class:`~fundus_lib.data.manifest.ManifestError` naming the missing
or malformed file, folder or column. ``data/README.md`` says where to get each dataset.

Use them through the registry::

    from fundus_lib.data.sources import load_source
    manifest = load_source("idrid_grading", "/data/IDRiD")

Loaders are imported on first use (by module path), so importing this package is cheap and a
source module that is missing only fails when it is asked for.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import pandas as pd

#: Registry: source name -> "module:function" of its loader.
SOURCES: dict[str, str] = {
    "synthetic": "fundus_lib.data.sources.synthetic:load_synthetic",
    "idrid_grading": "fundus_lib.data.sources.idrid:load_idrid_grading",
    "idrid_segmentation": "fundus_lib.data.sources.idrid:load_idrid_segmentation",
    "idrid_localisation": "fundus_lib.data.sources.idrid:load_idrid_localisation",
    "messidor": "fundus_lib.data.sources.messidor:load_messidor",
    "messidor2": "fundus_lib.data.sources.messidor2:load_messidor2",
    "aptos": "fundus_lib.data.sources.aptos:load_aptos",
    "eyepacs": "fundus_lib.data.sources.eyepacs:load_eyepacs",
    "ddr_grading": "fundus_lib.data.sources.ddr:load_ddr_grading",
    "ddr_segmentation": "fundus_lib.data.sources.ddr:load_ddr_segmentation",
    "retinal_lesions": "fundus_lib.data.sources.retinal_lesions:load_retinal_lesions",
}


def get_loader(name: str) -> Callable[..., pd.DataFrame]:
    """The loader function registered as ``name``; raise ValueError listing the valid names."""
    if name not in SOURCES:
        raise ValueError(f"unknown dataset source {name!r}; expected one of {sorted(SOURCES)}")
    module_name, function_name = SOURCES[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def load_source(name: str, root: str | Path, **kwargs) -> pd.DataFrame:
    """Build the manifest of source ``name`` from the dataset folder ``root``.

    ``kwargs`` go to the loader (e.g. ``splits=("train",)`` for IDRiD, ``check_images=False`` for
    EyePACS); see each ``load_<name>`` for its options.
    """
    return get_loader(name)(root, **kwargs)


__all__ = ["SOURCES", "get_loader", "load_source"]
