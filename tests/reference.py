"""An independent reference for captured attention: timm's own unfused path, softmax outputs recorded.

Independent of vitattn's hooks: a copy of the model runs every block unfused, and each 4-D ``Tensor.softmax``
output of its forward pass is recorded, in block order.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def recorded_attention(model: nn.Module, x: torch.Tensor, *, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every block's attention from timm's unfused path on a copy of the model (with gradients if ``grad``)."""
    ref = copy.deepcopy(model)
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    recorded: list[torch.Tensor] = []
    original = torch.Tensor.softmax

    def recording_softmax(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(self, *args, **kwargs)
        if out.dim() == 4:
            if grad:
                out.retain_grad()
            recorded.append(out)
        return out

    torch.Tensor.softmax = recording_softmax  # type: ignore[method-assign]
    try:
        with torch.set_grad_enabled(grad):
            logits = ref(x)
    finally:
        torch.Tensor.softmax = original  # type: ignore[method-assign]
    assert len(recorded) == len(ref.blocks)
    return logits, recorded
