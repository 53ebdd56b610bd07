"""vitattn: exact per-head attention heatmaps for Vision Transformers.

The public API, re-exported. Heavy libraries (torch, timm, matplotlib) load only when a function needs them.
"""

from vitattn._version import __version__ as __version__
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
from vitattn.maps import HeadFusion, Query, parse_query
from vitattn.models import DEFAULT_MODEL, LoadedModel, TokenLayout, describe, load_model, supported_models
from vitattn.pipeline import Outcome, RenderOptions, Runner, RunOptions
from vitattn.render import colormap_lut, labelled_grid, overlay, scale_maps

__all__ = [
    "DEFAULT_MODEL",
    "AttentionCapture",
    "BlockMaps",
    "CaptureError",
    "HeadFusion",
    "ImageAttention",
    "InputError",
    "InputItem",
    "LoadedImage",
    "LoadedModel",
    "ModelError",
    "Outcome",
    "OutputError",
    "Prediction",
    "Query",
    "RenderOptions",
    "RunOptions",
    "Runner",
    "Settings",
    "TokenLayout",
    "UnsupportedModelError",
    "UsageError",
    "VitattnError",
    "WeightsUnavailableError",
    "colormap_lut",
    "compute_attention",
    "describe",
    "iter_inputs",
    "labelled_grid",
    "load_image",
    "load_model",
    "overlay",
    "parse_query",
    "resolve_settings",
    "scale_maps",
    "supported_models",
]
