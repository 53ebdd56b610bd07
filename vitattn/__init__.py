"""vitattn: exact per-head attention heatmaps for Vision Transformers.

The public API, re-exported. Names load on first use (PEP 562), so ``import vitattn`` and
``vitattn --help`` stay fast; torch, timm and matplotlib load only when a function needs them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from vitattn._version import __version__ as __version__

if TYPE_CHECKING:
    from vitattn.attention import (
        BlockMaps,
        ImageAttention,
        Prediction,
        Settings,
        compute_attention,
        resolve_settings,
    )
    from vitattn.capture import AttentionCapture
    from vitattn.errors import (
        CaptureError,
        InputError,
        ModelError,
        OutputError,
        UnsupportedModelError,
        UsageError,
        VitattnError,
        WeightsUnavailableError,
    )
    from vitattn.inputs import InputItem, LoadedImage, iter_inputs, load_image
    from vitattn.maps import HeadFusion, Query, attention_rollout, grad_rollout, mass_mask, parse_query
    from vitattn.methods import METHODS, GradRolloutReducer, Method, MethodReducer, RolloutReducer, parse_method
    from vitattn.models import DEFAULT_MODEL, LoadedModel, TokenLayout, describe, load_model, supported_models
    from vitattn.pipeline import Outcome, RenderOptions, Runner, RunOptions
    from vitattn.render import colormap_lut, labelled_grid, mask_overlay, overlay, scale_maps

_EXPORTS = {
    "AttentionCapture": "vitattn.capture",
    "BlockMaps": "vitattn.attention",
    "CaptureError": "vitattn.errors",
    "DEFAULT_MODEL": "vitattn.models",
    "GradRolloutReducer": "vitattn.methods",
    "HeadFusion": "vitattn.maps",
    "ImageAttention": "vitattn.attention",
    "InputError": "vitattn.errors",
    "InputItem": "vitattn.inputs",
    "LoadedImage": "vitattn.inputs",
    "LoadedModel": "vitattn.models",
    "METHODS": "vitattn.methods",
    "Method": "vitattn.methods",
    "MethodReducer": "vitattn.methods",
    "ModelError": "vitattn.errors",
    "Outcome": "vitattn.pipeline",
    "OutputError": "vitattn.errors",
    "Prediction": "vitattn.attention",
    "Query": "vitattn.maps",
    "RenderOptions": "vitattn.pipeline",
    "RolloutReducer": "vitattn.methods",
    "RunOptions": "vitattn.pipeline",
    "Runner": "vitattn.pipeline",
    "Settings": "vitattn.attention",
    "TokenLayout": "vitattn.models",
    "UnsupportedModelError": "vitattn.errors",
    "UsageError": "vitattn.errors",
    "VitattnError": "vitattn.errors",
    "WeightsUnavailableError": "vitattn.errors",
    "attention_rollout": "vitattn.maps",
    "colormap_lut": "vitattn.render",
    "compute_attention": "vitattn.attention",
    "describe": "vitattn.models",
    "grad_rollout": "vitattn.maps",
    "iter_inputs": "vitattn.inputs",
    "labelled_grid": "vitattn.render",
    "load_image": "vitattn.inputs",
    "load_model": "vitattn.models",
    "mask_overlay": "vitattn.render",
    "mass_mask": "vitattn.maps",
    "overlay": "vitattn.render",
    "parse_method": "vitattn.methods",
    "parse_query": "vitattn.maps",
    "resolve_settings": "vitattn.attention",
    "scale_maps": "vitattn.render",
    "supported_models": "vitattn.models",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vitattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "AttentionCapture",
    "BlockMaps",
    "CaptureError",
    "GradRolloutReducer",
    "HeadFusion",
    "ImageAttention",
    "InputError",
    "InputItem",
    "LoadedImage",
    "LoadedModel",
    "Method",
    "MethodReducer",
    "ModelError",
    "Outcome",
    "OutputError",
    "Prediction",
    "Query",
    "RenderOptions",
    "RolloutReducer",
    "RunOptions",
    "Runner",
    "Settings",
    "TokenLayout",
    "UnsupportedModelError",
    "UsageError",
    "VitattnError",
    "WeightsUnavailableError",
    "attention_rollout",
    "colormap_lut",
    "compute_attention",
    "describe",
    "grad_rollout",
    "iter_inputs",
    "labelled_grid",
    "load_image",
    "load_model",
    "mask_overlay",
    "mass_mask",
    "overlay",
    "parse_method",
    "parse_query",
    "resolve_settings",
    "scale_maps",
    "supported_models",
]
