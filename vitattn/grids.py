"""Labelled grids: tiles (photo, heads, fused map) with their labels and a title, in one picture."""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vitattn.errors import UsageError

GRID_TILE_SIDE = 256  #: :func:`labelled_grid`'s default tile size in pixels
TITLE_SEPARATOR = " · "  #: between a title's parts; the first part (the model) is the one shortened
PANORAMA_RATIO = 4  #: a tile is at most this many times as long as it is thick (more: squeezed, grid only)

_BACKGROUND = (255, 255, 255)
_TEXT = (26, 26, 26)
_MIN_FIRST_PART = 24  # characters of the title's first part kept before the facts wrap onto more lines


@dataclass(frozen=True)
class ColorScale:
    """The colour scale drawn under a grid's title: the colour table, from ``low`` (left) to ``high`` (right).

    Attributes:
        lut: (256, 3) uint8 colour table.
        low, high: the texts at the bar's ends (values, or ``min`` / ``max`` when each tile has its own).
        caption: what the scale means, e.g. ``one scale for all heads``.
    """

    lut: np.ndarray
    low: str
    high: str
    caption: str


def format_value(value: float) -> str:
    """An attention value in two significant digits: ``0.031``, ``0.0021``, ``1.2e-05``."""
    return f"{value:.2g}"


def value_range(low: float, high: float) -> str:
    """A tile's value range as shown under it: ``0.0021–0.031``."""
    return f"{format_value(low)}–{format_value(high)}"


