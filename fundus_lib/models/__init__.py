"""Model registry: build any model of the course by name.

``MODELS`` maps a name to ``"module:factory"``; :func:`build_model` imports the module only when
the model is built, so importing :mod:`fundus_lib.models` stays cheap. Every model's forward
returns a dict of named tensors (see each factory's docstring for its keys).
"""
from __future__ import annotations

import importlib

from torch import nn

MODELS: dict[str, str] = {
    # CANet (Li et al., TMI 2020) and its baselines
    "canet": "fundus_lib.models.canet:CANet",
    "individual": "fundus_lib.models.baselines:IndividualNet",
    "joint": "fundus_lib.models.baselines:JointNet",
    "joint_complex": "fundus_lib.models.baselines:joint_complex",
    "joint_complex_v2": "fundus_lib.models.baselines:joint_complex_v2",
    "multitask_chen": "fundus_lib.models.baselines:MultiTaskChen",
    "mtmr": "fundus_lib.models.baselines:MTMRNet",
    # L-Net / SiAN (Wei et al., ICPR 2020)
    "lnet": "fundus_lib.models.lnet:LNet",
    "sian": "fundus_lib.models.sian:SiAN",
    "lesion_concat": "fundus_lib.models.sian:LesionConcat",
    # ELLG (Lin et al., IJCAI-W 2020): the o_O DR detection net
    "o_o": "fundus_lib.models.o_o:OONet",
    # CLPI (Yang et al., IEEE T-Cyb 2022): the whole model and its lesion attention generator
    "clpi": "fundus_lib.models.clpi:CLPI",
    "clpi_generator": "fundus_lib.models.clpi:LesionAttentionGenerator",
    # DeepMT-DR (Wang et al., AAAI 2021): the hierarchy and its three networks
    "deepmt": "fundus_lib.models.deepmt:DeepMT",
    "deepmt_sr": "fundus_lib.models.deepmt:SRNet",
    "deepmt_seg": "fundus_lib.models.deepmt:MultiScaleUNet",
    "deepmt_grader": "fundus_lib.models.deepmt:SPPGrader",
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the model registered as ``name`` with ``kwargs`` (e.g. ``build_model("canet", n_dr=5)``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    module_name, factory_name = MODELS[name].split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(**kwargs)
