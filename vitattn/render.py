"""Turn attention maps into pictures: colour tables, overlays, labelled grids, fast image writes.

Everything here is PIL (RGB end to end) plus a little numpy; no torch, and matplotlib only to
sample a colour table once per colormap name (:func:`colormap_lut`, cached). No matplotlib figure
is ever made: a figure per head costs 150–200 ms per image, a LUT plus PIL resampling and
blending a few milliseconds for all heads.

Errors: values that reach these functions straight from a user option (colormap name, ``alpha``,
``dim``, ``max_side``, ``columns``, ``tile_side``, output format) raise
:class:`~vitattn.errors.UsageError`; arrays or boxes of the wrong shape are programming errors and
raise :class:`ValueError`.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import struct
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

from vitattn.errors import UsageError

__all__ = [
    "DEFAULT_CMAP",
    "GRID_TILE_SIDE",
    "IMAGE_FORMATS",
    "colorize",
    "colormap_lut",
    "labelled_grid",
    "mask_overlay",
    "overlay",
    "overlay_many",
    "save_image",
    "scale_maps",
]

DEFAULT_CMAP = "inferno"
GRID_TILE_SIDE = 256  #: :func:`labelled_grid`'s default tile size in pixels

#: Output formats :func:`save_image` writes, with the PIL format name and save options for each.
#: Chosen for speed: PNG level 1 (level 6 costs 3x as much for ~10 % smaller files) with the
#: run-length zlib strategy (faster still and 5–15 % smaller than the default strategy on
#: photos and overlays); WebP method 1 (within ~10 % of method 2's size, about 40 % faster).
IMAGE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {"compress_level": 1, "compress_type": zlib.Z_RLE}),
    "jpg": ("JPEG", {"quality": 90}),
    "webp": ("WEBP", {"quality": 85, "method": 1}),
}
_FORMAT_ALIASES = {"jpeg": "jpg"}

#: A map whose range is at most this fraction of its magnitude is treated as constant (float noise).
_FLAT_RTOL = 1e-6

_BACKGROUND = (255, 255, 255)
_TEXT = (26, 26, 26)


# --------------------------------------------------------------------------------------------
# Colour tables
# --------------------------------------------------------------------------------------------


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
            raise UsageError(_unknown_cmap_message(name, names))
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
        message += f" (for example {DEFAULT_CMAP!r}, 'viridis', 'magma', 'jet'; see matplotlib's colormaps)"
    return message


def _check_lut(lut: np.ndarray) -> None:
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
    _check_lut(lut)
    return np.take(lut, _heat_to_index(heat), axis=0)  # (h, w, 3)


# --------------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Overlay
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _dim_table(dim: float) -> list[int]:
    """``Image.point`` table (3 x 256) multiplying every channel by 1 - dim."""
    return [round(v * (1.0 - dim)) for v in range(256)] * 3


def _output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    if max_side == 0:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fit_photo(photo: Image.Image, max_side: int) -> Image.Image:
    """The photo in RGB with its long side ``max_side`` (0: as it is); may return ``photo``."""
    if photo.mode != "RGB":
        photo = photo.convert("RGB")
    size = _output_size(photo.width, photo.height, max_side)
    if size == photo.size:
        return photo
    if size[0] > photo.width or size[1] > photo.height:
        return photo.resize(size, Image.Resampling.BICUBIC)
    return photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)  # antialiased


def _span(lo: float, hi: float, n_out: int) -> tuple[int, int]:
    """Output pixels ``[a, b)`` whose centres p + 0.5 lie in ``[lo, hi)``, clipped to ``[0, n_out)``."""
    return max(0, math.ceil(lo - 0.5)), min(n_out, math.ceil(hi - 0.5))


@dataclass(frozen=True)
class _Placement:
    """Where a (gh, gw) grid lands on the fitted photo: the crop region and its grid coordinates.

    Attributes:
        fitted: the photo in RGB at the output size.
        base: ``fitted`` when the crop region does not cover all of it (the rest is to be dimmed), else None.
        region: ``fitted``'s pixels inside the crop box; None when the box misses the photo.
        origin: the region's top-left corner in ``fitted``.
        grid_box: the region in grid coordinates (cell j spans [j, j + 1]), as PIL's ``resize(box=...)``.
    """

    fitted: Image.Image
    base: Image.Image | None
    region: Image.Image | None
    origin: tuple[int, int]
    grid_box: tuple[float, float, float, float]


def _check_crop_box(crop_box: tuple[float, float, float, float]) -> None:
    left, top, right, bottom = (float(v) for v in crop_box)
    if not all(map(math.isfinite, (left, top, right, bottom))) or right <= left or bottom <= top:
        raise ValueError(
            f"crop_box must be finite (left, top, right, bottom) with right > left and bottom > top, "
            f"got {crop_box}"
        )


def _place(
    photo: Image.Image, crop_box: tuple[float, float, float, float], max_side: int, grid: tuple[int, ...]
) -> _Placement:
    """Fit the photo to ``max_side`` and find the crop box in output pixels and in grid coordinates."""
    left, top, right, bottom = (float(v) for v in crop_box)
    width, height = photo.size
    fitted = _fit_photo(photo, max_side)  # RGB (out_w, out_h); may be `photo` itself: never mutated
    out_w, out_h = fitted.size
    # The crop box in output pixels; a pixel is inside when its centre is.
    sx, sy = out_w / width, out_h / height
    bl, bt, br, bb = left * sx, top * sy, right * sx, bottom * sy
    (x0, x1), (y0, y1) = _span(bl, br, out_w), _span(bt, bb, out_h)
    full = (x0, y0, x1, y1) == (0, 0, out_w, out_h)
    if x1 <= x0 or y1 <= y0:
        return _Placement(fitted, fitted, None, (0, 0), (0.0, 0.0, 0.0, 0.0))
    gh, gw = grid
    kx, ky = gw / (br - bl), gh / (bb - bt)  # cells per output pixel
    grid_box = ((x0 - bl) * kx, (y0 - bt) * ky, (x1 - bl) * kx, (y1 - bt) * ky)
    region = fitted.crop((x0, y0, x1, y1))  # RGB (nx, ny)
    return _Placement(fitted, None if full else fitted, region, (x0, y0), grid_box)


def _heat_image(
    heat: npt.NDArray[np.float32],
    size: tuple[int, int],
    box: tuple[float, float, float, float],
    lut: np.ndarray,
) -> Image.Image:
    """The heat map, upsampled bilinearly and coloured, for one rectangle of output pixels.

    Args:
        heat: (gh, gw) float32 in [0, 1].
        size: (nx, ny): the rectangle's size in output pixels.
        box: Where the rectangle lies in the heat grid's own coordinates (cell j spans
            [j, j + 1]), as PIL's ``resize(box=...)`` takes it: (left, top, right, bottom).
        lut: (256, 3) uint8 colour table.

    Returns:
        PIL RGB image of ``size``.
    """
    # Quantise at grid resolution (<= 1 LUT step off), pad by one edge-replicated cell so that
    # pixels past the outer cell centres hold the edge value, and let PIL's C resampler
    # upsample in 8 bits: ~0.5 ms at 512 px where numpy float work takes 2-3 ms.
    gh, gw = heat.shape
    cells = np.empty((gh + 2, gw + 2), np.float32)  # edge padding by hand: np.pad costs ~45 us a call
    cells[1:-1, 1:-1] = heat
    cells[0, 1:-1], cells[-1, 1:-1] = heat[0], heat[-1]
    cells[:, 0], cells[:, -1] = cells[:, 1], cells[:, -2]
    cells = cells * 255.0 + 0.5  # (gh + 2, gw + 2)
    grid = Image.fromarray(cells.astype(np.uint8), "L")
    gw2, gh2 = grid.size
    left, top, right, bottom = box
    # +1 for the padding; the clamp only bites when cells are narrower than half a pixel.
    padded = (
        min(max(left + 1.0, 0.0), gw2),
        min(max(top + 1.0, 0.0), gh2),
        min(max(right + 1.0, 0.0), gw2),
        min(max(bottom + 1.0, 0.0), gh2),
    )
    index = grid.resize(size, Image.Resampling.BILINEAR, box=padded)  # "L" (nx, ny)
    index.putpalette(np.ascontiguousarray(lut).tobytes(), rawmode="RGB")  # now "P"
    return index.convert("RGB")


def overlay_many(
    photo: Image.Image,
    heats: np.ndarray,
    *,
    crop_box: tuple[float, float, float, float],
    lut: np.ndarray,
    alpha: float = 0.6,
    max_side: int = 512,
    dim: float = 0.45,
) -> list[Image.Image]:
    """:func:`overlay` for several heat maps of one photo, resizing and dimming the photo once.

    Equivalent to ``[overlay(photo, h, ...) for h in heats]``, but the photo is resized and
    dimmed once, not once per map (a 12-megapixel photo costs ~25 ms to resize).

    Args:
        photo: As for :func:`overlay`.
        heats: (K, gh, gw) float in [0, 1], e.g. every head and the mean.
        crop_box: As for :func:`overlay`.
        lut: As for :func:`overlay`.
        alpha: As for :func:`overlay`.
        max_side: As for :func:`overlay`.
        dim: As for :func:`overlay`.

    Returns:
        K new PIL RGB images, all of one size.

    Raises:
        UsageError: ``alpha`` or ``dim`` outside [0, 1], or ``max_side`` negative.
        ValueError: ``heats`` is not (K, gh, gw) with gh, gw > 0, ``crop_box`` is empty or not
            finite, or ``lut`` is not (256, 3) uint8.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha must be between 0 and 1, got {alpha}")
    if not 0.0 <= dim <= 1.0:
        raise UsageError(f"dim must be between 0 and 1, got {dim}")
    if max_side < 0:
        raise UsageError(f"max side must be 0 (original size) or a positive number of pixels, got {max_side}")
    heats = np.asarray(heats)
    if heats.ndim != 3 or heats.shape[1] == 0 or heats.shape[2] == 0:
        raise ValueError(f"heats must be (K, gh, gw) with gh, gw > 0, got shape {heats.shape}")
    _check_crop_box(crop_box)
    _check_lut(lut)

    place = _place(photo, crop_box, max_side, heats.shape[1:])
    base = None  # None: nothing to dim, each output is the blended region itself
    if place.base is not None:
        base = place.base.point(_dim_table(dim)) if dim > 0 else place.base
    if place.region is None:  # the box misses the photo: nothing to colour
        return [base.copy() if base is not None else place.fitted.copy() for _ in range(len(heats))]
    region, grid_box, (x0, y0) = place.region, place.grid_box, place.origin
    clean = np.nan_to_num(heats.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)  # (K, gh, gw)
    np.clip(clean, 0.0, 1.0, out=clean)

    # One canvas per photo: the dimmed photo with the crop region as it was. Each map is blended onto a copy
    # of it by a paste through a constant mask, which rounds to the nearest level (Image.blend truncates) and
    # releases the GIL (Image.blend holds it throughout). The mask holds round(alpha * 255): the weight is
    # within 0.002 of alpha, at most half a colour level.
    if base is None:
        canvas = region  # a crop: a new image of its own
    else:
        canvas = base if base is not place.fitted else base.copy()  # the dimmed base is already a new image
        canvas.paste(region, (x0, y0))
    mask = Image.new("L", region.size, round(alpha * 255)) if alpha > 0.0 else None
    outputs = []
    for k, heat in enumerate(clean):
        out = canvas if k == len(clean) - 1 else canvas.copy()  # the last map takes the canvas itself
        if mask is not None:
            out.paste(_heat_image(heat, region.size, grid_box, lut), (x0, y0), mask)
        outputs.append(out)
    return outputs


