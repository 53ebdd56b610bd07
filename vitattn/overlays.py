"""Overlays: a map drawn over the photo, the model's crop box mapped onto it (PIL RGB end to end).

Values that come straight from a user option (``alpha``, ``dim``, ``max_side``) raise
:class:`~vitattn.errors.UsageError`; arrays or boxes of the wrong shape raise :class:`ValueError`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageChops, ImageFilter, ImageOps

from vitattn.colors import check_lut
from vitattn.errors import UsageError
from vitattn.options import RenderOptions


@functools.lru_cache(maxsize=8)
def _dim_table(dim: float) -> list[int]:
    """``Image.point`` table (3 x 256) multiplying every channel by 1 - dim."""
    return [round(v * (1.0 - dim)) for v in range(256)] * 3


def _output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The photo's size capped to ``max_side`` on its long side; never enlarged (0: no cap)."""
    if max_side == 0 or max(width, height) <= max_side:
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
    alpha: float = RenderOptions.alpha,
    max_side: int = RenderOptions.max_side,
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
    check_lut(lut)

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
    alpha: float = RenderOptions.alpha,
    max_side: int = RenderOptions.max_side,
    dim: float = 0.45,
) -> Image.Image:
    """Blend a heat map onto the part of a photo the model saw; dim the rest.

    A photo whose long side exceeds ``max_side`` is scaled down to it (bilinear, antialiased); smaller
    photos keep their size (``max_side`` caps, it never enlarges). The heat map is bilinearly upsampled onto
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
        A new PIL RGB image, size (W', H') with max(W', H') == min(max_side, max(W, H)) (or (W, H)).

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
    max_side: int = RenderOptions.max_side,
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


#: The query patch's outline: a colour no common colormap has, with a dark edge so it shows on light photos.
QUERY_MARK = (0, 255, 255)
_QUERY_EDGE = (0, 0, 0)


def mark_patch(
    picture: Image.Image,
    *,
    photo_size: tuple[int, int],
    crop_box: tuple[float, float, float, float],
    grid: tuple[int, int],
    cell: tuple[int, int],
    line: int = 0,
) -> Image.Image:
    """Outline one patch of the model's grid on a picture drawn from the photo (in place; returned).

    The picture may be the photo at another size (an overlay, a grid tile): the crop box, given in
    ``photo_size`` pixels, is scaled to it. The outline lies just outside the patch (``QUERY_MARK``, with a
    one-pixel dark edge inside and out), so the patch's own colours stay visible.

    Args:
        picture: RGB picture of the photo (any size); drawn on.
        photo_size: (width, height) of the photo ``crop_box`` refers to.
        crop_box: (left, top, right, bottom): the region the model's input covered, in photo pixels.
        grid: (rows, cols) of the patch grid over the crop box.
        cell: (row, col) of the patch to mark.
        line: outline width in pixels; 0 picks about 1/150 of the picture's long side (at least 2).

    Raises:
        ValueError: the cell is outside the grid, or the crop box is empty or not finite.
    """
    from PIL import ImageDraw

    _check_crop_box(crop_box)
    (gh, gw), (r, c) = grid, cell
    if not (0 <= r < gh and 0 <= c < gw):
        raise ValueError(f"cell {cell} is outside the {gh}x{gw} grid")
    sx, sy = picture.width / photo_size[0], picture.height / photo_size[1]
    left, top, right, bottom = crop_box
    cw, ch = (right - left) * sx / gw, (bottom - top) * sy / gh
    x0, y0 = left * sx + c * cw, top * sy + r * ch
    x1, y1 = x0 + cw, y0 + ch
    width = line or max(2, round(max(picture.size) / 150))
    draw = ImageDraw.Draw(picture)
    outer = (round(x0) - width - 1, round(y0) - width - 1, round(x1) + width, round(y1) + width)
    draw.rectangle(outer, outline=_QUERY_EDGE, width=width + 2)
    draw.rectangle((outer[0] + 1, outer[1] + 1, outer[2] - 1, outer[3] - 1), outline=QUERY_MARK, width=width)
    return picture
