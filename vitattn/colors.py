"""Colour tables and scaling: attention maps -> colour indices -> RGB, through a matplotlib colormap.

matplotlib is used only to sample a colour table once per colormap name (:func:`colormap_lut`, cached); no
figure is ever made.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from vitattn.errors import UsageError
from vitattn.options import RenderOptions

#: A map whose range is at most this fraction of its magnitude is treated as constant (float noise).
_FLAT_RTOL = 1e-6




@functools.lru_cache(maxsize=32)
def colormap_lut(name: str) -> npt.NDArray[np.uint8]:
    """The colour table of a matplotlib colormap, sampled at 256 evenly spaced points.

    matplotlib is imported here (lazily) and only once per name: the result is cached and
    returned read-only.

    Args:
        name: A matplotlib colormap name, e.g. ``"inferno"`` or ``"viridis_r"``. Exact names are
            tried first; a name that differs only in case from exactly one colormap is accepted.

    Returns:
        The table, shape (256, 3), dtype uint8, RGB; row 0 is the colour of 0.0, row 255 of 1.0.

    Raises:
        UsageError: ``name`` is not a registered colormap (the message names it and suggests
            close names).
    """
    import matplotlib  # lazy: ~0.3 s to import, and only the table is needed

    registry = matplotlib.colormaps
    names = list(registry)
    if name not in registry:
        folded = [n for n in names if n.lower() == name.lower()]
        if len(folded) != 1:
            raise UsageError(_unknown_cmap_message(name, names), option="cmap")
        name = folded[0]
    rgba = registry[name](np.linspace(0.0, 1.0, 256))  # (256, 4) float in [0, 1]
    lut = np.rint(np.asarray(rgba, dtype=np.float64)[:, :3] * 255.0).astype(np.uint8)  # (256, 3)
    lut.setflags(write=False)
    return lut


def _unknown_cmap_message(name: str, names: Sequence[str]) -> str:
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    message = f"unknown colormap {name!r}"
    if close:
        message += "; did you mean " + ", ".join(repr(by_lower[c]) for c in close) + "?"
    else:
        message += f" (for example {RenderOptions.cmap!r}, 'viridis', 'magma', 'jet'; see matplotlib's colormaps)"
    return message


def check_lut(lut: np.ndarray) -> None:
    if lut.shape != (256, 3) or lut.dtype != np.uint8:
        raise ValueError(f"lut must be a (256, 3) uint8 array, got {lut.shape} {lut.dtype}")


def _heat_to_index(heat: np.ndarray) -> npt.NDArray[np.uint8]:
    """(h, w) float in [0, 1] -> (h, w) uint8 LUT rows; out-of-range values clip, NaN -> 0."""
    scaled = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    scaled = np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5  # (h, w)
    return scaled.astype(np.uint8)


def colorize(heat: np.ndarray, lut: np.ndarray) -> npt.NDArray[np.uint8]:
    """Map a heat map through a colour table.

    Args:
        heat: (h, w) float in [0, 1]; values outside are clipped, NaN counts as 0.
        lut: (256, 3) uint8 colour table, e.g. from :func:`colormap_lut`.

    Returns:
        (h, w, 3) uint8 RGB: ``lut[round(heat * 255)]``.

    Raises:
        ValueError: ``heat`` is not 2-D or ``lut`` is not (256, 3) uint8.
    """
    if np.ndim(heat) != 2:
        raise ValueError(f"heat must be 2-D (h, w), got shape {np.shape(heat)}")
    check_lut(lut)
    return np.take(lut, _heat_to_index(heat), axis=0)  # (h, w, 3)





def scale_maps(maps: np.ndarray, *, shared: bool) -> npt.NDArray[np.float32]:
    """Min-max scale attention maps to [0, 1].

    Args:
        maps: (K, gh, gw) float: one map per head (or per anything).
        shared: False: each map is stretched over its own min..max (every head uses the full
            colour range). True: one min..max over all K maps, so heads can be compared.

    Returns:
        (K, gh, gw) float32 in [0, 1]. A constant map (range at most 1e-6 of its magnitude, i.e.
        float noise; with ``shared``, all maps together) becomes zeros, never NaN. Non-finite
        entries are ignored for the min/max and come out as 0.

    Raises:
        ValueError: ``maps`` is not 3-D.
    """
    arr = np.asarray(maps, dtype=np.float64)  # (K, gh, gw)
    if arr.ndim != 3:
        raise ValueError(f"maps must be 3-D (K, gh, gw), got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)
    axes = None if shared else (1, 2)
    finite = np.isfinite(arr)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lo = np.min(np.where(finite, arr, np.inf), axis=axes, keepdims=True)  # (K|1, 1, 1)
        hi = np.max(np.where(finite, arr, -np.inf), axis=axes, keepdims=True)  # (K|1, 1, 1)
        span = hi - lo
        varies = span > _FLAT_RTOL * np.maximum(np.abs(lo), np.abs(hi))  # False for all-NaN maps too
        scaled = (np.where(finite, arr, 0.0) - lo) / np.where(varies, span, 1.0)  # (K, gh, gw)
        out = np.where(varies & finite, scaled, 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def map_ranges(maps: np.ndarray, *, shared: bool) -> list[tuple[float, float]]:
    """The (min, max) each map is drawn with by :func:`scale_maps`: its own, or (``shared``) one over all.

    Args:
        maps: (K, gh, gw) float; non-finite entries are ignored (an all-non-finite map gives (0, 0)).

    Returns:
        K (min, max) pairs, the values the colour table's two ends stand for.
    """
    arr = np.asarray(maps, dtype=np.float64)  # (K, gh, gw)
    if arr.ndim != 3:
        raise ValueError(f"maps must be 3-D (K, gh, gw), got shape {arr.shape}")
    finite = np.isfinite(arr)
    lows = [float(m[f].min()) if f.any() else 0.0 for m, f in zip(arr, finite, strict=True)]
    highs = [float(m[f].max()) if f.any() else 0.0 for m, f in zip(arr, finite, strict=True)]
    if shared and lows:
        return [(min(lows), max(highs))] * len(lows)
    return list(zip(lows, highs, strict=True))
