"""Tests for the drawing modules: colour tables and scaling (colors), overlays, grids, image writes (fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitattn.colors import colorize, colormap_lut, scale_maps
from vitattn.errors import ExitCode, UsageError
from vitattn.grids import labelled_grid
from vitattn.imagefiles import save_image
from vitattn.options import RenderOptions
from vitattn.overlays import overlay, overlay_many

DEFAULT_CMAP = RenderOptions.cmap

GREY = (128, 128, 128)


def _pixel(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)[y, x]


def _lut_row(lut: np.ndarray, pixel: np.ndarray) -> int:
    """The row of ``lut`` nearest to an RGB pixel (which heat value a pixel shows)."""
    return int(np.abs(lut.astype(np.int16) - pixel).sum(axis=1).argmin())


def _gradient_photo(width: int, height: int) -> Image.Image:
    """A smooth, non-constant RGB photo: (H, W, 3) with three different ramps."""
    ys, xs = np.mgrid[0:height, 0:width]
    ramps = [xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + ys) * 200 // (width + height) + 40]
    rgb = np.stack(ramps, axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------- colour tables


@pytest.mark.subprocess
def test_import_is_light() -> None:
    code = (
        "import sys, vitattn.colors, vitattn.overlays, vitattn.grids, vitattn.imagefiles; "
        "assert not {'matplotlib', 'torch'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", [DEFAULT_CMAP, "viridis", "gray_r", "tab10"])
def test_lut_shape_dtype_and_ends_match_matplotlib(name: str) -> None:
    import matplotlib

    lut = colormap_lut(name)
    assert lut.shape == (256, 3)
    assert lut.dtype == np.uint8
    cmap = matplotlib.colormaps[name]
    for value, row in ((0.0, lut[0]), (1.0, lut[-1])):
        expected = np.rint(np.asarray(cmap(value)[:3]) * 255)
        np.testing.assert_array_equal(row, expected)
    assert colormap_lut(name) is lut  # cached
    assert not lut.flags.writeable  # so the cached table cannot be spoiled


def test_lut_gray_is_a_ramp() -> None:
    lut = colormap_lut("gray")
    np.testing.assert_array_equal(lut[:, 0], np.arange(256))
    np.testing.assert_array_equal(lut[:, 0], lut[:, 2])


def test_lut_name_differing_only_in_case() -> None:
    np.testing.assert_array_equal(colormap_lut("Viridis"), colormap_lut("viridis"))


def test_unknown_colormap_is_a_usage_error_naming_it_with_suggestions() -> None:
    with pytest.raises(UsageError) as info:
        colormap_lut("infernoo")
    message = str(info.value)
    assert "'infernoo'" in message
    assert "'inferno'" in message
    assert info.value.exit_code == ExitCode.USAGE


def test_unknown_colormap_without_close_names() -> None:
    with pytest.raises(UsageError, match="qqqzzz"):
        colormap_lut("qqqzzz")


def test_colorize() -> None:
    lut = colormap_lut("viridis")
    heat = np.array([[0.0, 1.0, 0.5], [np.nan, 2.0, -1.0]])
    rgb = colorize(heat, lut)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], lut[[0, 255, 128]])
    np.testing.assert_array_equal(rgb[1], lut[[0, 255, 0]])  # NaN -> 0, clipped above and below
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 2)), lut)


# ---------------------------------------------------------------------------- scaling

MAPS = np.array(
    [
        [[0.0, 1.0], [2.0, 4.0]],
        [[10.0, 10.0], [10.0, 10.0]],  # constant
        [[-1.0, 1.0], [1.0, -1.0]],
    ]
)


def test_scale_maps_per_head() -> None:
    out = scale_maps(MAPS, shared=False)
    assert out.dtype == np.float32 and out.shape == (3, 2, 2)
    expected = [[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_scale_maps_shared() -> None:
    out = scale_maps(MAPS, shared=True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (MAPS + 1.0) / 11.0, atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("shared", [False, True])
def test_scale_maps_constant_gives_zeros_never_nan(shared: bool) -> None:
    constant = np.full((2, 3, 3), 0.25, dtype=np.float32)
    out = scale_maps(constant, shared=shared)
    np.testing.assert_array_equal(out, np.zeros((2, 3, 3)))
    # float noise on a "constant" map is not stretched to the full colour range
    noisy = constant + np.float32(1e-9) * np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    assert not np.isnan(scale_maps(noisy, shared=shared)).any()
    np.testing.assert_array_equal(scale_maps(noisy, shared=shared), 0.0)


def test_scale_maps_non_finite_are_ignored_and_zero() -> None:
    maps = np.array([[[np.nan, 1.0], [3.0, np.inf]], [[np.nan, np.nan], [np.nan, np.nan]]])
    out = scale_maps(maps, shared=False)
    np.testing.assert_allclose(out, [[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])


def test_scale_maps_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError):
        scale_maps(np.zeros((4, 4)), shared=False)


# ---------------------------------------------------------------------------- overlay


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((800, 400), 512, (512, 256)),  # landscape
        ((300, 600), 512, (256, 512)),  # portrait
        ((333, 222), 0, (333, 222)),  # original size
        ((64, 32), 512, (64, 32)),  # max_side caps: small photos keep their size
        ((512, 100), 512, (512, 100)),
        ((1000, 1000), 100, (100, 100)),
    ],
)
def test_overlay_size(size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    photo = Image.new("RGB", size, GREY)
    out = overlay(photo, np.zeros((14, 14)), crop_box=(0, 0, *size), lut=colormap_lut("viridis"),
                  max_side=max_side)
    assert out.mode == "RGB"
    assert out.size == expected


def test_overlay_converts_non_rgb_photo() -> None:
    photo = Image.new("L", (50, 40), 100)
    out = overlay(photo, np.zeros((2, 2)), crop_box=(0, 0, 50, 40), lut=colormap_lut("gray"), max_side=0,
                  alpha=0.0, dim=0.0)
    assert out.mode == "RGB"
    assert tuple(_pixel(out, 10, 10)) == (100, 100, 100)


def test_overlay_hot_cell_lands_at_its_place() -> None:
    # 4x4 cells of 51 px: cell (row 1, col 2) has its centre at the centre of pixel (x=127, y=76).
    lut = colormap_lut("viridis")
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0
    photo = Image.new("RGB", (204, 204), GREY)
    out = overlay(photo, heat, crop_box=(0, 0, 204, 204), lut=lut, alpha=1.0, max_side=0, dim=0.0)
    np.testing.assert_array_equal(_pixel(out, 127, 76), lut[255])
    np.testing.assert_array_equal(_pixel(out, 76, 127), lut[0])  # transposed place is cold
    np.testing.assert_array_equal(_pixel(out, 10, 190), lut[0])
    # bilinear: pixel 152's centre is 25 px from the hot centre, 26 px from the next (cold) one
    assert abs(_lut_row(lut, _pixel(out, 152, 76)) - 255 * 26 / 51) <= 1
    assert abs(_lut_row(lut, _pixel(out, 127, 101)) - 255 * 26 / 51) <= 1  # and below it


def test_overlay_blends_with_alpha() -> None:
    lut = colormap_lut("viridis")
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0
    photo = Image.new("RGB", (204, 204), GREY)
    out = overlay(photo, heat, crop_box=(0, 0, 204, 204), lut=lut, alpha=0.6, max_side=0)
    # rounded to the nearest level (alpha 0.6 is 153/255 exactly), not truncated
    expected = 0.4 * np.array(GREY) + 0.6 * lut[255].astype(float)
    assert np.abs(_pixel(out, 127, 76) - expected).max() <= 0.5
    expected_cold = 0.4 * np.array(GREY) + 0.6 * lut[0].astype(float)
    assert np.abs(_pixel(out, 10, 190) - expected_cold).max() <= 0.5


def test_overlay_central_crop_of_wide_photo_dims_outside() -> None:
    lut = colormap_lut("viridis")
    photo = _gradient_photo(400, 200)
    heat = np.array([[0.0, 1.0], [0.0, 0.0]])  # top-right cell hot
    out = overlay(photo, heat, crop_box=(100, 0, 300, 200), lut=lut, alpha=1.0, max_side=0, dim=0.5)
    assert out.size == (400, 200)
    got = np.asarray(out, dtype=np.int16)  # (H, W, 3)
    orig = np.asarray(photo, dtype=np.float64)
    # outside the box: the photo, halved
    for cols in (slice(0, 100), slice(300, 400)):
        assert np.abs(got[:, cols] - orig[:, cols] * 0.5).max() <= 1
    assert np.abs(got[:, :100] - orig[:, :100]).max() > 50  # really dimmed, not untouched
    # inside: the heat map, top-right hot, bottom-left cold (cells of 100 px, centres at *.0)
    assert _lut_row(lut, got[50, 250]) >= 250
    np.testing.assert_array_equal(got[150, 150], lut[0])
    np.testing.assert_array_equal(got[50, 110], lut[0])  # left of cell 0's centre: held at its value
    assert abs(_lut_row(lut, got[50, 200]) - 128) <= 1  # halfway between the two centres


def test_overlay_central_crop_after_downscale() -> None:
    lut = colormap_lut("viridis")
    photo = _gradient_photo(400, 200)
    heat = np.array([[0.0, 1.0], [0.0, 0.0]])
    out = overlay(photo, heat, crop_box=(100, 0, 300, 200), lut=lut, alpha=1.0, max_side=200, dim=0.5)
    assert out.size == (200, 100)
    got = np.asarray(out, dtype=np.int16)
    assert _lut_row(lut, got[25, 125]) >= 245  # hot cell centre (125, 25) after halving
    np.testing.assert_array_equal(got[75, 75], lut[0])
    small = np.asarray(photo.resize((200, 100)), dtype=np.float64)
    assert np.abs(got[:, :49] - small[:, :49] * 0.5).max() <= 3  # left of the box: dimmed
    assert np.abs(got[:, 151:] - small[:, 151:] * 0.5).max() <= 3  # right of the box: dimmed


def test_overlay_alpha_zero_keeps_the_photo_in_the_box() -> None:
    lut = colormap_lut(DEFAULT_CMAP)
    photo = _gradient_photo(300, 150)
    heat = np.random.default_rng(0).random((14, 14))
    out = overlay(photo, heat, crop_box=(50, 0, 250, 150), lut=lut, alpha=0.0, max_side=0, dim=0.45)
    got, orig = np.asarray(out), np.asarray(photo)
    np.testing.assert_array_equal(got[:, 50:250], orig[:, 50:250])
    assert (got[:, :50] < orig[:, :50]).any() and (got[:, :50] <= orig[:, :50]).all()
    # resized: the box holds the resized photo
    out = overlay(photo, heat, crop_box=(50, 0, 250, 150), lut=lut, alpha=0.0, max_side=200, dim=0.45)
    small = np.asarray(photo.resize((200, 100)), dtype=np.int16)
    assert np.abs(np.asarray(out, dtype=np.int16)[:, 34:166] - small[:, 34:166]).max() <= 3


def test_overlay_box_past_the_edges_is_clipped() -> None:
    # the model's transform padded a 300x200 photo to a 300x300 square
    lut = colormap_lut("viridis")
    photo = _gradient_photo(300, 200)
    out = overlay(photo, np.zeros((3, 3)), crop_box=(0, -50, 300, 250), lut=lut, alpha=0.0, max_side=0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(photo))  # nothing dimmed
    heat = np.zeros((3, 3))
    heat[1, 1] = 1.0  # centre of the square = centre of the photo
    out = overlay(photo, heat, crop_box=(0, -50, 300, 250), lut=lut, alpha=1.0, max_side=0)
    assert _lut_row(lut, _pixel(out, 150, 100)) >= 250
    assert _lut_row(lut, _pixel(out, 150, 0)) <= 5  # row 0's centre is at y = 0
    assert _lut_row(lut, _pixel(out, 150, 199)) <= 5


def test_overlay_box_outside_the_photo_only_dims() -> None:
    photo = Image.new("RGB", (100, 100), (200, 100, 50))
    out = overlay(photo, np.ones((2, 2)), crop_box=(200, 0, 300, 100), lut=colormap_lut("viridis"),
                  max_side=0, dim=0.5)
    assert tuple(_pixel(out, 50, 50)) == (100, 50, 25)


@pytest.mark.parametrize(
    "crop_box", [(0.0, 0.0, 300.0, 150.0), (75.0, 0.0, 225.0, 150.0), (0.0, -75.0, 300.0, 225.0)]
)
def test_overlay_many_equals_overlay_per_map(crop_box: tuple[float, float, float, float]) -> None:
    lut = colormap_lut(DEFAULT_CMAP)
    photo = _gradient_photo(300, 150)
    before = np.asarray(photo).copy()
    heats = np.random.default_rng(1).random((3, 14, 14))
    many = overlay_many(photo, heats, crop_box=crop_box, lut=lut, max_side=200)
    assert len(many) == 3
    for heat, got in zip(heats, many, strict=True):
        single = overlay(photo, heat, crop_box=crop_box, lut=lut, max_side=200)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(single))
    assert len({id(im) for im in many}) == 3
    np.testing.assert_array_equal(np.asarray(photo), before)  # the photo is never modified


@pytest.mark.parametrize(
    ("size", "max_side", "crop_box"),
    [
        ((1, 1), 0, (0.0, 0.0, 1.0, 1.0)),  # one pixel, 14x14 cells in it
        ((17, 5), 4, (-30.0, -2.0, 40.0, 3.5)),  # box far past the edges, tiny output
        ((640, 480), 16, (600.0, 470.0, 641.0, 480.2)),  # box in a corner, a pixel or two
    ],
)
def test_overlay_degenerate_geometry(
    size: tuple[int, int], max_side: int, crop_box: tuple[float, float, float, float]
) -> None:
    heat = np.random.default_rng(2).random((14, 14))
    out = overlay(Image.new("RGB", size, GREY), heat, crop_box=crop_box, lut=colormap_lut("viridis"),
                  max_side=max_side)
    if max_side == 0:
        assert out.size == size
    else:
        assert max(out.size) == max_side


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"alpha": 1.5}, UsageError),
        ({"dim": -0.1}, UsageError),
        ({"max_side": -1}, UsageError),
        ({"crop_box": (10, 0, 10, 50)}, ValueError),
        ({"crop_box": (0, 0, float("nan"), 50)}, ValueError),
        ({"heat": np.zeros((2, 2, 2))}, ValueError),
        ({"lut": np.zeros((256, 3))}, ValueError),  # float, not uint8
    ],
)
def test_overlay_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception]) -> None:
    lut = colormap_lut("viridis")
    args: dict[str, object] = {"heat": np.zeros((2, 2)), "crop_box": (0, 0, 50, 50), "lut": lut}
    args.update(kwargs)
    with pytest.raises(error):
        overlay(Image.new("RGB", (50, 50)), **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- grid

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (255, 128, 0),
           (128, 0, 255)]


def _tiles(n: int, size: tuple[int, int] = (100, 100)) -> list[tuple[str, Image.Image]]:
    return [(f"head {i}", Image.new("RGB", size, COLOURS[i])) for i in range(n)]


def _count(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return int((np.asarray(image) == colour).all(axis=-1).sum())


def test_grid_contains_every_tile_at_full_tile_size() -> None:
    grid = labelled_grid(_tiles(8), title="t", tile_side=64)
    assert grid.mode == "RGB"
    for colour in COLOURS:
        assert _count(grid, colour) == 64 * 64


def test_grid_keeps_aspect_ratio() -> None:
    tiles = [
        ("wide", Image.new("RGB", (200, 100), COLOURS[0])),
        ("tall", Image.new("RGB", (50, 100), COLOURS[1])),
    ]
    grid = labelled_grid(tiles, title="t", tile_side=64)
    assert _count(grid, COLOURS[0]) == 64 * 32
    assert _count(grid, COLOURS[1]) == 32 * 64


def test_grid_grows_with_tiles_and_auto_layout_is_wide() -> None:
    sizes = [labelled_grid(_tiles(n), title="t", tile_side=64).size for n in (1, 2, 4, 8)]
    areas = [w * h for w, h in sizes]
    assert areas == sorted(areas) and len(set(areas)) == 4
    w8, h8 = sizes[3]
    w1, h1 = sizes[0]
    assert w8 >= 3.5 * w1  # 8 tiles: four columns...
    assert h8 < 2.5 * h1  # ...in two rows
    one_column = labelled_grid(_tiles(3), title="t", tile_side=64, columns=1)
    assert one_column.height > 2.5 * one_column.width


def test_grid_draws_title_and_labels_in_dark_text_on_white() -> None:
    tiles = _tiles(2)
    with_text = np.asarray(labelled_grid(tiles, title="ATTENTION", tile_side=96)).astype(np.int16)
    plain = np.asarray(labelled_grid([("", im) for _, im in tiles], title="", tile_side=96)).astype(np.int16)
    assert with_text.shape == plain.shape
    assert tuple(plain[0, 0]) == (255, 255, 255)
    dark = (with_text < 90).all(axis=-1)  # (H, W) dark text pixels
    assert not (plain < 90).all(axis=-1).any()
    tile_rows = np.nonzero(_count_rows(with_text, COLOURS[0]))[0]
    top, bottom = tile_rows.min(), tile_rows.max()
    assert dark[:top].sum() > 20  # the title, above the tiles
    assert dark[bottom + 1:].sum() > 20  # the labels, under them


def _count_rows(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (pixels == colour).all(axis=-1).sum(axis=1)


def test_grid_survives_awkward_text() -> None:
    long_title = "Café — 中文\tphoto " + "x" * 500 + ".jpg"
    tiles = [("é" * 200, Image.new("RGB", (30, 30), COLOURS[0]))]
    grid = labelled_grid(tiles, title=long_title, tile_side=32)
    assert grid.width < 100  # long text is shortened, it does not widen the picture


def test_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        labelled_grid([], title="t")
    with pytest.raises(UsageError):
        labelled_grid(_tiles(2), title="t", columns=0)


# ---------------------------------------------------------------------------- save


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("JPEG", "JPEG")]
)
def test_save_image_writes_requested_format_whatever_the_name(
    tmp_path: Path, fmt: str, pil_format: str
) -> None:
    image = _gradient_photo(64, 48)
    path = tmp_path / "x.png.tmp-1" if fmt != "png" else tmp_path / "x.jpg.tmp-1"
    save_image(image, path, format=fmt)
    with Image.open(path) as written:
        assert written.format == pil_format
        assert written.size == (64, 48)
        pixels = np.asarray(written.convert("RGB"), dtype=np.int16)
    if pil_format == "PNG":
        np.testing.assert_array_equal(pixels, np.asarray(image))
    else:
        assert np.abs(pixels - np.asarray(image, dtype=np.int16)).mean() < 6


def test_save_image_jpeg_of_rgba(tmp_path: Path) -> None:
    save_image(Image.new("RGBA", (8, 8), (1, 2, 3, 4)), str(tmp_path / "a.tmp-1"), format="jpg")
    with Image.open(tmp_path / "a.tmp-1") as written:
        assert written.format == "JPEG"


def test_save_image_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'bmp'"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "x", format="bmp")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (340, 512), (513, 2)])
def test_encode_png_round_trips_exactly(shape: tuple[int, int], tmp_path: Path) -> None:
    from vitattn.imagefiles import encode_png

    rng = np.random.default_rng(sum(shape))
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb[:, ::2] = 255  # wrap-around in the Sub filter: 255 - 0 and 0 - 255
    path = tmp_path / "x.png.tmp-1"
    path.write_bytes(encode_png(rgb))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