def overlay(
    photo: Image.Image,
    heat: np.ndarray,
    *,
    crop_box: tuple[float, float, float, float],
    lut: np.ndarray,
    alpha: float = 0.6,
    max_side: int = 512,
    dim: float = 0.45,
) -> Image.Image:
    """Blend a heat map onto the part of a photo the model saw; dim the rest.

    The photo is resized so that its long side is ``max_side`` -- small photos are scaled *up*
    too (bicubic), so every output has the same long side and tiny inputs stay visible; large ones
    are scaled down (bilinear, antialiased). The heat map is bilinearly upsampled onto
    ``crop_box`` (cell centres at the centres of the grid cells that tile the box, edge values
    held out to the box's borders), coloured through ``lut`` and alpha-blended there; pixels
    whose centres lie outside the box are multiplied by ``1 - dim``. A box reaching past the
    photo (the model's transform padded) is clipped to it. For several maps of one photo,
    :func:`overlay_many` resizes the photo only once.

    Args:
        photo: The upright original picture, size (W, H); converted to RGB if it is not.
            Never modified.
        heat: (gh, gw) float in [0, 1] (clipped; NaN counts as 0), row 0 at the top.
        crop_box: (left, top, right, bottom) in photo pixel coordinates (floats allowed): the
            region the model's input covered.
        lut: (256, 3) uint8 colour table from :func:`colormap_lut`.
        alpha: Weight of the heat colour in the crop region, 0 (photo only) .. 1 (heat only).
        max_side: Long side of the output in pixels; 0 keeps the photo's size.
        dim: How much to darken outside the crop region, 0 (not at all) .. 1 (black).

    Returns:
        A new PIL RGB image, size (W', H') with max(W', H') == max_side (or (W, H)).

    Raises:
        UsageError: ``alpha`` or ``dim`` outside [0, 1], or ``max_side`` negative.
        ValueError: ``heat`` is not a non-empty 2-D array, ``crop_box`` is empty or not finite,
            or ``lut`` is not (256, 3) uint8.
    """
    heat = np.asarray(heat)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a 2-D array (gh, gw), got shape {heat.shape}")
    return overlay_many(
        photo, heat[None], crop_box=crop_box, lut=lut, alpha=alpha, max_side=max_side, dim=dim
    )[0]


