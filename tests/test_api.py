"""The Python API: the README's examples run as written (bundled model, offline), and its public surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vitattn
from vitattn.demo import DEMO_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
PICTURE = REPO / "sample_images" / "synthetic" / "2000000004_triangle.png"


def test_readme_example_from_timm_create_model(tmp_path: Path) -> None:
    import timm

    model = timm.create_model(f"local-dir:{DEMO_MODEL_DIR}", pretrained=True)
    result = vitattn.explain(model, str(PICTURE), blocks=[0, -1], top_k=2)
    last = result[-1]  # addressed by the index the caller gave
    assert last is result.blocks[3] and result[0] is result.blocks[0]
    assert last.heads.shape == (4, 8, 8) and last.heads.dtype == np.float32
    assert last.fused().shape == (8, 8)
    assert result.top[0].label == "triangle" and len(result.top) == 2
    picture = result.overlay(head=0, cmap="viridis")
    picture.save(tmp_path / "head0.png")
    assert picture.size == (256, 256) and (tmp_path / "head0.png").stat().st_size > 0  # capped, never enlarged
    assert model.training  # the caller's mode is restored


def test_explain_accepts_pictures_paths_and_tensors() -> None:
    model = vitattn.load_model("demo", device="cpu")
    photo = vitattn.load_image(str(PICTURE)).image
    from_path = vitattn.explain(model, str(PICTURE), top_k=0)
    from_pictures = vitattn.explain(model, [photo, photo], top_k=0)
    x = model.transform(photo)  # (3, H, W), preprocessed by the model's own transform
    from_tensor = vitattn.explain(model.model, x, top_k=0)  # a plain timm module
    from_batch = vitattn.explain(model, x[None], top_k=0)
    assert isinstance(from_pictures, list) and len(from_pictures) == 2 and isinstance(from_batch, list)
    for other in (from_pictures[1], from_tensor, from_batch[0]):
        np.testing.assert_allclose(other[-1].heads, from_path[-1].heads, atol=1e-6)
    assert from_tensor.photo is not None and from_tensor.photo.size == (64, 64)  # what the model saw
    assert from_tensor.overlay(max_side=0).size == (64, 64)
    with pytest.raises(KeyError, match="block 1 was not computed"):
        from_path[1]


def test_explain_methods_by_name_and_bad_values() -> None:
    model = vitattn.load_model("demo", device="cpu")
    roll = vitattn.explain(model, str(PICTURE), blocks=None, method="rollout", top_k=0)
    assert sorted(roll.blocks) == [0, 1, 2, 3] and roll[-1].method_map is not None
    assert roll.overlay(head="method").size == (256, 256)  # the 256-px picture's own size
    with pytest.raises(vitattn.UsageError, match="unknown method 'nope'") as info:
        vitattn.explain(model, str(PICTURE), method="nope")
    assert info.value.option == "method" and "--" not in str(info.value)  # values, not CLI flags


def test_heatmap_run_from_python(tmp_path: Path) -> None:
    run = vitattn.start_heatmap(
        inputs=vitattn.InputOptions([str(PICTURE.parent)]),
        model=vitattn.ModelOptions("demo", device="cpu"),
        render=vitattn.RenderOptions(out=str(tmp_path / "o")),  # a string path is a path
    )
    outcomes = list(run.outcomes())
    assert [o.status for o in outcomes] == ["ok"] * 6
    assert all(o.folder is not None and (o.folder / "meta.json").is_file() for o in outcomes)
    assert run.loaded.spec == "demo"


def test_options_fail_without_a_model() -> None:
    with pytest.raises(vitattn.UsageError, match="rollout only"):
        vitattn.AttentionOptions(discard_ratio=0.2)
    with pytest.raises(vitattn.UsageError, match="alpha 2"):
        vitattn.RenderOptions(alpha=2)
    with pytest.raises(vitattn.UsageError, match="unknown format 'gif'"):
        vitattn.RenderOptions(format="gif")
    assert vitattn.RenderOptions(format="JPEG").format is vitattn.ImageFormat.jpg
    assert vitattn.Query.parse("patch:2,3") == vitattn.Query(vitattn.QueryKind.patch, 2, 3)
    assert str(vitattn.Query.parse("CLS")) == "cls"


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = vitattn.load_model("test_vit", pretrained=False, device="cpu")
    assert torch.equal(torch.rand(1), expected)
    b = vitattn.load_model("test_vit", pretrained=False, device="cpu")
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.subprocess
def test_public_names_resolve_and_import_stays_light() -> None:
    for name in vitattn.__all__:
        assert getattr(vitattn, name) is not None, name
    assert "explain" in dir(vitattn) and "Runner" not in dir(vitattn) and "HeatmapJob" not in dir(vitattn)
    code = "import sys, vitattn; assert not {'torch', 'timm', 'matplotlib'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_preprocessed_tensor_is_drawn_whole() -> None:
    model = vitattn.load_model("test_vit", pretrained=False, device="cpu")
    from vitattn.preprocess import crop_box

    h, w = model.input_size
    assert crop_box(model.transform, (w, h)) != (0.0, 0.0, float(w), float(h))  # the transform would crop it
    result = vitattn.explain(model, torch.zeros(3, h, w), top_k=0)
    assert result.crop_box == (0.0, 0.0, float(w), float(h))  # the tensor is what the model saw, all of it
    with pytest.raises(vitattn.UsageError, match="unknown head 'median'"):
        result.overlay(head="median")
