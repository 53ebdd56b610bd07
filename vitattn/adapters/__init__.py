"""The adapter registry: per-family knowledge of where attention is and how to read it.

An adapter (:class:`~vitattn.adapters.base.Adapter`) claims a model from its structure, may refuse it with
one line, and otherwise describes it as a :class:`~vitattn.adapters.base.Family`: its attention sites in
forward order (what ``--block`` indexes), each with its token layout and reader, and the family's natural
query. The first adapter in :data:`ADAPTERS` that claims a model is the one used; adding a family is adding
an adapter here (and its reference test in ``tests/test_families.py`` or ``tests/test_windows.py``).

| adapter         | models                                | sites                         | natural query           |
|-----------------|---------------------------------------|-------------------------------|-------------------------|
| class-attention | CaiT, XCiT                            | the class-attention blocks    | cls                     |
| swin            | Swin v1, v2                           | layers[s].blocks[j] (windows) | patch-mean              |
| vit-encoder     | Qwen3-ViT, DeepSeek-ViT classifiers   | encoder.blocks[i].attn        | patch-mean              |
| vit             | ViT, DeiT, BEiT, EVA, relpos, hybrids | blocks[i].attn (+ attn_pool)  | cls, pool or patch-mean |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitattn.adapters.base import Adapter, Family, Site, TokenLayout
from vitattn.adapters.classattn import ClassAttentionAdapter
from vitattn.adapters.readers import DropoutReader
from vitattn.adapters.vit import VitAdapter
from vitattn.adapters.windows import SwinAdapter
from vitattn.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ADAPTERS", "Adapter", "Family", "Site", "TokenLayout", "capture_family", "read_family", "support"]

#: In order: the first adapter that claims a model reads it.
ADAPTERS: tuple[Adapter, ...] = (
    ClassAttentionAdapter(),
    SwinAdapter(),
    VitAdapter("vit-encoder", root="encoder", encoders=("Qwen3VitEncoder", "DeepseekVitEncoder")),
    VitAdapter(),
)

_ATTENTION_NAMES = ("attention", "attn", "mhsa", "gpsa")


def has_attention_layers(model: nn.Module) -> bool:
    """True when some submodule looks like an attention layer (its class name, or a ``fused_attn`` flag)."""
    for m in model.modules():
        name = type(m).__name__.lower()
        if hasattr(m, "fused_attn") or any(a in name for a in _ATTENTION_NAMES):
            return True
    return False


def support(model: nn.Module) -> tuple[Adapter | None, str | None]:
    """The adapter that reads ``model`` and None, or None and the reason it is not read (one line)."""
    for adapter in ADAPTERS:
        if adapter.claims(model):
            why = adapter.refusal(model)
            return (None, why) if why else (adapter, None)
    if not has_attention_layers(model):
        return None, "it has no attention layers (a convolutional or MLP network)"
    from vitattn.coverage import NOT_YET

    entry = NOT_YET.get(type(model).__module__.rsplit(".", 1)[-1])
    return None, entry[0] if entry else f"its attention ({type(model).__name__}) has no adapter yet"


def read_family(model: nn.Module, name: str = "") -> Family:
    """The family reading of ``model``.

    Raises:
        UnsupportedModelError: no adapter reads it (the message says why, in one line).
    """
    adapter, why = support(model)
    if adapter is None:
        label = name or type(model).__name__
        raise UnsupportedModelError(f"{label} is not supported: {why}; see `vitattn models --all`")
    return adapter.family(model)


def capture_family(model: nn.Module) -> Family:
    """What :class:`~vitattn.capture.AttentionCapture` reads when it is given no family: the adapter's
    reading, or for any other module whose ``blocks[i].attn`` pass their softmax through ``attn_drop``
    (timm-style blocks in a hand-built model), those modules in order (token layout unknown).

    Raises:
        UnsupportedModelError: neither applies.
    """
    adapter, why = support(model)
    if adapter is not None:
        return adapter.family(model)
    blocks = getattr(model, "blocks", None)
    attns = [getattr(b, "attn", None) for b in blocks] if blocks is not None else []
    if not attns or not all(hasattr(a, "attn_drop") for a in attns):
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: {why}; see `vitattn models --all`")
    unknown = TokenLayout(roles=(), patch_size=(1, 1))
    reader = DropoutReader()
    sites = tuple(
        Site(f"blocks.{i}.attn", "self", unknown, int(getattr(a, "num_heads", 0)), reader) for i, a in enumerate(attns)
    )
    from vitattn.options import Query, QueryKind

    return Family(adapter="blocks", sites=sites, layout=unknown, default_query=Query(QueryKind.patch_mean))
