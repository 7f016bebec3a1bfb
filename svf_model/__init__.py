"""SVF few-shot segmentation library: SVF layers, backbones, heads, adaptation, cues, data, training."""

from .backbones import Backbone, build_backbone, list_backbones, register_backbone
from .svf import (
    SVFConv2d,
    SVFLayer,
    SVFLinear,
    SVFStats,
    apply_svf,
    fold_svf,
    svf_layers,
    svf_parameters,
    svf_stats,
)

__all__ = [
    "Backbone",
    "SVFConv2d",
    "SVFLayer",
    "SVFLinear",
    "SVFStats",
    "apply_svf",
    "build_backbone",
    "fold_svf",
    "list_backbones",
    "register_backbone",
    "svf_layers",
    "svf_parameters",
    "svf_stats",
]

from .official import load_official, official_state_dict  # noqa: E402

__all__ += ["load_official", "official_state_dict"]

from .delta import load_svf_delta, save_svf_delta  # noqa: E402

__all__ += ["load_svf_delta", "save_svf_delta"]
