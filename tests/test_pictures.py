"""Pictures that explain themselves: colour scale and value ranges, titles that keep their facts, the query
patch marked, masks in the grid, panorama tiles, and --max-side that never enlarges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import vitattn.grids
from vitattn.cli import app
from vitattn.colors import colormap_lut, map_ranges
from vitattn.grids import ColorScale, format_value, labelled_grid, title_lines, value_range
from vitattn.overlays import QUERY_MARK, mark_patch

DEMO = ["-m", "demo", "--top-k", "0"]


def invoke(args: list[str]) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(app, ["heatmap", *args])
    return result.exit_code, result.stdout_bytes, result.stderr


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def grids(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each grid was made of: its tiles' labels and pictures, title and colour scale."""
    seen: list[dict[str, Any]] = []
    real = vitattn.grids.labelled_grid

    def spy(tiles: Any, **kwargs: Any) -> Image.Image:
        seen.append({"labels": [label for label, _ in tiles], "tiles": [p for _, p in tiles], **kwargs})
        return real(tiles, **kwargs)

    monkeypatch.setattr(vitattn.grids, "labelled_grid", spy)
    return seen


def cyan(picture: Image.Image) -> np.ndarray:
    return np.all(np.asarray(picture.convert("RGB")) == QUERY_MARK, axis=-1)  # (h, w) bool


def test_map_ranges_own_and_shared() -> None:
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.24, 0.25], [0.26, np.nan]]])
    assert map_ranges(maps, shared=False) == [(0.1, 0.4), (0.24, 0.26)]
    assert map_ranges(maps, shared=True) == [(0.1, 0.4), (0.1, 0.4)]


def test_tile_labels_show_each_maps_values_and_the_colour_scale(photo: Path, tmp_path: Path,
                                                                  grids: list[dict[str, Any]]) -> None:
    code, stdout, stderr = invoke([str(photo), "-o", str(tmp_path / "a"), *DEMO, "--npy", "--json"])
    assert code == 0, stderr
    heads = np.load(json.loads(stdout)["files"]["npy"])  # (4, 8, 8): the maps, as written
    [grid] = grids
    mean = heads.mean(axis=0)
    expected = [f"head {h} · {value_range(heads[h].min(), heads[h].max())}" for h in range(4)]
    expected.append(f"mean · {value_range(mean.min(), mean.max())}")
    assert grid["labels"] == ["photo", *expected]
    scale = grid["scale"]
    assert isinstance(scale, ColorScale) and (scale.low, scale.high) == ("min", "max")
    np.testing.assert_array_equal(scale.lut, colormap_lut("inferno"))
    # --shared-scale: one scale, its ends the smallest and largest value over all heads; each tile its peak
    code, _, stderr = invoke([str(photo), "-o", str(tmp_path / "b"), *DEMO, "--shared-scale"])
    assert code == 0, stderr
    shared = grids[1]
    assert (shared["scale"].low, shared["scale"].high) == (format_value(heads.min()), format_value(heads.max()))
    assert shared["labels"][1:] == [f"head {h} · max {format_value(heads[h].max())}" for h in range(4)] + [
        f"mean · max {format_value(mean.max())}"
    ]