def mask_overlay(
    photo: Image.Image,
    mask: np.ndarray,
    *,
    crop_box: tuple[float, float, float, float],
    color: tuple[int, int, int] = (255, 215, 0),
    max_side: int = 512,
    dim: float = 0.45,
    shade: float = 0.6,
    line: int = 0,
) -> Image.Image:
    """Show a set of patches on the photo: the patches in full brightness, outlined, everything else shaded.

    The mask is drawn on the same geometry as :func:`overlay` (each cell covers its patch of the crop
    box, nearest-neighbour, so patch borders stay sharp); pixels outside the crop box are dimmed by
    ``dim``, pixels in the box but outside the mask by ``shade``, and the mask's outline is drawn in
    ``color``, inside its border.

    Args:
        photo: As for :func:`overlay`.
        mask: (gh, gw) bool, e.g. from :func:`vitattn.maps.mass_mask`.
        crop_box: As for :func:`overlay`.
        color: RGB of the outline.
        max_side: As for :func:`overlay`.
        dim: As for :func:`overlay`.
        shade: How much to darken the patches outside the mask, 0 .. 1.
        line: Outline width in pixels; 0 picks about 1/200 of the output's long side (at least 2).

    Returns:
        A new PIL RGB image, of the same size :func:`overlay` gives.

    Raises:
        UsageError: ``dim`` or ``shade`` outside [0, 1], ``max_side`` or ``line`` negative.
        ValueError: ``mask`` is not a non-empty 2-D array, or ``crop_box`` is empty or not finite.
    """
    for name, value in (("dim", dim), ("shade", shade)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{name} must be between 0 and 1, got {value}")
    if max_side < 0 or line < 0:
        raise UsageError(f"max side and line width must not be negative, got {max_side} and {line}")
    cells = np.asarray(mask, dtype=bool)
    if cells.ndim != 2 or cells.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array (gh, gw), got shape {cells.shape}")
    _check_crop_box(crop_box)

    place = _place(photo, crop_box, max_side, cells.shape)
    outside = max(dim, shade)  # outside the crop box is outside the mask too
    base = place.fitted.point(_dim_table(outside)) if outside > 0 and place.base is not None else place.fitted
    if place.region is None:  # the box misses the photo: nothing to show
        return base.copy()
    region = place.region
    nx, ny = region.size
    grid = Image.fromarray(cells.astype(np.uint8) * 255, "L")
    gh, gw = cells.shape
    left, top, right, bottom = place.grid_box
    clamped = (max(left, 0.0), max(top, 0.0), min(right, float(gw)), min(bottom, float(gh)))  # float noise
    inside = grid.resize((nx, ny), Image.Resampling.NEAREST, box=clamped)  # "L" 0 / 255
    shown = Image.composite(region, region.point(_dim_table(shade)), inside)  # RGB (nx, ny)
    width = line or max(2, round(max(place.fitted.size) / 200))
    # Outline: the mask minus its erosion; padding with "outside" outlines the region's own border too.
    padded = ImageOps.expand(inside, border=width, fill=0)
    eroded = padded.filter(ImageFilter.MinFilter(2 * width + 1)).crop((width, width, width + nx, width + ny))
    edge = ImageChops.subtract(inside, eroded)  # "L" 255 on the outline
    shown.paste(color, (0, 0, nx, ny), edge)
    out = base.copy()
    out.paste(shown, place.origin)
    return out


# --------------------------------------------------------------------------------------------
# Labelled grid
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's built-in font at ``size`` px (its fixed bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


# Stand-ins for common characters PIL's built-in font (Aileron, basic Latin) has no glyph for.
_SUBSTITUTES = {"—": "-", "–": "-", "‐": "-", "−": "-", "×": "x", "•": "·", "→": "->", "←": "<-"}


@functools.lru_cache(maxsize=4096)
def _has_glyph(size: int, char: str) -> bool:
    font = _font(size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # PIL's fallback bitmap font: Latin-1
        return ord(char) < 256
    if char.isspace():
        return True

    def signature(c: str) -> tuple[tuple[int, int], bytes]:
        mask = font.getmask(c)
        return mask.size, bytes(mask)

    return signature(char) != signature("\uffff")  # U+FFFF: never a glyph -> the "missing" box


def _drawable(text: str, size: int) -> str:
    """``text`` on one line, with characters the built-in font lacks replaced: typographic
    dashes etc. by ASCII look-alikes, accented letters by their base letter (é -> e), anything
    else by ``?`` (rather than an empty box)."""
    out = []
    for char in " ".join(text.split()):  # one line: newlines/tabs would break the layout
        if _has_glyph(size, char):
            out.append(char)
            continue
        plain = _SUBSTITUTES.get(char) or "".join(
            c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
        )
        out.append(plain if plain and all(_has_glyph(size, c) for c in plain) else "?")
    return "".join(out)


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return int(ascent + descent)
    return int(font.getbbox("Ag")[3])


def _ellipsis(size: int) -> str:
    return "…" if _has_glyph(size, "…") else "..."


def _fit_text(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    width: float,
    *,
    middle: bool,
    ellipsis: str,
) -> str:
    """``text`` shortened with ``ellipsis`` (at the end, or in the middle) to fit ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)  # binary search on the number of characters kept
    while lo < hi:
        keep = (lo + hi + 1) // 2
        if middle:
            head = (keep + 1) // 2
            candidate = text[:head] + ellipsis + text[len(text) - (keep - head):]
        else:
            candidate = text[:keep].rstrip() + ellipsis
        if draw.textlength(candidate, font=font) <= width:
            lo = keep
        else:
            hi = keep - 1
    if middle:
        head = (lo + 1) // 2
        return text[:head] + ellipsis + text[len(text) - (lo - head):]
    return text[:lo].rstrip() + ellipsis


def _auto_columns(n: int) -> int:
    """About sqrt(n) columns, at least as many columns as rows; one extra column when that
    leaves fewer empty cells (8 tiles: 4x2 rather than 3x3)."""
    base = math.ceil(math.sqrt(n))
    empty = [(math.ceil(n / c) * c - n, c) for c in (base, base + 1)]
    return min(empty)[1] if n > 1 else 1


def labelled_grid(
    tiles: Sequence[tuple[str, Image.Image]],
    *,
    title: str,
    columns: int | None = None,
    tile_side: int = GRID_TILE_SIDE,
) -> Image.Image:
    """Lay out labelled pictures in a grid under a title, on a white background.

    Each picture is scaled (up or down, keeping its aspect ratio) to fit a tile_side square;
    all tiles share one box, as large as the largest scaled picture (so landscape photos make
    wide, short rows), with the picture centred across and resting on the box's bottom edge,
    and its label centred right underneath. Text that does not fit is shortened with
    an ellipsis (labels at the end, the title in the middle, so a file name keeps its extension).

    Args:
        tiles: (label, picture) pairs in reading order, e.g. the photo, each head, the mean.
        title: One line across the top (e.g. the file name, model, block).
        columns: Tiles per row; default about sqrt(len(tiles)), wider than tall (8 tiles: 4x2).
            More columns than tiles are reduced to the tile count.
        tile_side: Side of each tile's square in pixels (fonts and margins scale with it).

    Returns:
        A new PIL RGB image.

    Raises:
        UsageError: ``columns`` < 1 or ``tile_side`` < 16.
        ValueError: ``tiles`` is empty.
    """
    if not tiles:
        raise ValueError("labelled_grid needs at least one tile")
    if columns is not None and columns < 1:
        raise UsageError(f"columns must be at least 1, got {columns}")
    if tile_side < 16:
        raise UsageError(f"tile side must be at least 16 pixels, got {tile_side}")
    n = len(tiles)
    cols = min(columns, n) if columns is not None else _auto_columns(n)
    rows = math.ceil(n / cols)

    label_size = max(10, round(tile_side / 14))  # 256 px -> 18 px text
    title_size = max(12, round(tile_side / 11))  # 256 px -> 23 px text
    label_font, title_font = _font(label_size), _font(title_size)
    pad = max(4, tile_side // 28)  # 256 -> 9
    label_h = _line_height(label_font)
    title_h = _line_height(title_font)
    pictures = []  # each scaled to fit a tile_side square
    for _, picture in tiles:
        picture = picture if picture.mode == "RGB" else picture.convert("RGB")
        scale = tile_side / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        if size != picture.size:  # reducing_gap=1: integer reduce first, ~40 % faster
            picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=1.0)
        pictures.append(picture)
    # Boxes as large as the largest scaled picture: landscape photos give wide, short rows.
    box_w = max(p.width for p in pictures)
    box_h = max(p.height for p in pictures)
    cell_w = box_w + pad
    cell_h = box_h + pad // 2 + label_h + pad

    width = pad + cols * cell_w
    height = pad + title_h + pad + rows * cell_h
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    _stamp_text(canvas, title, title_size, (pad, pad, width - pad), middle=True)

    top0 = pad + title_h + pad
    for i, ((label, _), picture) in enumerate(zip(tiles, pictures, strict=True)):
        row, col = divmod(i, cols)
        box_x, box_y = pad + col * cell_w, top0 + row * cell_h
        # Centred across, sitting on the box's bottom edge so that each label is right under it.
        canvas.paste(picture, (box_x + (box_w - picture.width) // 2, box_y + box_h - picture.height))
        _stamp_text(canvas, label, label_size, (box_x, box_y + box_h + pad // 2, box_x + box_w), middle=False)
    return canvas


_STAMP_MARGIN = 4  # pixels around a text's advance width, for glyphs that overhang it


def _stamp_text(canvas: Image.Image, text: str, size: int, span: tuple[int, int, int], *, middle: bool) -> None:
    """Draw one line of text centred in ``span`` = (left, top, right), shortened with an ellipsis to fit."""
    left, top, right = span
    stamp, advance = _text_stamp(text, size, right - left, middle)
    x = left + round((right - left - advance) / 2) - _STAMP_MARGIN
    canvas.paste(_TEXT, (x, top, x + stamp.width, top + stamp.height), stamp)


@functools.lru_cache(maxsize=256)
def _text_stamp(text: str, size: int, width: int, middle: bool) -> tuple[Image.Image, float]:
    """Text fitted to ``width`` px and drawn once as an "L" mask (255: ink), with its advance width.

    Every grid of a run repeats the same labels ("head 0", "mean", ...), and without predictions the same
    title: drawing each once and pasting it in the text colour saves about 3 ms of text layout and
    rendering per grid.
    """
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    text = _fit_text(probe, _drawable(text, size), font, width, middle=middle, ellipsis=_ellipsis(size))
    advance = probe.textlength(text, font=font)
    stamp = Image.new("L", (math.ceil(advance) + 2 * _STAMP_MARGIN, _line_height(font)), 0)
    ImageDraw.Draw(stamp).text((_STAMP_MARGIN, 0), text, fill=255, font=font)
    return stamp, advance


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_image(image: Image.Image, path: str | os.PathLike[str], *, format: str) -> None:
    """Write an image quickly in an explicit format, whatever the file name says.

    Args:
        image: The picture; converted to RGB for JPEG when it has another mode.
        path: Where to write (e.g. a temporary name like ``x.png.tmp-123``; the extension is
            not looked at).
        format: ``"png"`` (compress level 1), ``"jpg"`` (quality 90; ``"jpeg"`` also accepted)
            or ``"webp"`` (quality 85, method 1); case-insensitive.

    Raises:
        UsageError: ``format`` is not one of those.
        OSError: The write failed (PIL removes a partly written file it created).
    """
    key = format.lower()
    key = _FORMAT_ALIASES.get(key, key)
    if key not in IMAGE_FORMATS:
        raise UsageError(f"unknown image format {format!r}; choose from {', '.join(IMAGE_FORMATS)}")
    pil_format, options = IMAGE_FORMATS[key]
    if pil_format == "PNG" and image.mode == "RGB":
        data = encode_png(np.asarray(image))
        with open(path, "wb") as f:
            f.write(data)
        return
    if pil_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.save(os.fspath(path), format=pil_format, **options)


def _deflate() -> Callable[[bytes], bytes]:
    """The fastest deflate at hand: ISA-L (level 1) when installed, else zlib level 1."""
    try:
        from isal import isal_zlib

        return lambda data: isal_zlib.compress(data, 1)
    except ImportError:  # pragma: no cover - isal has wheels for the common platforms
        return lambda data: zlib.compress(data, 1)


_compress = _deflate()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(rgb: np.ndarray) -> bytes:
    """A standard 8-bit RGB PNG, written for speed.

    Pillow's encoder tries every row filter and uses zlib: about 16 ms for a 512-px overlay here. This one
    applies the PNG "Sub" filter to every row (one vectorised subtraction) and deflates with ISA-L: about
    3 ms, with files of about the same size. Any PNG reader decodes it (tests compare pixels with Pillow).

    Args:
        rgb: (h, w, 3) uint8.
    """
    h, w, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"encode_png needs (h, w, 3) uint8, got {rgb.shape} {rgb.dtype}")
    raw = np.ascontiguousarray(rgb).reshape(h, w * 3)  # (h, 3w)
    rows = np.empty((h, w * 3 + 1), dtype=np.uint8)  # (h, 1 + 3w): filter byte, then filtered bytes
    rows[:, 0] = 1  # filter type 1: Sub (each byte minus the same channel of the pixel to its left)
    rows[:, 1:4] = raw[:, :3]
    np.subtract(raw[:, 3:], raw[:, :-3], out=rows[:, 4:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", _compress(rows.tobytes())),
            _png_chunk(b"IEND", b""),
        )
    )
