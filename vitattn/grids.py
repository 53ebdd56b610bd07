"""Labelled grids: tiles (photo, heads, fused map) with their labels and a title, in one picture."""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from vitattn.errors import UsageError

GRID_TILE_SIDE = 256  #: :func:`labelled_grid`'s default tile size in pixels

_BACKGROUND = (255, 255, 255)
_TEXT = (26, 26, 26)




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
