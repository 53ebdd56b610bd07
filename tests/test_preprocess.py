"""The crop box maps the model's input back onto the photo: non-square, padded and EXIF-rotated photos land right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from typer.testing import CliRunner

from vitattn.cli import app
from vitattn.inputs import load_image
from vitattn.preprocess import crop_box

CONFIGS = [
    {"input_size": (3, 224, 224), "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"},
    {"input_size": (3, 240, 240), "crop_pct": 0.95, "crop_mode": "center", "interpolation": "bicubic"},
    {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "squash", "interpolation": "bilinear"},
    {"input_size": (3, 224, 224), "crop_pct": 0.9, "crop_mode": "border", "interpolation": "bilinear"},
    {"input_size": (3, 64, 64), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic"},
]


def marker_centre(arr: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of the brightest region of a (H, W) array."""
    mask = arr > arr.max() * 0.5
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['input_size'][1]}-{c['crop_mode']}")
@pytest.mark.parametrize("size", [(640, 360), (300, 500), (230, 230), (1001, 203)])
def test_crop_box_maps_the_model_input_back_onto_the_photo(cfg: dict, size: tuple[int, int]) -> None:
    w, h = size
    transform = create_transform(**cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    left, top, right, bottom = crop_box(transform, size)
    _, in_h, in_w = cfg["input_size"]
    rng = np.random.default_rng(w * h)
    for _ in range(3):
        # a marker well inside the region the model sees
        x0, x1, y0, y1 = max(left, 0), min(right, w), max(top, 0), min(bottom, h)  # the visible part
        mx = rng.uniform(x0 + 0.2 * (x1 - x0), x1 - 0.2 * (x1 - x0))
        my = rng.uniform(y0 + 0.2 * (y1 - y0), y1 - 0.2 * (y1 - y0))
        arr = np.zeros((h, w), dtype=np.uint8)
        r = max(3, int(0.02 * max(w, h)))
        arr[int(my) - r : int(my) + r + 1, int(mx) - r : int(mx) + r + 1] = 255
        x = transform(Image.fromarray(arr).convert("RGB"))  # (3, in_h, in_w)
        tx, ty = marker_centre(x[0].numpy())
        # input pixel centres -> photo coordinates through the box
        px = left + (tx + 0.5) * (right - left) / in_w
        py = top + (ty + 0.5) * (bottom - top) / in_h
        scale = max((right - left) / in_w, (bottom - top) / in_h)
        assert abs(px - (int(mx) + 0.5)) <= 1.5 * scale + 0.5
        assert abs(py - (int(my) + 0.5)) <= 1.5 * scale + 0.5


def test_exif_rotated_and_draft_decoded_photos_report_full_upright_geometry(tmp_path: Path) -> None:
    # stored 2400x1600 landscape with orientation 6 (rotate 90° clockwise): a 1600x2400 portrait photo
    stored = np.zeros((1600, 2400, 3), dtype=np.uint8)
    stored[:, :, 1] = 90
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=80)
    loaded = load_image(str(path), min_size=(512, 512))
    assert loaded.size == (1600, 2400)
    assert loaded.image.size[0] < loaded.image.size[1]  # upright
    assert loaded.image.size[0] < 1600  # decoded at a reduced (draft) scale
    result = CliRunner().invoke(
        app, ["heatmap", str(path), "-m", "test_vit", "--no-pretrained", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.stderr
    meta = json.loads((tmp_path / "o" / "rotated.jpg" / "meta.json").read_text())
    assert meta["image_size"] == [1600, 2400]
    transform = create_transform(input_size=(3, 160, 160), crop_pct=0.95, crop_mode="center", interpolation="bicubic")
    expected = crop_box(transform, (1600, 2400))
    np.testing.assert_allclose(meta["crop_box"], expected, atol=4.0)  # draft rounding: a few full-size pixels
    with Image.open(tmp_path / "o" / "rotated.jpg" / "block5_mean.png") as im:
        assert im.size == (341, 512)  # portrait, long side --max-side


def test_transform_is_the_models_own(tmp_path: Path) -> None:
    import timm
    from timm.data import resolve_model_data_config

    import vitattn

    loaded = vitattn.load_model("flexivit_small", pretrained=False, device="cpu", model_kwargs={"depth": 1})
    model = timm.create_model("flexivit_small", pretrained=False, depth=1)
    ref = create_transform(**resolve_model_data_config(model))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    torch.testing.assert_close(loaded.transform(photo), ref(photo))
    assert loaded.transform(photo).shape == (3, 240, 240)
