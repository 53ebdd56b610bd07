"""The explorer page in a real browser (headless Chromium from file://), checked against the heatmap run's own
``.npy`` arrays and colour table: two families (a distilled model; a register model with a non-square grid),
the readout and canvas pixels under the cursor, keyboard, head, method and patch queries; size budgets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.browser import browser, open_file  # noqa: F401  (browser is a fixture)
from tests.conftest import FAMILIES as FAMILY_TABLE
from tests.conftest import tiny_model
from vitattn import AttentionOptions, InputOptions, Method, Query, RenderOptions, start_heatmap
from vitattn.colors import colormap_lut
from vitattn.explorer import add_pages, build_page, page_arrays
from vitattn.models import LoadedModel, wrap_model
from vitattn.options import DEFAULT_EXPLORE_BUDGET

pytestmark = pytest.mark.slow


def register_model() -> LoadedModel:
    """A random-init timm ViT with a class token, two registers and a 6×10 grid (96×160 input)."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_small_patch16_224", pretrained=False, depth=3, embed_dim=48, num_heads=3, reg_tokens=2,
        img_size=(96, 160), num_classes=10,
    ).eval()
    m.pretrained_cfg = {**m.pretrained_cfg, "input_size": (3, 96, 160)}  # the data config follows the model
    return wrap_model(m, spec="vit-reg2-96x160")


FAMILIES = {
    "distilled": lambda: tiny_model("deit_tiny_distilled_patch16_224"),  # cls + dist, 14×14, 3 blocks
    "registers": register_model,  # cls + reg0 + reg1, 6×10
}


def picture(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1)
    noise = rng.integers(0, 60, (h, w, 3))
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def run_heatmap(loaded: LoadedModel, image: Path, out: Path, **attention: Any) -> dict[str, Any]:
    """A heatmap run with --npy and the explorer pages; returns the one input's JSON record."""
    run = start_heatmap(
        inputs=InputOptions([str(image)]),
        model=loaded,
        attention=AttentionOptions(blocks=None, **attention),
        render=RenderOptions(out=out, npy=True),
    )
    outcomes = list(add_pages(run))
    assert [o.status for o in outcomes] == ["ok"], [o.record for o in outcomes]
    assert outcomes[0].folder is not None and Path(outcomes[0].record["files"]["explore"]).parent == outcomes[0].folder
    return outcomes[0].record


def npy_of(record: dict[str, Any], block: int) -> np.ndarray:
    entry = next(b for b in record["blocks"] if b["block"] == block)
    return np.load(entry["files"]["npy"])