def scale_labels(
    labels: Sequence[str],
    ranges: Sequence[tuple[float, float]],
    lut: np.ndarray,
    *,
    shared_from: int | None = None,
    shared_what: str = "heads",
) -> tuple[list[str], ColorScale]:
    """Tile labels that say what each tile's colours stand for, and the grid's colour scale.

    A near-uniform head stretched over its own range looks as strong as a focused one; its narrow range
    under it says otherwise.

    Args:
        labels: one per map tile (``head 0``...).
        ranges: each map's own (min, max), as :func:`vitattn.colors.map_ranges` gives them.
        lut: the colour table the maps are drawn with.
        shared_from: None: every map spans its own range (labels ``head 0 · 0.0021–0.031``, the bar
            ``min … max``). An index: the maps from there on share one scale, whose ends go on the bar;
            their labels give each map's peak (``head 0 · max 0.031``).
        shared_what: what shares the scale, for the bar's caption.
    """
    if shared_from is None:
        out = [f"{label} · {value_range(lo, hi)}" for label, (lo, hi) in zip(labels, ranges, strict=True)]
        return out, ColorScale(lut, "min", "max", "each map from its own min to its own max (values under it)")
    out = [
        f"{label} · max {format_value(hi)}" if i >= shared_from else f"{label} · {value_range(lo, hi)}"
        for i, (label, (lo, hi)) in enumerate(zip(labels, ranges, strict=True))
    ]
    common = ranges[shared_from:]
    low, high = min(lo for lo, _ in common), max(hi for _, hi in common)
    return out, ColorScale(lut, format_value(low), format_value(high), f"one colour scale for all {shared_what}")



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
    title: str | Sequence[str],
    columns: int | None = None,
    tile_side: int = GRID_TILE_SIDE,
    scale: ColorScale | None = None,
) -> Image.Image:
    """Lay out labelled pictures in a grid under a title, on a white background.

    Each picture is scaled (up or down, keeping its aspect ratio) to fit a tile_side square;
    all tiles share one box, as large as the largest scaled picture (so landscape photos make
    wide, short rows), with the picture centred across and resting on the box's bottom edge,
    and its label centred right underneath. A panorama is never thinner than ``tile_side /
    PANORAMA_RATIO``: beyond that ratio its tile is squeezed along its long side (in the grid only).
    Labels that do not fit are shortened with an ellipsis at the end.

    The title is made of parts (a string is split at :data:`TITLE_SEPARATOR`): model, block,
    method, query... When they do not fit on one line, the first part (the model name) is
    shortened in the middle, down to a few characters; if the others still do not fit, they wrap
    onto more lines. No part but the first is lost (a single part wider than the grid is shortened).

    Args:
        tiles: (label, picture) pairs in reading order, e.g. the photo, each head, the mean.
        title: The title's parts, or one string of parts joined by :data:`TITLE_SEPARATOR`.
        columns: Tiles per row; default about sqrt(len(tiles)), wider than tall (8 tiles: 4x2).
            More columns than tiles are reduced to the tile count.
        tile_side: Side of each tile's square in pixels (fonts and margins scale with it).
        scale: A colour scale to draw under the title (the colour bar and its end values).

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
    pictures = [_fit_tile(picture, tile_side) for _, picture in tiles]
    # Boxes as large as the largest scaled picture: landscape photos give wide, short rows.
    box_w = max(p.width for p in pictures)
    box_h = max(p.height for p in pictures)
    cell_w = box_w + pad
    cell_h = box_h + pad // 2 + label_h + pad

    width = pad + cols * cell_w
    parts = title.split(TITLE_SEPARATOR) if isinstance(title, str) else list(title)
    lines = title_lines(parts, title_size, width - 2 * pad)
    bar_h = label_h + pad if scale is not None else 0
    top0 = pad + len(lines) * title_h + pad + bar_h
    height = top0 + rows * cell_h
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    for i, line in enumerate(lines):
        _stamp_text(canvas, line, title_size, (pad, pad + i * title_h, width - pad), middle=True)
    if scale is not None:
        _draw_scale(canvas, scale, label_size, (pad, top0 - bar_h, width - pad, top0 - pad))

    for i, ((label, _), picture) in enumerate(zip(tiles, pictures, strict=True)):
        row, col = divmod(i, cols)
        box_x, box_y = pad + col * cell_w, top0 + row * cell_h
        # Centred across, sitting on the box's bottom edge so that each label is right under it.
        canvas.paste(picture, (box_x + (box_w - picture.width) // 2, box_y + box_h - picture.height))
        _stamp_text(canvas, label, label_size, (box_x, box_y + box_h + pad // 2, box_x + box_w), middle=False)
    return canvas


def _fit_tile(picture: Image.Image, tile_side: int) -> Image.Image:
    """A picture scaled to fit a ``tile_side`` square, no thinner than ``tile_side / PANORAMA_RATIO``."""
    picture = picture if picture.mode == "RGB" else picture.convert("RGB")
    scale = tile_side / max(picture.size)
    w, h = max(1, round(picture.width * scale)), max(1, round(picture.height * scale))
    thinnest = max(1, tile_side // PANORAMA_RATIO)
    w, h = (w, max(h, thinnest)) if w >= h else (max(w, thinnest), h)  # squeezed, not a sliver
    if (w, h) != picture.size:  # reducing_gap=1: integer reduce first, ~40 % faster
        picture = picture.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=1.0)
    return picture


def title_lines(parts: Sequence[str], size: int, width: int) -> list[str]:
    """A title's parts on as few lines as fit ``width`` px at font ``size``: the first part (the model name) is
    shortened in the middle first; when the others still do not fit, they wrap onto more lines under it."""
    parts = [_drawable(p, size) for p in parts if p]
    if not parts:
        return [""]
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    sep = TITLE_SEPARATOR
    ellipsis = _ellipsis(size)
    first, rest = parts[0], parts[1:]
    whole = sep.join(parts)
    if probe.textlength(whole, font=font) <= width:
        return [whole]
    room = width - probe.textlength(sep + sep.join(rest), font=font)
    short = _fit_text(probe, first, font, room, middle=True, ellipsis=ellipsis) if room > 0 else ""
    if rest and len(short) - len(ellipsis) >= min(_MIN_FIRST_PART, len(first) - 1):
        return [sep.join([short, *rest])]
    lines = [first]  # the facts wrap under the model name, which gets a line of its own (shortened to fit)
    for part in rest:
        joined = lines[-1] + sep + part
        if len(lines) > 1 and probe.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return [_fit_text(probe, line, font, width, middle=True, ellipsis=ellipsis) for line in lines]


def _draw_scale(canvas: Image.Image, scale: ColorScale, size: int, box: tuple[int, int, int, int]) -> None:
    """The caption on the left, then ``low``, the colour bar and ``high`` on the right, within ``box``."""
    left, top, right, bottom = box
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    low, high = _drawable(scale.low, size), _drawable(scale.high, size)
    gap = max(4, size // 2)
    high_w, low_w = probe.textlength(high, font=font), probe.textlength(low, font=font)
    bar_w = max(32, min(round((right - left) * 0.4), 512))
    bar_right = right - round(high_w) - gap
    bar_left = max(left, bar_right - bar_w)
    bar = Image.fromarray(np.ascontiguousarray(scale.lut)[None].repeat(max(1, bottom - top - 4), axis=0), "RGB")
    bar = bar.resize((max(1, bar_right - bar_left), bar.height), Image.Resampling.BILINEAR)  # 256 colours
    canvas.paste(bar, (bar_left, top + 2))
    ImageDraw.Draw(canvas).rectangle((bar_left - 1, top + 1, bar_left + bar.width, top + 2 + bar.height), outline=_TEXT)
    _stamp_text(canvas, high, size, (bar_right + gap, top, right), middle=False)
    low_left = bar_left - gap - round(low_w)
    _stamp_text(canvas, low, size, (low_left, top, bar_left - gap), middle=False)
    if low_left - gap > left:
        _stamp_text(canvas, scale.caption, size, (left, top, low_left - gap), middle=False, align="left")


_STAMP_MARGIN = 4  # pixels around a text's advance width, for glyphs that overhang it


def _stamp_text(
    canvas: Image.Image, text: str, size: int, span: tuple[int, int, int], *, middle: bool, align: str = "centre"
) -> None:
    """Draw one line of text centred (or left-aligned) in ``span`` = (left, top, right), shortened with an
    ellipsis to fit."""
    left, top, right = span
    stamp, advance = _text_stamp(text, size, right - left, middle)
    x = (left if align == "left" else left + round((right - left - advance) / 2)) - _STAMP_MARGIN
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
