"""What an adapter says about a model: its attention sites, each site's token layout, how probabilities are read.

A *site* is one attention module whose probabilities vitattn can read, in forward order; sites are what
``--block`` indexes. Every site attends over image tokens laid out as prefix tokens first, then the patch
grid row-major (:class:`TokenLayout`). Its queries are either every token (self-attention) or a few named
tokens (class attention: ``cls``; an attention-pool head: ``pool``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vitattn.options import Query, QueryKind

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Receives one forward pass's attention probabilities of a site: (B, H, Q, N), rows = queries.
Deliver = Callable[["torch.Tensor"], None]


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in a block's sequence: prefix tokens first, then patches row-major.

    Attributes:
        roles: one name per prefix token, in sequence order: ``cls``, ``dist``, ``reg0``, ``reg1``...
        patch_size: (height, width) in input pixels of the image area one patch token covers (its stride:
            for hybrids, the backbone's reduction times the patch size).
        queries: None when every token is a query (self-attention). Otherwise the roles of the few query
            tokens, in row order (class attention: ``("cls",)``; an attention-pool head: ``("pool",)``).
    """

    roles: tuple[str, ...]
    patch_size: tuple[int, int]
    queries: tuple[str, ...] | None = None

    @property
    def num_prefix_tokens(self) -> int:
        return len(self.roles)

    def index_of(self, role: str) -> int | None:
        """Sequence index of the prefix token with this role, or None if the model has none."""
        return self.roles.index(role) if role in self.roles else None

    @property
    def has_cls(self) -> bool:
        return "cls" in self.roles

    def grid_for(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of this (height, width) in pixels."""
        return input_hw[0] // self.patch_size[0], input_hw[1] // self.patch_size[1]

    def offers(self, query: Query) -> bool:
        """True when this layout has a row for ``query``."""
        if self.queries is not None:
            return query.kind.value in self.queries
        if query.kind in (QueryKind.patch, QueryKind.patch_mean):
            return True
        return self.index_of(query.kind.value) is not None

    def query_names(self) -> tuple[str, ...]:
        """The queries this layout offers, as typed on the command line."""
        if self.queries is not None:
            return self.queries
        return (*(r for r in ("cls", "dist") if r in self.roles), "patch-mean", "patch:R,C")


class Reader(Protocol):
    """How one attention module's probabilities are read inside a capture scope."""

    def attach(self, module: nn.Module, deliver: Deliver) -> Callable[[], None]:
        """Start reading ``module``'s probabilities (each forward pass calls ``deliver`` once); returns a
        function that undoes everything this did (hooks removed, flags restored)."""
        ...


@dataclass(frozen=True)
class Site:
    """One attention module whose probabilities are read.

    Attributes:
        path: the module's name in the model (``blocks.3.attn``), for ``model.get_submodule``.
        kind: ``self`` (every token asks), ``class`` (class attention) or ``pool`` (attention-pool head).
        layout: the tokens it attends over, and its query tokens.
        heads: its number of heads.
        reader: how its probabilities are read.
    """

    path: str
    kind: str
    layout: TokenLayout
    heads: int
    reader: Reader


@dataclass(frozen=True)
class Family:
    """An adapter's reading of one model.

    Attributes:
        adapter: the adapter's name (``vit``, ``class-attention``...).
        sites: the attention sites in forward order (what ``--block`` indexes).
        layout: the model's image tokens: prefix roles and patch stride (the grid the maps are drawn on).
        default_query: the family's natural query.
    """

    adapter: str
    sites: tuple[Site, ...]
    layout: TokenLayout
    default_query: Query


class Adapter(Protocol):
    """Per-family knowledge: which models it reads, and how (see :mod:`vitattn.adapters`)."""

    name: str

    def claims(self, model: nn.Module) -> bool:
        """True when this adapter is the one for ``model`` (decided from its structure, cheaply)."""
        ...

    def refusal(self, model: nn.Module) -> str | None:
        """Why a model this adapter claims cannot be read (one line), or None."""
        ...

    def family(self, model: nn.Module) -> Family:
        """The sites and layout of a model this adapter claims and does not refuse."""
        ...


def patch_stride(patch_embed: nn.Module) -> tuple[int, int]:
    """The input pixels per patch token: image size over grid size when both are known (hybrids: the
    backbone's reduction times its patch size), else the patch size."""

    def pair(v: object) -> tuple[int, int]:
        if isinstance(v, (tuple, list)):
            return int(v[0]), int(v[1])
        return int(v), int(v)  # type: ignore[call-overload]

    img, grid = getattr(patch_embed, "img_size", None), getattr(patch_embed, "grid_size", None)
    if img is not None and grid is not None:
        (ih, iw), (gh, gw) = pair(img), pair(grid)
        if gh > 0 and gw > 0 and ih % gh == 0 and iw % gw == 0:
            return ih // gh, iw // gw
    return pair(patch_embed.patch_size)
