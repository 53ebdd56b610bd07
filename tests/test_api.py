"""The README's Python API example, run as written (with the bundled model, offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import vitattn
from vitattn.demo import DEMO_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
PICTURE = REPO / "sample_images" / "synthetic" / "2000000004_triangle.png"


def test_readme_example(tmp_path: Path) -> None:
    model = vitattn.load_model(f"local-dir:{DEMO_MODEL_DIR}", device="cpu")
    photo = vitattn.load_image(str(PICTURE)).image
    [res] = vitattn.compute_attention(model, [photo], blocks=[-1], query="cls", top_k=2)
    maps = res.blocks[3].heads
    assert maps.shape == (4, 8, 8) and maps.dtype == np.float32
    assert res.blocks[3].fused().shape == (8, 8)
    lut = vitattn.colormap_lut("inferno")
    heat = vitattn.scale_maps(maps, shared=False)[0]
    vitattn.overlay(photo, heat, crop_box=res.crop_box, lut=lut).save(tmp_path / "head0.png")
    assert (tmp_path / "head0.png").stat().st_size > 0
    assert res.top[0].label == "triangle" and model.layout.roles == ("cls",) and model.grid == (8, 8)

    settings = vitattn.resolve_settings(model, blocks=[-1])
    items = vitattn.iter_inputs([str(PICTURE.parent)])
    outcomes = list(
        vitattn.Runner(model, settings, vitattn.RenderOptions(out=tmp_path / "o"), vitattn.RunOptions()).run(items)
    )
    assert [o.status for o in outcomes] == ["ok"] * 6
    assert all((o.folder / "meta.json").is_file() for o in outcomes if o.folder)


def test_public_names_resolve_and_import_stays_light() -> None:
    for name in vitattn.__all__:
        assert getattr(vitattn, name) is not None, name
    code = "import sys, vitattn; assert not {'torch', 'timm', 'matplotlib'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
