"""Deterministic synthetic pictures: one shape on a cluttered background, with its pixel box.

Every picture is a textured background (a smooth colour field, stripe layers, irregular blobs and pixel
noise, all in random colours) with exactly ONE object drawn on it: a circle, square, triangle or cross
(:data:`CLASS_NAMES`, the label) of random size, position, rotation and colour, with a thin dark outline.
Nothing in the background depends on the label, so a classifier has to look at the object.

The object's colour is drawn from one of :data:`COLOUR_NAMES` hue families (with jitter) independently
of its shape. That second label (``colour``) is an easier task that training uses as a warm-up.

Everything is reproducible: the same seed gives the same pixels, label and box. ``make_dataset(n, seed)``
draws its pictures from one generator seeded with ``seed``, so ``make_dataset(1, s)`` holds exactly the
picture ``make_picture(s)``.

Seed ranges (kept disjoint, so evaluation never sees training pictures):

* training batches: ``seed * TRAIN_SEED_STRIDE + batch_index`` (see :func:`train_batch_seed`),
  always below :data:`HELDOUT_SEED_BASE` (the function refuses seeds that would reach it);
* held-out evaluation: seeds from :data:`HELDOUT_SEED_BASE` upwards;
* the demo pictures in ``sample_images/synthetic/``: seeds from :data:`SAMPLE_SEED_BASE` upwards,
  written by ``python -m vitattn.demo.synthetic sample_images/synthetic``.

This module needs only numpy and Pillow (it never imports torch).
"""

from __future__ import annotations

import argparse
import colorsys
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from vitattn.demo import CLASS_NAMES  # the package defines the labels; this module draws them

__all__ = [
    "CLASS_NAMES",
    "COLOUR_NAMES",
    "DEFAULT_SIZE",
    "HELDOUT_SEED_BASE",
    "SAMPLE_SEED_BASE",
    "TRAIN_SEED_STRIDE",
    "SyntheticBatch",
    "SyntheticPicture",
    "make_dataset",
    "make_picture",
    "sample_seeds",
    "save_samples",
    "train_batch_seed",
]

COLOUR_NAMES: Final[tuple[str, ...]] = ("red", "lime", "cyan", "violet")
"""Hue families of the object's fill colour (the warm-up label), in class-index order."""

DEFAULT_SIZE: Final = 64
"""Side of a picture in pixels (the demo model's input size)."""

TRAIN_SEED_STRIDE: Final = 1_000_000
"""Training batch ``b`` of run seed ``s`` uses generator seed ``s * TRAIN_SEED_STRIDE + b``."""

HELDOUT_SEED_BASE: Final = 1_000_000_000
"""First seed of held-out evaluation pictures (never used by training)."""

SAMPLE_SEED_BASE: Final = 2_000_000_000
"""First seed of the demo pictures in ``sample_images/synthetic/``."""

# --- object geometry, as fractions of the picture side -------------------------------------------
_OBJECT_MIN_FRAC: Final = 0.34  # smallest object diameter (about 22 px at 64 px)
_OBJECT_MAX_FRAC: Final = 0.6  # largest object diameter (about 38 px at 64 px)
_MAX_ROTATION_DEG: Final = 0.0  # the object is rotated uniformly within +- this (upright: learns fastest)
_CROSS_ARM_HALF_WIDTH: Final = 0.32  # half-width of a cross arm, as a fraction of its radius
_OUTLINE_PX: Final = 2  # dark outline around the object, in pixels
_OUTLINE_MAX_VALUE: Final = 0.15  # the outline's brightness is uniform in [0, this]

# --- object colour: hue family with jitter, strong saturation and brightness ---------------------
_HUE_JITTER: Final = 0.04  # +- around the family's centre hue (hue is in [0, 1))
_OBJECT_SAT_RANGE: Final = (0.65, 1.0)
_OBJECT_VAL_RANGE: Final = (0.7, 1.0)

# --- background --------------------------------------------------------------------------------
_FIELD_GRID: Final = 4  # control points per side of the smooth base colour field
_BLOB_GRID: Final = 5  # control points per side of the noise a blob is thresholded from
_BLOB_COUNT_RANGE: Final = (1, 4)  # [low, high) number of blobs
_BLOB_THRESHOLD_RANGE: Final = (0.6, 1.2)  # threshold on unit-variance smooth noise
_STRIPE_COUNT_RANGE: Final = (1, 4)  # [low, high) number of stripe layers
_STRIPE_PERIOD_FRAC: Final = (0.06, 0.25)  # stripe period as a fraction of the side
_STRIPE_DUTY_RANGE: Final = (0.25, 0.6)  # fraction of each period that is painted
_LAYER_ALPHA_RANGE: Final = (0.3, 0.85)  # opacity of a stripe layer or a blob
_BACKGROUND_SAT_RANGE: Final = (0.15, 0.9)
_BACKGROUND_VAL_RANGE: Final = (0.2, 0.95)
_NOISE_SIGMA_RANGE: Final = (0.02, 0.07)  # std of per-pixel noise, in [0, 1] intensity units

