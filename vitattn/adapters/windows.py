"""Windowed self-attention (Swin v1, v2): each patch attends within its window, on a cyclically shifted grid.

A Swin block rolls its stage grid by ``-shift``, pads it to whole windows, cuts it into ``wh x ww`` windows
and runs attention in each. Its ``attn_drop`` input (the unfused path, as for ViT) is ``(B * nW, H, w, w)``
with ``w = wh * ww``. :func:`stitch_windows` puts every window's entries back where its tokens sit on the
stage grid, the shift undone, as a dense ``(B, H, N, N)`` over the ``N = gh * gw`` tokens of the stage
(zero between tokens of different windows; the little mass a border token gives to padding is dropped).
Sites: every block of every stage, in forward order; each stage has its own grid (input size / stride),
so ``patch:R,C`` is in the block's stage grid. The natural query is ``patch-mean`` (attention received).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vitattn.adapters.base import Deliver, Family, Site, TokenLayout
from vitattn.options import Query, QueryKind

if TYPE_CHECKING:
    import torch
    from torch import nn


def window_token_index(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], *, device: torch.device | None = None
) -> torch.Tensor:
    """For each window and position in it, the stage-grid token it holds (row-major), or ``N`` for padding.

    Returns:
        (nW, wh * ww) long: windows in partition order (row-major over the padded, shifted grid).
    """
    import torch

    gh, gw = grid
    wh, ww = window
    hp, wp = -(-gh // wh) * wh, -(-gw // ww) * ww  # padded to whole windows
    y = torch.arange(hp, device=device)[:, None].expand(hp, wp)  # (Hp, Wp) rows of the shifted frame
    x = torch.arange(wp, device=device)[None, :].expand(hp, wp)  # (Hp, Wp)
    inside = (y < gh) & (x < gw)
    token = ((y + shift[0]) % gh) * gw + (x + shift[1]) % gw  # shifted[y, x] = original[y + sh, x + sw]
    token = torch.where(inside, token, torch.full_like(token, gh * gw))  # (Hp, Wp)
    windows = token.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3)  # (nWh, nWw, wh, ww)
    return windows.reshape(-1, wh * ww)  # (nW, w)


def stitch_windows(
    win: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]
) -> torch.Tensor:
    """Window attention back onto the stage grid.

    Args:
        win: (B * nW, H, w, w) attention within each window, windows in partition order.
        grid: (gh, gw) of the stage; window: (wh, ww); shift: the block's cyclic shift (rows, cols).
    Returns:
        (B, H, N, N) with N = gh * gw, rows = queries, in row-major token order of the unshifted grid.
    """
    idx = window_token_index(grid, window, shift, device=win.device)  # (nW, w)
    n_win, w = idx.shape
    b = win.shape[0] // n_win
    h = win.shape[1]
    n = grid[0] * grid[1]
    dense = win.new_zeros(b, h, n + 1, n + 1)  # one spare row and column collect the padding
    rows = idx[:, :, None].expand(n_win, w, w)  # (nW, w, w) query token of each entry
    cols = idx[:, None, :].expand(n_win, w, w)  # (nW, w, w) key token
    values = win.reshape(b, n_win, h, w, w).permute(0, 2, 1, 3, 4)  # (B, H, nW, w, w)
    dense[:, :, rows, cols] = values
    return dense[:, :, :n, :n]  # (B, H, N, N)


class WindowReader:
    """Reads a Swin block's window attention (``attn.attn_drop``) and stitches it onto the stage grid.

    Attached to the block: a forward pre-hook reads the stage grid from the block's (B, H, W, C) input.
    """

    def attach(self, module: Any, deliver: Deliver) -> Callable[[], None]:
        attn = module.attn
        saved = getattr(attn, "fused_attn", None)  # Swin v2 has no fused path
        if saved is not None:
            attn.fused_attn = False
        grid: list[tuple[int, int]] = []

        def pre(_: Any, args: tuple[Any, ...]) -> None:
            grid[:] = [(int(args[0].shape[1]), int(args[0].shape[2]))]  # (B, H, W, C) input

        def hook(_: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
            window = (int(module.window_size[0]), int(module.window_size[1]))
            shift = (int(module.shift_size[0]), int(module.shift_size[1]))
            deliver(stitch_windows(output, grid[0], window, shift))  # (B, H, N, N)

        handles = [module.register_forward_pre_hook(pre)]
        try:
            handles.append(attn.attn_drop.register_forward_hook(hook))
        except BaseException:
            handles[0].remove()
            if saved is not None:
                attn.fused_attn = saved
            raise

        def release() -> None:
            for handle in handles:
                handle.remove()
            if saved is not None:
                attn.fused_attn = saved

        return release


class SwinAdapter:
    """Swin Transformer v1 and v2 (timm ``SwinTransformer``, ``SwinTransformerV2``): windowed attention in
    stages (see the module docstring); v2's cosine attention is read at the same place."""

    name = "swin"

    def claims(self, model: nn.Module) -> bool:
        return type(model).__name__ in ("SwinTransformer", "SwinTransformerV2")

    def refusal(self, model: nn.Module) -> str | None:
        return None

    def family(self, model: nn.Module) -> Family:
        from timm.data import resolve_model_data_config

        _, ih, iw = resolve_model_data_config(model)["input_size"]
        layers: Any = model.layers
        sites: list[Site] = []
        reader = WindowReader()
        layouts: list[TokenLayout] = []
        for s, stage in enumerate(layers):
            first = stage.blocks[0]
            gh, gw = (int(v) for v in first.input_resolution)
            layout = TokenLayout(roles=(), patch_size=(int(ih) // gh, int(iw) // gw))
            layouts.append(layout)
            for j, blk in enumerate(stage.blocks):
                sites.append(Site(f"layers.{s}.blocks.{j}", "window", layout, int(blk.attn.num_heads), reader))
        return Family(
            adapter=self.name, sites=tuple(sites), layout=layouts[0], default_query=Query(QueryKind.patch_mean)
        )
