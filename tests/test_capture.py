"""Captured attention equals timm's own unfused attention, for every supported family.

The reference is independent of vitattn's hooks: it switches every block of a second copy of the
model to timm's unfused path and records each ``Tensor.softmax`` output of the forward pass.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FAMILIES, tiny_model
from reference import recorded_attention

from vitattn.attention import capturing, forward_batch, resolve_settings
from vitattn.capture import AttentionCapture
from vitattn.errors import CaptureError, UnsupportedModelError, UsageError
from vitattn.models import LoadedModel, load_model, token_layout
from vitattn.options import AttentionOptions


def queries_for(roles: tuple[str, ...], grid: tuple[int, int]) -> list[str]:
    qs = [r for r in ("cls", "dist") if r in roles]
    return [*qs, "patch-mean", f"patch:{grid[0] - 1},{grid[1] // 2}"]


def reference_attention(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention probabilities through timm's unfused path: [(B, H, N, N)] by block."""
    with torch.inference_mode():
        return recorded_attention(model, x, grad=False)[1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, LoadedModel, tuple[str, ...], tuple[int, int]]:
    f = FAMILIES[request.param]
    return request.param, tiny_model(request.param), f.roles, f.grid


def test_layout_and_grid_come_from_the_model(family: Any) -> None:
    _, loaded, roles, grid = family
    assert loaded.layout.roles == roles
    assert loaded.grid == grid


def test_captured_rows_equal_timm_unfused_attention(family: Any) -> None:
    _, loaded, roles, grid = family
    h, w = loaded.input_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    ref = reference_attention(loaded.model, x)
    p = len(roles)
    depth = loaded.depth
    for query in queries_for(roles, grid):
        settings = resolve_settings(loaded, AttentionOptions(blocks=[0, depth // 2, -1], query=query, top_k=0))
        with capturing(loaded, settings) as cap:
            results = forward_batch(loaded, cap, x, settings)
        for b in (0, depth // 2, depth - 1):
            attn = ref[b]  # (B, H, N, N)
            if query == "patch-mean":
                rows = attn[:, :, p:, :].mean(dim=2)
            elif query.startswith("patch:"):
                r, c = map(int, query.split(":")[1].split(","))
                rows = attn[:, :, p + r * grid[1] + c, :]
            else:
                rows = attn[:, :, roles.index(query), :]
            expected = rows[:, :, p:].reshape(2, -1, *grid)  # (B, H, gh, gw)
            for i in range(2):
                got = torch.from_numpy(results[i].blocks[b].heads)
                assert got.shape == expected[i].shape
                torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(
                    torch.from_numpy(results[i].blocks[b].prefix), rows[i, :, :p], atol=1e-5, rtol=1e-4
                )


def test_logits_unchanged_and_hooks_removed(family: Any) -> None:
    _, loaded, roles, grid = family
    model = loaded.model
    h, w = loaded.input_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    fused_before = [blk.attn.fused_attn for blk in model.blocks]
    with torch.inference_mode():
        expected = model(x)
    with AttentionCapture(model, [1]) as cap:
        # only the chosen block leaves the fused path
        assert [blk.attn.fused_attn for i, blk in enumerate(model.blocks) if i != 1] == [
            f for i, f in enumerate(fused_before) if i != 1
        ]
        assert model.blocks[1].attn.fused_attn is False
        with torch.inference_mode():
            logits, captured = cap.run(x)
    assert logits is not None
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert captured[1].shape[-1] == captured[1].shape[-2] == len(roles) + grid[0] * grid[1]
    assert [blk.attn.fused_attn for blk in model.blocks] == fused_before
    assert all(not blk.attn.attn_drop._forward_hooks for blk in model.blocks)


def test_hooks_removed_when_forward_raises() -> None:
    loaded = load_model("test_vit", pretrained=False, device="cpu")
    model = loaded.model
    fused_before = [blk.attn.fused_attn for blk in model.blocks]

    def boom(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise RuntimeError("failure inside the forward pass, after a capture")

    handle = model.blocks[3].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="failure inside"), AttentionCapture(model, [0, 2]) as cap:
            cap.run(torch.randn(1, 3, *loaded.input_size))
    finally:
        handle.remove()
    assert all(not blk.attn.attn_drop._forward_hooks for blk in model.blocks)
    assert [blk.attn.fused_attn for blk in model.blocks] == fused_before


def test_capture_that_sees_nothing_is_loud() -> None:
    loaded = load_model("test_vit", pretrained=False, device="cpu")
    model = loaded.model
    x = torch.randn(1, 3, *loaded.input_size)

    # stands in for an attention path that never calls attn_drop (e.g. a custom fused kernel)
    blk = model.blocks[0].attn
    original_forward = blk.forward
    blk.forward = lambda x, *a, **k: x  # type: ignore[method-assign]
    try:
        with pytest.raises(CaptureError, match="no attention was captured"), AttentionCapture(model, [0]) as cap:
            cap.run(x)
    finally:
        blk.forward = original_forward  # type: ignore[method-assign]


def test_stop_early_skips_later_blocks_and_logits() -> None:
    loaded = load_model("test_vit", pretrained=False, device="cpu")
    seen: list[int] = []
    handles = [
        blk.register_forward_hook(lambda m, a, o, i=i: seen.append(i)) for i, blk in enumerate(loaded.model.blocks)
    ]
    try:
        with AttentionCapture(loaded.model, [2], stop_early=True) as cap, torch.inference_mode():
            logits, captured = cap.run(torch.randn(1, 3, *loaded.input_size))
    finally:
        for h in handles:
            h.remove()
    assert logits is None and 2 in captured
    assert seen == [0, 1]  # block 2 stopped inside its attention; 3.. never ran


def test_unsupported_model_is_one_clear_error() -> None:
    with pytest.raises(UnsupportedModelError, match="not supported"):
        load_model("test_convnext", pretrained=False, device="cpu")


def test_bad_block_and_query_name_the_valid_range() -> None:
    loaded = load_model("test_vit", pretrained=False, device="cpu")
    with pytest.raises(UsageError, match=r"0\.\.5"):
        resolve_settings(loaded, AttentionOptions(blocks=[6]))
    with pytest.raises(UsageError, match="no dist token"):
        resolve_settings(loaded, AttentionOptions(query="dist"))
    with pytest.raises(UsageError, match="outside the 10×10 grid"):
        resolve_settings(loaded, AttentionOptions(query="patch:10,0"))
    with pytest.raises(UsageError, match=r"head 2 is out of range.*0\.\.1"):
        resolve_settings(loaded, AttentionOptions(heads=[2]))


def test_layout_roles_are_read_not_assumed() -> None:
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1, reg_tokens=2, no_embed_class=True)
    assert token_layout(model).roles == ("cls", "reg0", "reg1")
