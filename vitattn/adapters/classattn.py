"""Class-attention families: CaiT (``blocks_token_only``) and XCiT (``cls_attn_blocks``).

Their last blocks let only the class token ask: ``softmax(q_cls k^T * scale)`` over ``[cls, patches]``,
read through ``attn_drop`` (:class:`~vitattn.adapters.readers.DropoutReader`). Those blocks are the sites;
the query is ``cls``. Their earlier blocks are not offered: CaiT's talking-heads blocks mix heads after the
softmax (what multiplies the values is not a probability per head), and XCiT's are cross-covariance
(channel) attention with no token-to-token map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitattn.adapters.base import Family, Site, TokenLayout, patch_stride
from vitattn.adapters.readers import DropoutReader
from vitattn.options import Query, QueryKind

if TYPE_CHECKING:
    from torch import nn

_CLASS_BLOCKS = ("blocks_token_only", "cls_attn_blocks")  # CaiT, XCiT


def _class_blocks(model: nn.Module) -> tuple[str, Any] | None:
    for attr in _CLASS_BLOCKS:
        blocks = getattr(model, attr, None)
        if blocks is not None:
            return attr, blocks
    return None


class ClassAttentionAdapter:
    """Class-attention blocks at the end of the network (see the module docstring)."""

    name = "class-attention"

    def claims(self, model: nn.Module) -> bool:
        return any(hasattr(model, a) for a in _CLASS_BLOCKS) and hasattr(model, "patch_embed")

    def refusal(self, model: nn.Module) -> str | None:
        found = _class_blocks(model)
        if found is None or len(found[1]) == 0:
            return "its class-attention blocks were removed (no class token)"
        if not all(type(getattr(b, "attn", None)).__name__ == "ClassAttn" for b in found[1]):
            return "its class-attention blocks are not timm's ClassAttn"
        return None

    def family(self, model: nn.Module) -> Family:
        found = _class_blocks(model)
        assert found is not None  # refusal() said so
        attr, blocks = found
        stride = patch_stride(model.patch_embed)  # type: ignore[arg-type]
        keys = TokenLayout(roles=("cls",), patch_size=stride, queries=("cls",))
        reader = DropoutReader()
        sites = tuple(
            Site(f"{attr}.{i}.attn", "class", keys, int(blk.attn.num_heads), reader) for i, blk in enumerate(blocks)
        )
        return Family(
            adapter=self.name,
            sites=sites,
            layout=TokenLayout(roles=("cls",), patch_size=stride),
            default_query=Query(QueryKind.cls),
        )