_UINT8_MAX: Final = 255
_HUE_SECTORS: Final = 6  # the HSV colour wheel's six linear pieces
_UNIFORM_TO_UNIT_STD: Final = float(np.sqrt(12.0))  # a uniform [-0.5, 0.5) variable has std 1/sqrt(12)

Box = tuple[int, int, int, int]
"""``(left, top, right, bottom)`` in pixels; right and bottom exclusive, as for ``PIL.Image.crop``."""


@dataclass(frozen=True)
class SyntheticPicture:
    """One generated picture and its ground truth.

    Attributes:
        image: The RGB picture.
        label: Index into :data:`CLASS_NAMES` (the object's shape).
        box: ``(left, top, right, bottom)`` of the object's pixels (outline included), right and
            bottom exclusive, so ``image.crop(box)`` is the object's bounding box.
        colour: Index into :data:`COLOUR_NAMES` (the hue family of the object's fill).
        mask: ``(H, W)`` bool array, True exactly where the object (fill and outline) was drawn.
        fill: The object's fill colour as 8-bit RGB; every pixel of the object that is not
            outline has exactly this colour (the object is drawn without noise).
    """

    image: Image.Image
    label: int
    box: Box
    colour: int
    mask: npt.NDArray[np.bool_]
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class SyntheticBatch:
    """Many generated pictures as numpy arrays (see :func:`make_dataset`).

    Attributes:
        images: ``(N, H, W, 3)`` uint8 RGB pictures.
        labels: ``(N,)`` int64 shape labels (indices into :data:`CLASS_NAMES`).
        colours: ``(N,)`` int64 colour labels (indices into :data:`COLOUR_NAMES`).
        boxes: ``(N, 4)`` int64 object boxes ``(left, top, right, bottom)``, right/bottom exclusive.
        masks: ``(N, H, W)`` bool object masks.
        fills: ``(N, 3)`` uint8 fill colours of the objects.
    """

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    colours: npt.NDArray[np.int64]
    boxes: npt.NDArray[np.int64]
    masks: npt.NDArray[np.bool_]
    fills: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        """Number of pictures."""
        return int(self.labels.shape[0])

    def picture(self, index: int) -> SyntheticPicture:
        """Return picture ``index`` as a :class:`SyntheticPicture` (the same one ``make_picture`` gives)."""
        left, top, right, bottom = (int(v) for v in self.boxes[index])
        red, green, blue = (int(v) for v in self.fills[index])
        return SyntheticPicture(
            image=Image.fromarray(self.images[index], mode="RGB"),
            label=int(self.labels[index]),
            box=(left, top, right, bottom),
            colour=int(self.colours[index]),
            mask=self.masks[index].copy(),
            fill=(red, green, blue),
        )


def train_batch_seed(run_seed: int, batch_index: int) -> int:
    """Seed of training batch ``batch_index`` of a training run started with ``run_seed``.

    Args:
        run_seed: The ``--seed`` of the training run (``0 <= run_seed < 1000``).
        batch_index: Zero-based batch number (``< TRAIN_SEED_STRIDE``).

    Returns:
        A seed below :data:`HELDOUT_SEED_BASE`, so training never sees held-out pictures.

    Raises:
        ValueError: If the arguments would leave the training seed range.
    """
    if not 0 <= batch_index < TRAIN_SEED_STRIDE:
        raise ValueError(f"batch_index must be in [0, {TRAIN_SEED_STRIDE}), got {batch_index}")
    seed = run_seed * TRAIN_SEED_STRIDE + batch_index
    if not 0 <= seed < HELDOUT_SEED_BASE:
        raise ValueError(f"run_seed {run_seed} would reach the held-out seed range")
    return seed


