"""Windowed attention (Swin): window attention stitched back onto the stage grid, the cyclic shift undone.

The stitching is checked on hand-built window attention with known values (non-square grid, with and
without shift, with padding), and a tiny Swin against the window partition, shift, relative position bias
and shift mask written out here from each block's own parameters, at the first, a middle and the last block.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from vitattn.adapters.windows import stitch_windows
from vitattn.attention import capturing, forward_batch, resolve_settings
from vitattn.capture import AttentionCapture
from vitattn.errors import UsageError
from vitattn.models import LoadedModel, load_model
from vitattn.options import AttentionOptions, Method


def hand_built(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """The expected dense (1, 1, N, N) for window attention whose entry (query i, key j) is
    1000 * (token of i) + (token of j), tokens found by walking the shifted, padded grid window by window."""
    gh, gw = grid
    wh, ww = window
    hp, wp = -(-gh // wh) * wh, -(-gw // ww) * ww
    n = gh * gw
    dense = torch.zeros(1, 1, n, n, dtype=torch.float64)
    for wy in range(0, hp, wh):
        for wx in range(0, wp, ww):
            cells = [(wy + a, wx + b) for a in range(wh) for b in range(ww)]  # this window, row-major
            tokens = [((y + shift[0]) % gh) * gw + (x + shift[1]) % gw if y < gh and x < gw else None for y, x in cells]
            for ti in tokens:
                for tj in tokens:
                    if ti is not None and tj is not None:
                        dense[0, 0, ti, tj] = 1000 * ti + tj
    return dense


def windows_of(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """The same values as they arrive from the model: (nW, 1, w, w), padding cells holding -1."""
    gh, gw = grid
    wh, ww = window
    hp, wp = -(-gh // wh) * wh, -(-gw // ww) * ww
    out = []
    for wy in range(0, hp, wh):
        for wx in range(0, wp, ww):
            cells = [(wy + a, wx + b) for a in range(wh) for b in range(ww)]
            tokens = [((y + shift[0]) % gh) * gw + (x + shift[1]) % gw if y < gh and x < gw else None for y, x in cells]
            w = torch.tensor(
                [[1000.0 * ti + tj if ti is not None and tj is not None else -1.0 for tj in tokens] for ti in tokens],
                dtype=torch.float64,
            )
            out.append(w)
    return torch.stack(out)[:, None]


@pytest.mark.parametrize("shift", [(0, 0), (1, 2)])
@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])  # non-square; 5x7 needs padding to 3x3 windows
def test_stitching_puts_each_entry_on_its_tokens(grid: tuple[int, int], shift: tuple[int, int]) -> None:
    window = (3, 3) if grid == (5, 7) else (2, 3)
    got = stitch_windows(windows_of(grid, window, shift), grid, window, shift)
    torch.testing.assert_close(got, hand_built(grid, window, shift))


def test_stitching_a_known_case_by_hand() -> None:
    # 2x4 grid, 2x2 windows, shift (0, 1): window 0 holds original columns 1, 2; window 1 holds 3, 0
    win = torch.arange(2 * 16, dtype=torch.float64).reshape(2, 1, 4, 4)
    dense = stitch_windows(win, (2, 4), (2, 2), (0, 1))[0, 0]  # (8, 8)
    w1 = [3, 0, 7, 4]  # the tokens of window 1, row-major: (0,3), (0,0), (1,3), (1,0)
    for i, ti in enumerate(w1):
        for j, tj in enumerate(w1):
            assert dense[ti, tj] == win[1, 0, i, j]
    assert dense[0, 1] == 0 and dense[1, 0] == 0  # tokens 0 and 1 are in different windows


SWIN = "swin_tiny_patch4_window7_224"
SWIN_KWARGS = {
    "img_size": (112, 168),  # stage grids 28x42 and 14x21: non-square, 4x6 and 2x3 windows of 7x7
    "embed_dim": 16,
    "depths": (3, 2),
    "num_heads": (1, 2),
    "pretrained_cfg_overlay": {"input_size": (3, 112, 168)},
}


@functools.cache
def tiny_swin() -> LoadedModel:
    torch.manual_seed(0)
    loaded = load_model(SWIN, pretrained=False, device="cpu", model_kwargs=SWIN_KWARGS)
    with torch.no_grad():
        for site in loaded.sites:  # peaked attention, so that a misplaced entry shows
            loaded.model.get_submodule(site.path).attn.qkv.weight.mul_(8.0)
    return loaded


def explicit_block_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Swin block's attention, written out: norm, roll by -shift, windows, q k^T * scale + bias + mask,
    softmax, then every entry put back on the unshifted grid. x: (B, gh, gw, C) -> (B, H, N, N)."""
    b, gh, gw, c = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    attn = block.attn
    heads = attn.num_heads
    y = torch.roll(block.norm1(x), shifts=(-sh, -sw), dims=(1, 2))  # (B, gh, gw, C); the tiny grids need no pad
    assert gh % wh == 0 and gw % ww == 0
    n = gh * gw
    out = torch.zeros(b, heads, n, n)
    bias = attn._get_rel_pos_bias()[0]  # (H, w, w): timm's table, indexed by relative position
    mask = block.attn_mask  # (nW, w, w) 0 / -100 between tokens from different sides of the shift, or None
    k_win = 0
    for wy in range(0, gh, wh):
        for wx in range(0, gw, ww):
            cells = [(wy + i, wx + j) for i in range(wh) for j in range(ww)]
            tokens = [((cy + sh) % gh) * gw + (cx + sw) % gw for cy, cx in cells]
            feats = torch.stack([y[:, cy, cx] for cy, cx in cells], dim=1)  # (B, w, C)
            q, k, _ = attn.qkv(feats).reshape(b, len(cells), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            logits = (q * attn.scale) @ k.transpose(-2, -1) + bias  # (B, H, w, w)
            if mask is not None:
                logits = logits + mask[k_win]
            probs = logits.softmax(dim=-1)
            index = torch.tensor(tokens)
            out[:, :, index[:, None], index[None, :]] = probs
            k_win += 1
    return out


def reference(loaded: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = copy.deepcopy(loaded.model)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(s.path).register_forward_pre_hook(lambda m, a, p=s.path: inputs.__setitem__(p, a[0]))
        for s in loaded.sites
    ]
    with torch.inference_mode():
        logits = model(x)
        attns = [explicit_block_attention(model.get_submodule(s.path), inputs[s.path]) for s in loaded.sites]
    for handle in handles:
        handle.remove()
    return logits, attns


def test_swin_sites_grids_and_default_query() -> None:
    loaded = tiny_swin()
    assert loaded.adapter == "swin" and [s.kind for s in loaded.sites] == ["window"] * 5
    assert [s.layout.grid_for(loaded.input_size) for s in loaded.sites] == [(28, 42)] * 3 + [(14, 21)] * 2
    settings = resolve_settings(loaded)
    assert str(settings.query) == "patch-mean" and settings.blocks == (4,) and settings.grid == (14, 21)
    with pytest.raises(UsageError, match="different grids"):
        resolve_settings(loaded, AttentionOptions(blocks=[0, 4]))
    with pytest.raises(UsageError, match="rollout is not defined at block 0"):
        resolve_settings(loaded, AttentionOptions(method=Method.rollout))


def test_swin_maps_equal_the_written_out_window_attention() -> None:
    loaded = tiny_swin()
    x = torch.randn(2, 3, *loaded.input_size, generator=torch.Generator().manual_seed(1))
    expected_logits, attns = reference(loaded, x)
    assert any(loaded.model.get_submodule(s.path).attn_mask is not None for s in loaded.sites)  # shifted blocks
    for chosen in ([0], [1], [2], [3, 4]):  # first, a middle (shifted) and the last of stage 0; stage 1
        gh, gw = loaded.sites[chosen[0]].layout.grid_for(loaded.input_size)
        for query in ("patch-mean", f"patch:{gh - 1},{gw // 2}", "patch:0,0"):
            settings = resolve_settings(loaded, AttentionOptions(blocks=chosen, query=query, top_k=0))
            with capturing(loaded, settings) as cap:
                results = forward_batch(loaded, cap, x, settings)
            for b in chosen:
                attn = attns[b]  # (B, H, N, N)
                if query == "patch-mean":
                    rows = attn.mean(dim=2)
                else:
                    r, c = map(int, query.split(":")[1].split(","))
                    rows = attn[:, :, r * gw + c, :]
                for i in range(2):
                    got = torch.from_numpy(results[i].blocks[b].heads)
                    torch.testing.assert_close(got, rows[i].reshape(-1, gh, gw), atol=1e-5, rtol=1e-4)
    fused = [loaded.model.get_submodule(s.path).attn.fused_attn for s in loaded.sites]
    with AttentionCapture(loaded.model, list(range(5)), family=loaded.family) as cap, torch.inference_mode():
        logits, captured = cap.run(x)
    assert [loaded.model.get_submodule(s.path).attn.fused_attn for s in loaded.sites] == fused
    assert logits is not None and captured[4].shape == (2, 2, 14 * 21, 14 * 21)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    for m in loaded.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def stitched_by_hand(
    win: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    """(B * nW, H, w, w) window attention -> (B, H, N, N), walking the shifted grid window by window (no padding)."""
    (gh, gw), (wh, ww) = grid, window
    n_win = (gh // wh) * (gw // ww)
    b, heads = win.shape[0] // n_win, win.shape[1]
    out = torch.zeros(b, heads, gh * gw, gh * gw)
    k_win = 0
    for wy in range(0, gh, wh):
        for wx in range(0, gw, ww):
            cells = [(wy + i, wx + j) for i in range(wh) for j in range(ww)]
            index = torch.tensor([((cy + shift[0]) % gh) * gw + (cx + shift[1]) % gw for cy, cx in cells])
            for bi in range(b):
                out[bi, :, index[:, None], index[None, :]] = win[bi * n_win + k_win]
            k_win += 1
    return out


SWIN2 = "swinv2_tiny_window8_256"
SWIN2_KWARGS = {
    "img_size": (64, 128),  # stage grids 16x32 and 8x16: 2x4 and 1x2 windows of 8x8
    "embed_dim": 16,
    "depths": (2, 2),
    "num_heads": (1, 2),
    "pretrained_cfg_overlay": {"input_size": (3, 64, 128)},
}


def test_swin_v2_maps_equal_timm_window_softmax_stitched_by_hand() -> None:
    torch.manual_seed(0)
    loaded = load_model(SWIN2, pretrained=False, device="cpu", model_kwargs=SWIN2_KWARGS)
    assert loaded.adapter == "swin" and loaded.depth == 4
    x = torch.randn(2, 3, *loaded.input_size, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(loaded.model)
    windows: dict[int, torch.Tensor] = {}
    grids: dict[int, tuple[int, int]] = {}
    handles = []
    for i, s in enumerate(loaded.sites):
        blk = ref.get_submodule(s.path)
        handles.append(blk.register_forward_pre_hook(lambda m, a, i=i: grids.__setitem__(i, tuple(a[0].shape[1:3]))))
        handles.append(blk.attn.softmax.register_forward_hook(lambda m, a, o, i=i: windows.__setitem__(i, o)))
    with torch.inference_mode():
        expected_logits = ref(x)
    for h in handles:
        h.remove()
    for b in range(4):
        blk = ref.get_submodule(loaded.sites[b].path)
        gh, gw = grids[b]
        expected = stitched_by_hand(windows[b], (gh, gw), tuple(blk.window_size), tuple(blk.shift_size))
        for query in ("patch-mean", f"patch:{gh - 1},{gw // 2}"):
            settings = resolve_settings(loaded, AttentionOptions(blocks=[b], query=query, top_k=0))
            with capturing(loaded, settings) as cap:
                results = forward_batch(loaded, cap, x, settings)
            rows = expected.mean(dim=2) if query == "patch-mean" else expected[:, :, (gh - 1) * gw + gw // 2, :]
            for i in range(2):
                got = torch.from_numpy(results[i].blocks[b].heads)
                torch.testing.assert_close(got, rows[i].reshape(-1, gh, gw), atol=1e-5, rtol=1e-4)
    assert any(any(ref.get_submodule(s.path).shift_size) for s in loaded.sites)
    with AttentionCapture(loaded.model, [0, 1], family=loaded.family) as cap, torch.inference_mode():
        logits, _ = cap.run(x)
    assert logits is not None
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