def page_data(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="vitattn-data">(.*?)</script>', text, re.S)
    assert m
    return json.loads(m.group(1))  # type: ignore[no-any-return]


def canvas_pixels(page: Any) -> np.ndarray:
    """The main canvas's pixels (h, w, 3), read back losslessly as a PNG."""
    import base64
    import io

    url = page.evaluate("() => document.getElementById('view').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def cell_centre(data: dict[str, Any], r: int, c: int) -> tuple[int, int]:
    """The canvas pixel nearest to patch (r, c)'s centre, from the crop box written in the page."""
    bl, bt, br, bb = data["crop_box"]
    gh, gw = data["grid"]
    x = bl + (c + 0.5) * (br - bl) / gw
    y = bt + (r + 0.5) * (bb - bt) / gh
    return int(x), int(y)  # the pixel whose span holds the centre


def hover(page: Any, data: dict[str, Any], r: int, c: int) -> dict[str, str]:
    x, y = cell_centre(data, r, c)
    box = page.locator("#view").bounding_box()
    scale = box["width"] / data["photo_size"][0]
    page.mouse.move(box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale)
    page.wait_for_function(f"() => document.getElementById('readout').dataset.row === '{r}'"
                           f" && document.getElementById('readout').dataset.col === '{c}'")
    page.evaluate("() => new Promise(requestAnimationFrame)")
    return page.evaluate("() => ({...document.getElementById('readout').dataset,"
                         " text: document.getElementById('readout').textContent})")  # type: ignore[no-any-return]


def expected_index(values: np.ndarray, data: dict[str, Any], x: int, y: int) -> float:
    """The colour-table row at canvas pixel (x, y), written out: min-max scaling over the map, rows
    round(s * 255), bilinear between cell centres with edges held (as the PNG overlays)."""
    gh, gw = values.shape
    lo, hi = float(values.min()), float(values.max())
    idx = np.floor((values - lo) / (hi - lo) * 255 + 0.5)  # (gh, gw)
    bl, bt, br, bb = data["crop_box"]
    u = np.clip((x + 0.5 - bl) * gw / (br - bl) - 0.5, 0, gw - 1)
    v = np.clip((y + 0.5 - bt) * gh / (bb - bt) - 0.5, 0, gh - 1)
    j0, i0 = int(u), int(v)
    j1, i1 = min(j0 + 1, gw - 1), min(i0 + 1, gh - 1)
    fu, fv = u - j0, v - i0
    top = idx[i0, j0] * (1 - fu) + idx[i0, j1] * fu
    bot = idx[i1, j0] * (1 - fu) + idx[i1, j1] * fu
    return float(top * (1 - fv) + bot * fv)


def assert_colour(pixel: np.ndarray, lut: np.ndarray, index: float) -> None:
    """The pixel is the table's colour at the expected row, within one row (quantised values)."""
    rows = [k for k in range(int(index) - 1, int(index) + 3) if 0 <= k < 256]
    assert any(np.array_equal(pixel, lut[k]) for k in rows), (pixel, index, [lut[k] for k in rows])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One family's three runs on one picture: raw (cls), rollout, and raw with a patch query."""
    loaded = FAMILIES[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    image = picture(root / "photo one.png", (300, 220), seed=1)  # a space in the name: file:// URL quoting
    raw = run_heatmap(loaded, image, root / "raw")
    rollout = run_heatmap(loaded, image, root / "rollout", method=Method.rollout)
    gh, gw = raw["grid"]
    patch = (gh // 2, gw // 3)
    by_patch = run_heatmap(loaded, image, root / "patch", query=Query.parse(f"patch:{patch[0]},{patch[1]}"))
    return {"name": request.param, "loaded": loaded, "raw": raw, "rollout": rollout, "by_patch": by_patch,
            "patch": patch}


def test_page_agrees_with_the_npy_arrays(browser: Any, family: dict[str, Any]) -> None:  # noqa: F811
    path = Path(family["rollout"]["files"]["explore"])
    data = page_data(path)
    loaded: LoadedModel = family["loaded"]
    last = loaded.depth - 1
    assert data["roles"] == list(loaded.layout.roles) and data["grid"] == family["raw"]["grid"]
    assert data["patch_blocks"][0] == last  # the last block first
    opened = open_file(browser, path)
    page = opened.page
    lut = colormap_lut("inferno")
    page.locator("#alpha").fill("1")  # heat only: canvas pixels are colour-table entries
    page.select_option("#head", "0")
    heads = npy_of(family["raw"], last)  # (H, gh, gw): the cls query's raw attention, from the heatmap run
    assert page.locator("#block-label").inner_text().startswith(str(last))

    # the readout under the cursor, at the map's peak and at its lowest patch
    peak = np.unravel_index(int(heads[0].argmax()), heads[0].shape)
    low = np.unravel_index(int(heads[0].argmin()), heads[0].shape)
    pixels = None
    for r, c in (peak, low):
        got = hover(page, data, int(r), int(c))
        bound = float(got["bound"])
        assert 0 < bound <= heads[0].max() / 131070 + 1e-9  # 16-bit prefix rows
        assert abs(float(got["value"]) - heads[0][r, c]) <= bound + 1e-7
        assert f"row {r}, col {c}" in got["text"]
        shown = float(re.search(r"value ([0-9.e+-]+)", got["text"]).group(1))  # type: ignore[union-attr]
        assert abs(shown - heads[0][r, c]) <= bound + 1e-6 * max(1.0, abs(shown))
        pixels = canvas_pixels(page)
        x, y = cell_centre(data, int(r), int(c))
        assert_colour(pixels[y, x], lut, expected_index(heads[0], data, x, y))
    assert pixels is not None and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # the picture is drawn

    # keyboard: the block before; the canvas shows that block's head 0
    page.locator("#view").click(position={"x": 1, "y": 1})  # focus on the page (outside the crop box)
    before = canvas_pixels(page)
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"() => document.getElementById('block-label').textContent.startsWith('{last - 1}')")
    page.evaluate("() => new Promise(requestAnimationFrame)")
    after = canvas_pixels(page)
    assert not np.array_equal(before, after)
    prev = npy_of(family["raw"], last - 1)[0]
    r, c = np.unravel_index(int(prev.argmax()), prev.shape)
    x, y = cell_centre(data, int(r), int(c))
    assert_colour(after[y, x], lut, expected_index(prev, data, x, y))
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => document.getElementById('block-label').textContent.startsWith('{last}')")

    # another head changes the canvas, and shows that head
    page.select_option("#head", "1")
    page.evaluate("() => new Promise(requestAnimationFrame)")
    head1 = canvas_pixels(page)
    assert not np.array_equal(head1, before)
    r, c = np.unravel_index(int(heads[1].argmax()), heads[1].shape)
    got = hover(page, data, int(r), int(c))
    assert abs(float(got["value"]) - heads[1][r, c]) <= float(got["bound"]) + 1e-7

    # rollout: the method's map from the rollout run's arrays (float32, exact)
    page.select_option("#method", "rollout")
    page.evaluate("() => new Promise(requestAnimationFrame)")
    rolled = canvas_pixels(page)
    assert not np.array_equal(rolled, head1)
    method_map = npy_of(family["rollout"], last)  # (gh, gw)
    r, c = np.unravel_index(int(method_map.argmax()), method_map.shape)
    got = hover(page, data, int(r), int(c))
    assert float(got["value"]) == pytest.approx(float(method_map[r, c]), rel=1e-6)
    rolled = canvas_pixels(page)
    x, y = cell_centre(data, int(r), int(c))
    assert_colour(rolled[y, x], lut, expected_index(method_map, data, x, y))
    opened.check_clean()
    page.close()


def test_patch_query_hover_and_pin(browser: Any, family: dict[str, Any]) -> None:  # noqa: F811
    """A patch as the query: hovering previews its row, a click pins it; the values are those of a heatmap
    run with ``--query patch:R,C`` (8-bit rows, within the bound the page states)."""
    path = Path(family["raw"]["files"]["explore"])
    data = page_data(path)
    loaded: LoadedModel = family["loaded"]
    last = loaded.depth - 1
    pr, pc = family["patch"]
    truth = npy_of(family["by_patch"], last)  # (H, gh, gw): patch (pr, pc)'s attention over the patches
    opened = open_file(browser, path)
    page = opened.page
    page.select_option("#query", "patch")
    page.select_option("#head", "0")
    got = hover(page, data, pr, pc)  # hovering previews: the value is the patch's attention to itself
    assert abs(float(got["value"]) - truth[0][pr, pc]) <= float(got["bound"]) + 1e-7
    assert float(got["bound"]) <= truth[0].max() / 510 + 1e-7 or float(got["bound"]) <= 1 / 510
    x, y = cell_centre(data, pr, pc)
    box = page.locator("#view").bounding_box()
    scale = box["width"] / data["photo_size"][0]
    page.mouse.click(box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale)  # pin it
    gh, gw = data["grid"]
    for r, c in ((0, 0), (gh - 1, gw - 1), (int(truth[0].argmax()) // gw, int(truth[0].argmax()) % gw)):
        got = hover(page, data, r, c)
        assert f"patch:{pr},{pc}" in got["text"]
        assert abs(float(got["value"]) - truth[0][r, c]) <= float(got["bound"]) + 1e-7, (r, c)
    # the stored rows decode to the same numbers as the page reads them
    values, _ = page_arrays(data, "patch", last)
    g = pr * gw + pc
    p = len(data["roles"])
    np.testing.assert_allclose(values[:, g, p:].reshape(-1, gh, gw), truth, atol=truth.max() / 510 + 1e-7)
    opened.check_clean()
    page.close()


def test_default_model_page_within_budget(tmp_path: Path) -> None:
    """The default model (random weights, full size: 12 blocks, 6 heads, 14×14) fits every block's patch rows."""
    from vitattn.attention import resolve_settings
    from vitattn.explainer import _batch
    from vitattn.models import load_model
    from vitattn.options import DEFAULT_MODEL

    loaded = load_model(DEFAULT_MODEL, pretrained=False, device="cpu")
    settings = resolve_settings(loaded, AttentionOptions(blocks=None, top_k=3))
    _, x, photos, boxes = _batch(loaded, Image.open(picture(tmp_path / "a.png", (320, 240), 2)))
    page = build_page(loaded, settings, x[0], photos[0], boxes[0], name="a.png")
    size = len(page.encode("utf-8"))
    assert size <= DEFAULT_EXPLORE_BUDGET
    (tmp_path / "p.html").write_text(page)
    data = page_data(tmp_path / "p.html")
    assert sorted(data["patch_blocks"]) == list(range(12)) and sorted(map(int, data["prefix"])) == list(range(12))


def test_large_grid_honours_the_budget(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    """37×37 patches (DINOv2 at 518 px): the budget holds, the last block keeps its patch rows when it fits,
    and the page works."""
    from vitattn.attention import resolve_settings
    from vitattn.explainer import _batch

    loaded = tiny_model("vit_small_patch14_reg4_dinov2")  # 3 blocks, 3 heads, cls + 4 registers, 37×37
    settings = resolve_settings(loaded, AttentionOptions(blocks=None))
    assert settings.grid == (37, 37)
    _, x, photos, boxes = _batch(loaded, Image.open(picture(tmp_path / "a.png", (600, 500), 3)))
    sizes = {}
    for budget in (DEFAULT_EXPLORE_BUDGET, 10_000_000, 2_000_000):
        page = build_page(loaded, settings, x[0], photos[0], boxes[0], name="a.png", budget=budget)
        sizes[budget] = len(page.encode("utf-8"))
        assert sizes[budget] <= budget
        out = tmp_path / f"p{budget}.html"
        out.write_text(page, encoding="utf-8")
        data = page_data(out)
        per_block = 3 * 1369 * 1374 * 4 / 3  # base64 of 8-bit rows
        assert len(data["patch_blocks"]) == min(3, int(budget / per_block))
        if data["patch_blocks"]:
            assert data["patch_blocks"][0] == 2
        assert sorted(map(int, data["prefix"])) == [0, 1, 2]
    opened = open_file(browser, tmp_path / "p10000000.html")
    text = opened.page.locator("#about").inner_text()
    assert "patch queries (any patch as the query): 2 " in text
    opened.page.select_option("#query", "patch")
    got = hover(opened.page, page_data(tmp_path / "p10000000.html"), 18, 18)
    assert got["value"] != ""
    opened.check_clean()
    opened.page.close()


def test_python_explore_repr_and_save(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    import vitattn

    model = tiny_model("test_vit").model
    result = vitattn.explore(model, Image.open(picture(tmp_path / "a.png", (200, 160), 4)), blocks=[0, -1],
                             method="rollout")
    html = result._repr_html_()
    assert html.startswith("<iframe srcdoc=") and "&lt;canvas id=&quot;view&quot;" in html
    saved = result.save(tmp_path / "page.html")
    data = page_data(saved)
    assert data["blocks"] == [0, 5] and "rollout" in data["methods"]
    opened = open_file(browser, saved)
    assert opened.page.locator("#multiples canvas").count() == 2 * (2 + 1)  # blocks × (heads + fused)
    opened.check_clean()
    opened.page.close()


@pytest.mark.parametrize("name", sorted(FAMILY_TABLE))
def test_every_family_page(browser: Any, tmp_path: Path, name: str) -> None:  # noqa: F811
    """Each family of the capture tests: the page opens clean, and the value under the cursor for the model's
    natural query (cls, or patch-mean without a class token) is vitattn.explain's, within the stated bound."""
    import vitattn

    loaded = tiny_model(name)
    img = Image.open(picture(tmp_path / "a.png", (240, 200), 5))
    page_file = vitattn.explore(loaded, img, blocks=[-1]).save(tmp_path / "p.html")
    data = page_data(page_file)
    truth = vitattn.explain(loaded, img, blocks=-1)[-1].heads[0]  # (gh, gw) head 0, the natural query
    opened = open_file(browser, page_file)
    opened.page.select_option("#head", "0")
    r, c = np.unravel_index(int(truth.argmax()), truth.shape)
    got = hover(opened.page, data, int(r), int(c))
    assert abs(float(got["value"]) - truth[r, c]) <= float(got["bound"]) + 1e-6, (name, got)
    opened.check_clean()
    opened.page.close()