def make_picture(rng_or_seed: np.random.Generator | int, size: int = DEFAULT_SIZE) -> SyntheticPicture:
    """Generate one picture.

    Args:
        rng_or_seed: A numpy generator (advanced in place) or an integer seed.
        size: Side of the square picture in pixels.

    Returns:
        The picture with its shape label, object box, colour label and object mask.
    """
    rng = np.random.default_rng(rng_or_seed) if isinstance(rng_or_seed, int) else rng_or_seed
    drawn = _render(rng, size)
    return SyntheticPicture(
        image=Image.fromarray(drawn.image, mode="RGB"),
        label=drawn.label,
        box=drawn.box,
        colour=drawn.colour,
        mask=drawn.mask,
        fill=drawn.fill,
    )


def make_dataset(n: int, seed: int, size: int = DEFAULT_SIZE) -> SyntheticBatch:
    """Generate ``n`` pictures from one generator seeded with ``seed``.

    Args:
        n: Number of pictures.
        seed: Generator seed; picture 0 equals ``make_picture(seed, size)``.
        size: Side of each square picture in pixels.

    Returns:
        The pictures and their labels, boxes and masks as numpy arrays.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=np.bool_)
    labels = np.empty(n, dtype=np.int64)
    colours = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    fills = np.empty((n, 3), dtype=np.uint8)
    for i in range(n):
        drawn = _render(rng, size)
        images[i], masks[i], labels[i], colours[i] = drawn.image, drawn.mask, drawn.label, drawn.colour
        boxes[i], fills[i] = drawn.box, drawn.fill
    return SyntheticBatch(images=images, labels=labels, colours=colours, boxes=boxes, masks=masks, fills=fills)


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Drawn:
    """What :func:`_render` produces for one picture (arrays, before any PIL wrapping)."""

    image: npt.NDArray[np.uint8]  # (H, W, 3)
    label: int
    colour: int
    mask: npt.NDArray[np.bool_]  # (H, W)
    box: Box
    fill: tuple[int, int, int]


def _render(rng: np.random.Generator, size: int) -> _Drawn:
    """Draw one picture with a random background and one random object."""
    canvas = _background(rng, size)  # (H, W, 3) float in [0, 1]

    label = int(rng.integers(len(CLASS_NAMES)))
    colour = int(rng.integers(len(COLOUR_NAMES)))
    hue = (colour / len(COLOUR_NAMES) + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    fill_rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*_OBJECT_SAT_RANGE), rng.uniform(*_OBJECT_VAL_RANGE))
    red, green, blue = (round(v * _UINT8_MAX) for v in fill_rgb)
    outline = round(rng.uniform(0.0, _OUTLINE_MAX_VALUE) * _UINT8_MAX)

    body = _shape_mask(rng, label, size)  # (H, W) bool: the filled shape
    mask = _dilate(body, _OUTLINE_PX)  # (H, W) bool: shape plus outline
    image = np.rint(np.clip(canvas, 0.0, 1.0) * _UINT8_MAX).astype(np.uint8)  # (H, W, 3)
    image[mask] = outline  # the object is drawn flat, without the background's noise
    image[body] = (red, green, blue)

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box: Box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return _Drawn(image=image, label=label, colour=colour, mask=mask, box=box, fill=(red, green, blue))


def _shape_mask(rng: np.random.Generator, label: int, size: int) -> npt.NDArray[np.bool_]:
    """Rasterise one filled shape of class ``label`` at a random place, scale and rotation."""
    diameter = rng.uniform(_OBJECT_MIN_FRAC, _OBJECT_MAX_FRAC) * size
    radius = diameter / 2.0
    margin = radius + _OUTLINE_PX + 1.0  # the outline must stay inside the picture too
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = np.deg2rad(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))

    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    name = CLASS_NAMES[label]
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        draw.polygon(_polygon(name, cx, cy, radius, angle), fill=1)
    return np.asarray(layer, dtype=np.bool_)


def _polygon(name: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle or cross inscribed in the circle ``(cx, cy, radius)``."""
    if name == "square":
        points = [(np.cos(a), np.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    elif name == "triangle":
        points = [(np.cos(a), np.sin(a)) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]  # apex up
    elif name == "cross":
        w = _CROSS_ARM_HALF_WIDTH
        arm_end = float(np.sqrt(1.0 - w * w))  # so the arm's outer corners touch the unit circle
        quarter = [(arm_end, -w), (arm_end, w), (w, w)]  # one arm and the inner corner after it
        points = []
        for k in range(4):  # the same quarter rotated by k * 90 degrees
            c, s = np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)
            points += [(x * c - y * s, x * s + y * c) for x, y in quarter]
    else:
        raise ValueError(f"unknown shape {name!r}")
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in points]


