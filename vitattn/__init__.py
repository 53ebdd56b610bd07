"""vitattn: exact per-head attention heatmaps for Vision Transformers.

The public API, re-exported; everything else is internal. Names load on first use (PEP 562), so
``import vitattn`` and ``vitattn --help`` stay fast; torch, timm and matplotlib load only when a function
needs them.
"""

import importlib
from typing import TYPE_CHECKING, Any

from vitattn._version import __version__ as __version__

if TYPE_CHECKING:
    from vitattn.attention import BlockMaps, ImageAttention, Prediction
    from vitattn.capture import AttentionCapture
    from vitattn.colors import colormap_lut, scale_maps
    from vitattn.decoding import LoadedImage, load_image
    from vitattn.errors import (
        CaptureError,
        EngineError,
        InputError,
        ModelError,
        OutputError,
        UnsupportedModelError,
        UsageError,
        VitattnError,
        WeightsUnavailableError,
    )
    from vitattn.explainer import explain
    from vitattn.explorer import Explorer, explore
    from vitattn.grids import labelled_grid
    from vitattn.heatmap import HeatmapRun, start_heatmap
    from vitattn.job import Outcome
    from vitattn.maps import attention_rollout, grad_rollout, mass_mask
    from vitattn.models import LoadedModel, TokenLayout, describe, load_model, supported_models, wrap_model
    from vitattn.options import (
        DEFAULT_MODEL,
        AttentionOptions,
        Engine,
        HeadFusion,
        ImageFormat,
        InputOptions,
        Method,
        ModelOptions,
        Precision,
        Query,
        QueryKind,
        RenderOptions,
        RunOptions,
        StatsOptions,
    )
    from vitattn.overlays import mask_overlay, overlay
    from vitattn.statistics import StatsState
    from vitattn.stats_report import DatasetStats
    from vitattn.stats_run import dataset_stats, start_stats

_EXPORTS = {
    "AttentionCapture": "vitattn.capture",
    "AttentionOptions": "vitattn.options",
    "BlockMaps": "vitattn.attention",
    "CaptureError": "vitattn.errors",
    "DatasetStats": "vitattn.stats_report",
    "DEFAULT_MODEL": "vitattn.options",
    "Engine": "vitattn.options",
    "EngineError": "vitattn.errors",
    "HeadFusion": "vitattn.options",
    "HeatmapRun": "vitattn.heatmap",
    "ImageAttention": "vitattn.attention",
    "ImageFormat": "vitattn.options",
    "InputError": "vitattn.errors",
    "InputOptions": "vitattn.options",
    "LoadedImage": "vitattn.decoding",
    "LoadedModel": "vitattn.models",
    "Method": "vitattn.options",
    "ModelError": "vitattn.errors",
    "ModelOptions": "vitattn.options",
    "Outcome": "vitattn.job",
    "OutputError": "vitattn.errors",
    "Precision": "vitattn.options",
    "Prediction": "vitattn.attention",
    "Query": "vitattn.options",
    "QueryKind": "vitattn.options",
    "RenderOptions": "vitattn.options",
    "RunOptions": "vitattn.options",
    "StatsOptions": "vitattn.options",
    "StatsState": "vitattn.statistics",
    "TokenLayout": "vitattn.models",
    "UnsupportedModelError": "vitattn.errors",
    "UsageError": "vitattn.errors",
    "VitattnError": "vitattn.errors",
    "WeightsUnavailableError": "vitattn.errors",
    "attention_rollout": "vitattn.maps",
    "colormap_lut": "vitattn.colors",
    "dataset_stats": "vitattn.stats_run",
    "describe": "vitattn.models",
    "explain": "vitattn.explainer",
    "explore": "vitattn.explorer",
    "Explorer": "vitattn.explorer",
    "grad_rollout": "vitattn.maps",
    "labelled_grid": "vitattn.grids",
    "load_image": "vitattn.decoding",
    "load_model": "vitattn.models",
    "mask_overlay": "vitattn.overlays",
    "mass_mask": "vitattn.maps",
    "overlay": "vitattn.overlays",
    "scale_maps": "vitattn.colors",
    "start_heatmap": "vitattn.heatmap",
    "start_stats": "vitattn.stats_run",
    "supported_models": "vitattn.models",
    "wrap_model": "vitattn.models",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vitattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


__all__ = [
    "DEFAULT_MODEL",
    "AttentionCapture",
    "AttentionOptions",
    "BlockMaps",
    "CaptureError",
    "DatasetStats",
    "Engine",
    "EngineError",
    "Explorer",
    "HeadFusion",
    "HeatmapRun",
    "ImageAttention",
    "ImageFormat",
    "InputError",
    "InputOptions",
    "LoadedImage",
    "LoadedModel",
    "Method",
    "ModelError",
    "ModelOptions",
    "Outcome",
    "OutputError",
    "Precision",
    "Prediction",
    "Query",
    "QueryKind",
    "RenderOptions",
    "RunOptions",
    "StatsOptions",
    "StatsState",
    "TokenLayout",
    "UnsupportedModelError",
    "UsageError",
    "VitattnError",
    "WeightsUnavailableError",
    "attention_rollout",
    "colormap_lut",
    "dataset_stats",
    "describe",
    "explain",
    "explore",
    "grad_rollout",
    "labelled_grid",
    "load_image",
    "load_model",
    "mask_overlay",
    "mass_mask",
    "overlay",
    "scale_maps",
    "start_heatmap",
    "start_stats",
    "supported_models",
    "wrap_model",
]
