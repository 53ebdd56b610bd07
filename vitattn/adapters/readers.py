"""Readers: how the probabilities of one attention module are read, scoped to a capture.

- :class:`DropoutReader`: modules whose unfused path passes ``softmax(q k^T * scale + bias)`` through
  ``self.attn_drop`` (timm's ViT, BEiT, EVA, CaiT, XCiT class attention...). The module is switched to
  that path (``fused_attn = False``) and a forward hook on ``attn_drop`` reads what the block multiplies
  with its values (the identity in eval mode).
- :class:`LatentPoolReader`: an attention-pool head (timm ``AttentionPoolLatent``), which has no
  ``attn_drop``. A forward hook recomputes the probabilities from the module's own latent query, key
  projection, norms and mask, on the very input the module received; the module itself runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vitattn.adapters.base import Deliver

if TYPE_CHECKING:
    import torch
    from torch import nn


class DropoutReader:
    """Reads the tensor a module's unfused path passes through ``attn_drop``."""

    def attach(self, module: Any, deliver: Deliver) -> Callable[[], None]:
        saved = getattr(module, "fused_attn", None)
        if saved is not None:
            module.fused_attn = False

        def hook(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            deliver(output)  # (B, H, Q, N) probabilities

        drop: nn.Module = module.attn_drop
        try:
            handle = drop.register_forward_hook(hook)
        except BaseException:
            if saved is not None:
                module.fused_attn = saved
            raise

        def release() -> None:
            handle.remove()
            if saved is not None:
                module.fused_attn = saved

        return release


def latent_pool_attention(module: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """An ``AttentionPoolLatent`` head's probabilities for its input ``x`` (B, N, C).

    Returns:
        (B, H, L, N): each of the L latent queries' attention over the N tokens.
    """
    b, n, _ = x.shape
    heads, head_dim, latent_len = int(module.num_heads), int(module.head_dim), int(module.latent_len)
    if module.pos_embed is not None:
        x = x + module.pos_embed.unsqueeze(0).to(x.dtype)  # (B, N, C)
    latent = module.latent.expand(b, -1, -1)  # (B, L, C_latent)
    q = module.q(latent).reshape(b, latent_len, heads, head_dim).transpose(1, 2)  # (B, H, L, d)
    kv = module.kv(x).reshape(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H, N, d)
    k = kv[0]  # (B, H, N, d)
    q, k = module.q_norm(q), module.k_norm(k)
    logits = (q * module.scale) @ k.transpose(-2, -1)  # (B, H, L, N)
    if attn_mask is not None:
        logits = logits + attn_mask
    probs: torch.Tensor = logits.softmax(dim=-1)  # (B, H, L, N)
    return probs


class LatentPoolReader:
    """Recomputes an attention-pool head's probabilities from its own parameters, in a forward hook."""

    def attach(self, module: Any, deliver: Deliver) -> Callable[[], None]:
        def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
            x = args[0] if args else kwargs["x"]
            mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
            deliver(latent_pool_attention(mod, x, mask))

        handle = module.register_forward_hook(hook, with_kwargs=True)
        release: Callable[[], None] = handle.remove
        return release
