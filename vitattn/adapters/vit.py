"""The plain-ViT family: a patch embedding, then ``model.blocks`` of global self-attention over every token.

Covers timm's ``VisionTransformer`` (ViT, DeiT, DeiT3, FlexiViT, DINOv2, SigLIP, hybrids ``vit_*_r*``),
``Beit``, ``Eva``, ``VisionTransformerRelPos``, and classifiers wrapping such an encoder (Qwen3-ViT,
DeepSeek-ViT: ``model.encoder``, no prefix tokens). Sites: ``blocks[i].attn``, then the attention-pool head
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


#: ViT-shaped encoders whose tokens are not the plain patch grid: class name -> reason.
_OTHER_LAYOUTS = {
    "Gemma4VitEncoder": "its patch tokens are pooled and position-coded its own way (no adapter yet)",
    "ConVit": "gated positional self-attention, and the class token joins after those blocks (no adapter yet)",
}


def _is_vit(model: object) -> bool:
    return all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens"))


class VitAdapter:
    """Global self-attention blocks over prefix tokens + the patch grid (see the module docstring).

    Attributes:
        root: where the ViT sits in the model: ``""`` for the model itself, ``"encoder"`` for classifiers
            wrapping a vision encoder (Qwen3-ViT, DeepSeek-ViT), whose blocks are ``encoder.blocks``.
        encoders: with a root, the encoder class names this adapter reads.
    """

    def __init__(self, name: str = "vit", root: str = "", encoders: tuple[str, ...] = ()) -> None:
        self.name = name
        self.root = root
        self.encoders = encoders  # the encoder classes known to lay out patch tokens row-major

    def _vit(self, model: nn.Module) -> Any:
        return model.get_submodule(self.root) if self.root else model

    def claims(self, model: nn.Module) -> bool:
        if not self.root:
            return _is_vit(model)
        encoder = getattr(model, self.root, None)
        return type(encoder).__name__ in self.encoders and _is_vit(encoder)

    def refusal(self, model: nn.Module) -> str | None:
        model = self._vit(model)
        if type(model).__name__ in _OTHER_LAYOUTS:
            return _OTHER_LAYOUTS[type(model).__name__]
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
        head_pool = str(getattr(model, "global_pool", "token") or "")
        model = self._vit(model)
        prefix = f"{self.root}." if self.root else ""
        roles = tuple(prefix_roles(model))
        stride = patch_stride(model.patch_embed)  # type: ignore[arg-type]
        layout = TokenLayout(roles=roles, patch_size=stride)
        reader = DropoutReader()
        blocks: Any = model.blocks
        sites = [
            Site(f"{prefix}blocks.{i}.attn", "self", layout, int(blk.attn.num_heads), reader)
            for i, blk in enumerate(blocks)
        ]
        pool: Any = getattr(model, "attn_pool", None)
        if type(pool).__name__ == "AttentionPoolLatent":
            # VisionTransformer may drop the prefix tokens before its pool; EVA's pool sees every token
            keys = roles if getattr(model, "pool_include_prefix", True) else ()
            n = int(pool.latent_len)
            queries = ("pool", *(f"pool{i}" for i in range(1, n)))
            pool_layout = TokenLayout(roles=keys, patch_size=stride, queries=queries)
            sites.append(Site(f"{prefix}attn_pool", "pool", pool_layout, int(pool.num_heads), LatentPoolReader()))
            default = Query(QueryKind.pool)
        elif "cls" in roles and head_pool in ("token", ""):
            default = Query(QueryKind.cls)
        else:
            default = Query(QueryKind.patch_mean)
        return Family(adapter=self.name, sites=tuple(sites), layout=layout, default_query=default)