def _dilate(mask: npt.NDArray[np.bool_], pixels: int) -> npt.NDArray[np.bool_]:
    """Grow ``mask`` by ``pixels`` in the 8-neighbourhood sense."""
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[1:, 1:] |= out[:-1, :-1]
        grown[1:, :-1] |= out[:-1, 1:]
        grown[:-1, 1:] |= out[1:, :-1]
        grown[:-1, :-1] |= out[1:, 1:]
        out = grown
    return out


def _background(rng: np.random.Generator, size: int) -> npt.NDArray[np.float32]:
    """A cluttered background: smooth colour field, stripes, blobs and noise; ``(H, W, 3)`` in [0, 1]."""
    n_stripes = int(rng.integers(*_STRIPE_COUNT_RANGE))
    n_blobs = int(rng.integers(*_BLOB_COUNT_RANGE))
    n_field = _FIELD_GRID * _FIELD_GRID
    colours = _random_colours(rng, n_field + n_stripes + n_blobs)  # (C, 3)
    alphas = rng.uniform(*_LAYER_ALPHA_RANGE, size=n_stripes + n_blobs).astype(np.float32)  # (L,)

    field_interp = _interpolation_matrix(size, _FIELD_GRID)  # (H, G)
    control = colours[:n_field].reshape(_FIELD_GRID, _FIELD_GRID, 3).transpose(2, 0, 1)  # (3, G, G)
    canvas = (field_interp @ control @ field_interp.T).astype(np.float32)  # (3, H, W)

    # stripe layers: a square wave along a random direction, all layers computed at once
    theta = rng.uniform(0.0, np.pi, size=n_stripes)  # (S,)
    frequency = 1.0 / (rng.uniform(*_STRIPE_PERIOD_FRAC, size=n_stripes) * size)  # (S,) cycles per px
    phase0 = rng.uniform(size=n_stripes)  # (S,)
    duty = rng.uniform(*_STRIPE_DUTY_RANGE, size=n_stripes)  # (S,)
    yy, xx = _pixel_grid(size)  # (H, W) each
    step_x = (np.cos(theta) * frequency).astype(np.float32)[:, None, None]  # (S, 1, 1)
    step_y = (np.sin(theta) * frequency).astype(np.float32)[:, None, None]  # (S, 1, 1)
    phase = xx * step_x + yy * step_y + phase0.astype(np.float32)[:, None, None]  # (S, H, W)
    stripes = (phase - np.floor(phase)) < duty.astype(np.float32)[:, None, None]  # (S, H, W) bool

    # blobs: smooth random noise thresholded into irregular regions
    blob_interp = _interpolation_matrix(size, _BLOB_GRID)  # (H, B)
    noise = rng.standard_normal((n_blobs, _BLOB_GRID, _BLOB_GRID), dtype=np.float32)  # (K, B, B)
    smooth = blob_interp @ noise @ blob_interp.T  # (K, H, W)
    threshold = rng.uniform(*_BLOB_THRESHOLD_RANGE, size=n_blobs) * smooth.std(axis=(1, 2))  # (K,)
    blobs = smooth > threshold.astype(np.float32)[:, None, None]  # (K, H, W) bool

    layers = np.concatenate([stripes, blobs])  # (L, H, W) bool, painted in this order
    for layer, colour, alpha in zip(layers, colours[n_field:], alphas, strict=True):
        weight = layer.astype(np.float32) * alpha  # (H, W)
        canvas += weight * (colour[:, None, None] - canvas)  # (3, H, W)

    # pixel noise: uniform (cheaper to draw than Gaussian) with standard deviation sigma
    sigma = np.float32(rng.uniform(*_NOISE_SIGMA_RANGE))
    uniform = rng.random(canvas.shape, dtype=np.float32)  # (3, H, W) in [0, 1)
    canvas += (uniform - np.float32(0.5)) * (sigma * np.float32(_UNIFORM_TO_UNIT_STD))
    return canvas.transpose(1, 2, 0)  # (H, W, 3)


