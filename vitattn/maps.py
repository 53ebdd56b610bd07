"""Maps stage: pure tensor math from attention probabilities to per-head patch grids.

Notation: B images, H heads, N = P + gh * gw tokens (P prefix tokens first, then patches row-major).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from vitattn.errors import UsageError

if TYPE_CHECKING:
    import torch

    from vitattn.models import TokenLayout

_PATCH_RE = re.compile(r"^patch:(-?\d+),(-?\d+)$")


class HeadFusion(str, Enum):
    """How heads are combined into one map."""

    mean = "mean"
    max = "max"
    min = "min"


@dataclass(frozen=True)
class Query:
    """Whose attention to show: a prefix token (``cls``, ``dist``), the mean over patch queries, or one patch.

    Attributes:
        kind: ``cls``, ``dist``, ``patch-mean`` or ``patch``.
        row, col: the patch for ``patch`` queries (grid coordinates).
    """

    kind: str
    row: int = 0
    col: int = 0

    def __str__(self) -> str:
        return f"patch:{self.row},{self.col}" if self.kind == "patch" else self.kind


def parse_query(text: str | None, layout: TokenLayout, grid: tuple[int, int]) -> Query:
    """Parse ``--query`` for a model; None picks ``cls`` when the model has a class token, else ``patch-mean``.

    Raises:
        UsageError: unknown query, a token the model does not have, or a patch outside the grid.
    """
    if text is None:
        return Query("cls" if layout.has_cls else "patch-mean")
    text = text.strip().lower()
    if text in ("cls", "dist"):
        if layout.index_of(text) is None:
            have = ", ".join(layout.roles) or "none"
            raise UsageError(f"--query {text}: this model has no {text} token (its prefix tokens: {have})")
        return Query(text)
    if text == "patch-mean":
        return Query(text)
    m = _PATCH_RE.match(text)
    if m:
        row, col = int(m.group(1)), int(m.group(2))
        gh, gw = grid
        if not (0 <= row < gh and 0 <= col < gw):
            raise UsageError(f"--query {text}: patch outside the {gh}×{gw} grid (rows 0..{gh - 1}, cols 0..{gw - 1})")
        return Query("patch", row, col)
    raise UsageError(f"unknown --query {text!r}: use cls, dist, patch-mean or patch:R,C")


def query_rows(attn: torch.Tensor, query: Query, layout: TokenLayout, grid: tuple[int, int]) -> torch.Tensor:
    """The query's attention over all tokens.

    Args:
        attn: (B, H, N, N) attention probabilities, rows = queries.
    Returns:
        (B, H, N) probabilities (each row sums to one over N).
    """
    p = layout.num_prefix_tokens
    if query.kind == "patch-mean":
        return attn[:, :, p:, :].mean(dim=2)  # (B, H, N)
    if query.kind == "patch":
        return attn[:, :, p + query.row * grid[1] + query.col, :]  # (B, H, N)
    index = layout.index_of(query.kind)
    if index is None:
        raise UsageError(f"this model has no {query.kind} token")
    return attn[:, :, index, :]  # (B, H, N)


def patch_grid(rows: torch.Tensor, layout: TokenLayout, grid: tuple[int, int]) -> torch.Tensor:
    """Split off the prefix tokens and fold the patch part into the grid; values are not renormalised.

    Args:
        rows: (B, H, N) attention over all tokens.
    Returns:
        (B, H, gh, gw) attention to each patch.
    """
    p = layout.num_prefix_tokens
    gh, gw = grid
    b, h, n = rows.shape
    if n != p + gh * gw:
        raise UsageError(
            f"token count {n} does not match {p} prefix tokens + a {gh}×{gw} patch grid; "
            "is the input size the model's own?"
        )
    return rows[:, :, p:].reshape(b, h, gh, gw)  # (B, H, gh, gw)


def fuse_heads(maps: torch.Tensor, how: HeadFusion = HeadFusion.mean) -> torch.Tensor:
    """Combine heads: (B, H, gh, gw) -> (B, gh, gw)."""
    if how is HeadFusion.mean:
        return maps.mean(dim=1)
    if how is HeadFusion.max:
        return maps.amax(dim=1)
    return maps.amin(dim=1)
