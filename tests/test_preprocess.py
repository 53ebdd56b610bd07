"""The crop box maps the model's input back onto the photo: non-square, padded and EXIF-rotated photos land right."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import result_folder
from PIL import Image
from timm.data import create_transform
from typer.testing import CliRunner

from vitattn.cli import app
from vitattn.decoding import load_image
from vitattn.preprocess import crop_box, photo_tensor, tensor_transform

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
    meta = json.loads((result_folder(tmp_path / "o", path) / "meta.json").read_text())
    assert meta["image_size"] == [1600, 2400]
    transform = create_transform(input_size=(3, 160, 160), crop_pct=0.95, crop_mode="center", interpolation="bicubic")
    expected = crop_box(transform, (1600, 2400))
    np.testing.assert_allclose(meta["crop_box"], expected, atol=4.0)  # draft rounding: a few full-size pixels
    with Image.open(result_folder(tmp_path / "o", path) / "block5_mean.png") as im:
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


def _photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour fields plus noise: edges and texture where resampling filters differ."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 255, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
    arr = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC)).astype(np.int16)
    arr += rng.integers(-25, 25, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("config", CONFIGS)
def test_tensor_transform_gives_the_models_transform_within_rounding(config: dict[str, Any]) -> None:
    transform = create_transform(**config)
    fast = tensor_transform(transform)
    if config["crop_mode"] == "border":  # ResizeKeepRatio + CenterCropOrPad: not recognised, PIL path
        assert fast is None
        return
    assert fast is not None
    std = torch.as_tensor(transform.transforms[-1].std).view(3, 1, 1)
    for i, size in enumerate([(800, 600), (600, 800), (331, 500), (230, 240), (1281, 961), (97, 61)]):
        photo = _photo_like(size, i)
        expected = transform(photo)  # the model's own transform on the PIL picture
        got = fast(photo_tensor(photo))
        assert got is not None and got.shape == expected.shape and got.dtype == torch.float32
        levels = ((got - expected) * std * 255.0).abs()  # (3, h, w) in 8-bit levels
        assert levels.max() <= 2.0 + 1e-3, size
        assert levels.mean() < 0.25, size  # most values identical (bicubic: > 99 %), the rest one level off


def test_tensor_transform_leaves_padding_crops_and_other_steps_to_the_transform() -> None:
    from torchvision import transforms as T

    norm = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    padding = T.Compose([T.Resize(40), T.CenterCrop(48), T.ToTensor(), norm])
    fast = tensor_transform(padding)
    assert fast is not None and fast(photo_tensor(_photo_like((80, 60), 0))) is None  # 53x40 < 48x48: pads
    assert fast(photo_tensor(_photo_like((40, 40), 0))) is None
    extra = T.Compose([T.Resize(40), T.CenterCrop(32), T.Grayscale(3), T.ToTensor(), norm])
    nearest = T.Compose([T.Resize(40, T.InterpolationMode.NEAREST), T.CenterCrop(32), T.ToTensor(), norm])
    assert tensor_transform(extra) is None and tensor_transform(nearest) is None and tensor_transform(norm) is None


def test_pipeline_fast_preprocessing_matches_the_transform_path(tmp_path: Path) -> None:
    """The same run with the transform on PIL pictures gives the same attention up to rounding noise."""
    import vitattn

    photo = tmp_path / "p.jpg"
    _photo_like((900, 700), 3).save(photo, quality=90)
    loaded = vitattn.load_model("test_vit", pretrained=False, device="cpu")
    arrays = []
    for fast in (True, False):
        run = vitattn.start_heatmap(
            inputs=vitattn.InputOptions([str(photo)]),
            model=loaded,
            attention=vitattn.AttentionOptions(top_k=0),
            render=vitattn.RenderOptions(out=tmp_path / str(fast), npy=True),
        )
        assert run.job.tensor_transform is not None
        if not fast:
            run.job.tensor_transform = None
        [outcome] = list(run.outcomes())
        assert outcome.status == "ok" and outcome.folder is not None
        arrays.append(np.load(outcome.folder / "block5_attn.npy"))
        with Image.open(outcome.folder / "block5_mean.png") as im:
            assert im.size == (512, 398)
    np.testing.assert_allclose(arrays[0], arrays[1], atol=2e-3, rtol=0)
    assert np.abs(arrays[0] - arrays[1]).max() < 0.05 * arrays[1].max()