def _random_colours(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """``(n, 3)`` background colours: any hue, moderate saturation and brightness, RGB in [0, 1]."""
    hue = rng.uniform(size=n)  # (n,)
    sat = rng.uniform(*_BACKGROUND_SAT_RANGE, size=n)  # (n,)
    val = rng.uniform(*_BACKGROUND_VAL_RANGE, size=n)  # (n,)
    return _hsv_to_rgb(hue, sat, val)


def _hsv_to_rgb(
    hue: npt.NDArray[np.float64], sat: npt.NDArray[np.float64], val: npt.NDArray[np.float64]
) -> npt.NDArray[np.float32]:
    """Vectorised ``colorsys.hsv_to_rgb``: ``(n,)`` each, in [0, 1] -> ``(n, 3)`` RGB in [0, 1]."""
    sector = np.floor(hue * _HUE_SECTORS)  # (n,) which sixth of the colour wheel
    frac = hue * _HUE_SECTORS - sector  # (n,)
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    # (sector, n, 3): the RGB of each sector, then pick the row that applies to each colour
    table = np.stack(
        [
            np.stack([val, t, p], axis=-1),
            np.stack([q, val, p], axis=-1),
            np.stack([p, val, t], axis=-1),
            np.stack([p, q, val], axis=-1),
            np.stack([t, p, val], axis=-1),
            np.stack([val, p, q], axis=-1),
        ]
    )
    index = sector.astype(np.int64) % _HUE_SECTORS  # (n,)
    return table[index, np.arange(hue.shape[0])].astype(np.float32)  # (n, 3)


@functools.lru_cache(maxsize=16)
def _interpolation_matrix(size: int, grid: int) -> npt.NDArray[np.float32]:
    """``(size, grid)`` linear-interpolation weights from ``grid`` control points onto ``size`` pixels."""
    positions = np.linspace(0.0, grid - 1.0, size)  # (size,)
    lower = np.clip(np.floor(positions).astype(np.int64), 0, grid - 2)  # (size,)
    frac = positions - lower  # (size,)
    matrix = np.zeros((size, grid), dtype=np.float32)
    matrix[np.arange(size), lower] = 1.0 - frac
    matrix[np.arange(size), lower + 1] = frac
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=16)
def _pixel_grid(size: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Pixel-centre row and column coordinates, each ``(size, size)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


# ------------------------------------------------------------------------------------------------
# demo pictures: python -m vitattn.demo.synthetic OUT_DIR
# ------------------------------------------------------------------------------------------------

SAMPLE_COUNT: Final = 6
"""Number of demo pictures :func:`save_samples` writes by default."""

SAMPLE_SCALE: Final = 4
"""Demo pictures are drawn at :data:`DEFAULT_SIZE` and enlarged this many times (nearest neighbour)."""


def sample_seeds(count: int = SAMPLE_COUNT, size: int = DEFAULT_SIZE) -> list[int]:
    """Seeds of the demo pictures: from :data:`SAMPLE_SEED_BASE` on, first one picture of every class.

    Args:
        count: How many seeds (at least ``len(CLASS_NAMES)`` gives every shape once).
        size: Picture side the seeds are chosen for.

    Returns:
        ``count`` distinct seeds, in increasing order.
    """
    chosen: list[int] = []
    seen: set[int] = set()
    seed = SAMPLE_SEED_BASE
    while len(chosen) < count:
        label = make_picture(seed, size).label
        if label not in seen or len(seen) == len(CLASS_NAMES):
            chosen.append(seed)
            seen.add(label)
        seed += 1
    return chosen


def save_samples(out_dir: Path, count: int = SAMPLE_COUNT, scale: int = SAMPLE_SCALE) -> list[Path]:
    """Write the demo pictures as ``<seed>_<shape>.png``, enlarged ``scale`` times (nearest neighbour).

    Args:
        out_dir: Folder to write into (created if missing).
        count: Number of pictures.
        scale: Enlargement factor; the box printed for each picture is in enlarged pixels.

    Returns:
        The written files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in sample_seeds(count):
        picture = make_picture(seed)
        side = picture.image.width * scale
        path = out_dir / f"{seed}_{CLASS_NAMES[picture.label]}.png"
        picture.image.resize((side, side), Image.Resampling.NEAREST).save(path)
        box = tuple(v * scale for v in picture.box)
        print(f"{path.name}: seed {seed}, {CLASS_NAMES[picture.label]}, box {box} (left, top, right, bottom)")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the demo pictures into a folder."""
    parser = argparse.ArgumentParser(
        prog="python -m vitattn.demo.synthetic", description="Write the synthetic demo pictures."
    )
    parser.add_argument("out_dir", type=Path, help="folder for the PNG files")
    parser.add_argument("--count", type=int, default=SAMPLE_COUNT, help="number of pictures")
    parser.add_argument("--scale", type=int, default=SAMPLE_SCALE, help="nearest-neighbour enlargement")
    args = parser.parse_args(argv)
    save_samples(args.out_dir, args.count, args.scale)


if __name__ == "__main__":
    main()
