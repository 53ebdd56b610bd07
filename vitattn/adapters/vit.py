"""The plain-ViT family: a patch embedding, then ``model.blocks`` of global self-attention over every token.

Covers timm's ``VisionTransformer`` (ViT, DeiT, DeiT3, FlexiViT, DINOv2, SigLIP, hybrids ``vit_*_r*``),
``Beit``, ``Eva`` and ``VisionTransformerRelPos``. Sites: ``blocks[i].attn``, then the attention-pool head
(``global_pool='map'``) when there is one. Prefix tokens are read from the model (``cls_token``,
``dist_token``, ``reg_token``); the patch stride from the patch embedding's image and grid sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitattn.adapters.base import Family, Site, TokenLayout, patch_stride
from vitattn.adapters.readers import DropoutReader, LatentPoolReader
from vitattn.options import Query, QueryKind

if TYPE_CHECKING:
    from torch import nn


def prefix_roles(model: nn.Module) -> list[str]:
    """The prefix tokens the model declares, in sequence order: ``cls``, ``dist``, ``reg0``..."""
    roles: list[str] = []
    if getattr(model, "cls_token", None) is not None:
        roles.append("cls")
    if getattr(model, "dist_token", None) is not None:
        roles.append("dist")
    reg = getattr(model, "reg_token", None)
    roles.extend(f"reg{i}" for i in range(int(reg.shape[1]) if reg is not None else 0))
    return roles


def head_reads_cls(model: nn.Module) -> bool:
    """True when the classifier reads the class token (``global_pool='token'``, or no pooling at all)."""
    return str(getattr(model, "global_pool", "token") or "") in ("token", "")


class VitAdapter:
    """Global self-attention blocks over prefix tokens + the patch grid (see the module docstring)."""

    name = "vit"

    def claims(self, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens"))

    def refusal(self, model: nn.Module) -> str | None:
        blocks: Any = model.blocks
        attns = [getattr(b, "attn", None) for b in blocks]
        if any(a is None for a in attns):
            return "its blocks run attention and MLP as one parallel block (no block.attn to read)"
        if any(type(a).__name__ == "DiffAttention" for a in attns):
            return "differential attention (softmax A1 - lambda * A2 per head) is not captured yet"
        if not all(hasattr(a, "attn_drop") for a in attns):
            return "its blocks do not run global multi-head self-attention over all tokens"
        roles = prefix_roles(model)
        num_prefix = int(model.num_prefix_tokens)  # type: ignore[arg-type]
        if len(roles) != num_prefix:
            return (
                f"it has {num_prefix} prefix tokens but vitattn identified {len(roles)} ({', '.join(roles) or 'none'})"
            )
        return None

    def family(self, model: nn.Module) -> Family:
        roles = tuple(prefix_roles(model))
        stride = patch_stride(model.patch_embed)  # type: ignore[arg-type]
        layout = TokenLayout(roles=roles, patch_size=stride)
        reader = DropoutReader()
        blocks: Any = model.blocks
        sites = [
            Site(f"blocks.{i}.attn", "self", layout, int(blk.attn.num_heads), reader) for i, blk in enumerate(blocks)
        ]
        pool: Any = getattr(model, "attn_pool", None)
        if type(pool).__name__ == "AttentionPoolLatent":
            keys = roles if getattr(model, "pool_include_prefix", False) else ()
            n = int(pool.latent_len)
            queries = ("pool", *(f"pool{i}" for i in range(1, n)))
            pool_layout = TokenLayout(roles=keys, patch_size=stride, queries=queries)
            sites.append(Site("attn_pool", "pool", pool_layout, int(pool.num_heads), LatentPoolReader()))
            default = Query(QueryKind.pool)
        elif "cls" in roles and head_reads_cls(model):
            default = Query(QueryKind.cls)
        else:
            default = Query(QueryKind.patch_mean)
        return Family(adapter=self.name, sites=tuple(sites), layout=layout, default_query=default)