def test_the_colour_bar_is_drawn_under_the_title() -> None:
    lut = colormap_lut("viridis")
    tiles = [("a", Image.new("RGB", (64, 64), (200, 200, 200)))] * 3
    plain = np.asarray(labelled_grid(tiles, title="t"))
    with_bar = np.asarray(labelled_grid(tiles, title="t", scale=ColorScale(lut, "0.001", "0.3", "one scale")))
    assert with_bar.shape[0] > plain.shape[0] and with_bar.shape[1] == plain.shape[1]
    # a row of the bar: the colour table from left to right (both ends within a few levels)
    rows = [r for r in with_bar if np.abs(r.astype(int) - lut[0]).sum(axis=1).min() <= 6
            and np.abs(r.astype(int) - lut[-1]).sum(axis=1).min() <= 6]
    assert rows, "no row holds both ends of the colour table"
    row = rows[len(rows) // 2].astype(int)
    first = int(np.abs(row - lut[0]).sum(axis=1).argmin())
    last = int(np.abs(row - lut[-1]).sum(axis=1).argmin())
    assert last - first > 30  # low on the left, high on the right


def test_titles_keep_every_fact_with_a_long_model_name() -> None:
    from vitattn.attention import ImageAttention, Prediction
    from vitattn.job import grid_title
    from vitattn.options import Method, Query

    long_name = "hf-hub:an-organisation-with-a-long-name/" + "vit_base_patch16_224_finetuned_on_something_" * 4
    att = ImageAttention(query=Query.parse("patch:3,4"), grid=(14, 14), blocks={}, top=[],
                         method=Method.grad_rollout, target=Prediction(281, "tabby cat", 0.42))
    title = grid_title(long_name, "pretrained", 11, att)
    facts = ["block 11", "grad-rollout of tabby cat", "query patch:3,4"]
    for width in (4 * 256, 3 * 256, 2 * 256):  # a grid has at least three tiles (photo and two maps)
        lines = title_lines(title.split(" · "), 23, width)
        text = " · ".join(lines)
        for fact in facts:
            assert fact in text, (width, lines)
        assert long_name not in text and ("…" in lines[0] or "..." in lines[0])  # the name is what gets shortened
        assert lines[0].startswith("hf-hub:an")  # ... keeping its start
    short = title_lines(["demo", "block 3", "query cls"], 23, 3 * 256)
    assert short == ["demo · block 3 · query cls"]  # what fits stays on one line, whole
    big = labelled_grid([("a", Image.new("RGB", (64, 64)))] * 2, title=title)
    one = labelled_grid([("a", Image.new("RGB", (64, 64)))] * 2, title="demo · block 3")
    assert big.height > one.height  # the facts wrapped onto more lines rather than being cut


def test_query_patch_is_marked_on_every_picture(photo: Path, tmp_path: Path, grids: list[dict[str, Any]]) -> None:
    args = [str(photo), "-o", str(tmp_path / "q"), *DEMO, "--query", "patch:2,5", "--threshold", "0.6", "--json"]
    code, stdout, stderr = invoke(args)
    assert code == 0, stderr
    files = json.loads(stdout)["files"]
    pictures = [*files["heads"], files["mean"], *files["masks"]["heads"], files["masks"]["mean"]]
    assert len(pictures) == 10
    for name in pictures:
        with Image.open(name) as im:
            marked = cyan(im)
        assert im.size == (64, 64)
        # 8x8 patches of a 64-px photo: patch (2, 5) spans x 40..47, y 16..23; the outline lies just outside it
        ys, xs = np.nonzero(marked)
        assert xs.min() == 40 - 2 and xs.max() == 47 + 2 and ys.min() == 16 - 2 and ys.max() == 23 + 2, name
        assert not marked[16:24, 40:48].any()  # the patch's own colours stay visible
    [grid] = grids
    assert all(cyan(tile).sum() > 20 for tile in grid["tiles"])  # photo, heads, mean and mask tiles
    # without a patch query nothing is marked
    code, stdout, stderr = invoke([str(photo), "-o", str(tmp_path / "c"), *DEMO, "--json"])
    assert code == 0, stderr
    with Image.open(json.loads(stdout)["files"]["grid"]) as im:
        assert not cyan(im).any()


def test_masks_are_in_the_grid_with_a_threshold(photo: Path, tmp_path: Path, grids: list[dict[str, Any]]) -> None:
    code, _, stderr = invoke([str(photo), "-o", str(tmp_path / "m"), *DEMO, "--threshold", "0.6"])
    assert code == 0, stderr
    code, _, stderr = invoke([str(photo), "-o", str(tmp_path / "r"), *DEMO, "--threshold", "0.5",
                              "--method", "rollout"])
    assert code == 0, stderr
    raw, rollout = grids
    assert raw["labels"][-5:] == [f"{m}: 60% of mass" for m in ("head 0", "head 1", "head 2", "head 3", "mean")]
    assert rollout["labels"][-1] == "rollout: 50% of mass" and len(rollout["labels"]) == 1 + 1 + 5 + 1


def test_panorama_tiles_are_not_slivers() -> None:
    panorama = Image.new("RGB", (4000, 40), (10, 200, 10))
    grid = labelled_grid([("photo", panorama), ("map", panorama)], title="t", tile_side=256)
    green = np.all(np.asarray(grid) == (10, 200, 10), axis=-1)
    rows = np.nonzero(green.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 256 // 4  # at least a quarter of the tile side thick
    tall = labelled_grid([("photo", panorama.transpose(Image.Transpose.ROTATE_90))] * 2, title="t")
    cols = np.nonzero(np.all(np.asarray(tall) == (10, 200, 10), axis=-1).any(axis=0))[0]
    assert len(cols) >= 2 * 64


def test_mark_patch_geometry_on_a_scaled_picture() -> None:
    picture = Image.new("RGB", (200, 100), (0, 0, 0))
    # the photo is 400x200 and the model saw its centre 200x200, as a 4x4 grid: patch (1, 2) = x 200..250
    mark_patch(picture, photo_size=(400, 200), crop_box=(100, 0, 300, 200), grid=(4, 4), cell=(1, 2), line=2)
    ys, xs = np.nonzero(cyan(picture))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (100 - 2, 125 - 1 + 2, 25 - 2, 50 - 1 + 2)
    with pytest.raises(ValueError, match="outside"):
        mark_patch(picture, photo_size=(400, 200), crop_box=(100, 0, 300, 200), grid=(4, 4), cell=(4, 0))


def test_max_side_never_enlarges_a_small_input(photo: Path, tmp_path: Path) -> None:
    for max_side, size in (("512", (64, 64)), ("32", (32, 32)), ("0", (64, 64))):
        code, stdout, stderr = invoke([str(photo), "-o", str(tmp_path / max_side), *DEMO, "--max-side", max_side,
                                       "--json", "--threshold", "0.5"])
        assert code == 0, stderr
        files = json.loads(stdout)["files"]
        for name in [*files["heads"], files["mean"], files["masks"]["mean"]]:
            with Image.open(name) as im:
                assert im.size == size, (max_side, name)
