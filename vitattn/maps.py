"""Maps stage: pure tensor math from attention probabilities to patch grids: per-head rows, head fusion,
attention rollout, gradient-weighted relevance, mass masks.

Notation: B images, H heads, N = P + gh * gw tokens (P prefix tokens first, then patches row-major).
Matrices are row-stochastic with rows = queries: ``A[i, j]`` is how much token i takes from token j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vitattn.errors import UsageError
from vitattn.options import HeadFusion, Query, QueryKind

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vitattn.models import TokenLayout


def check_query(query: Query | None, layout: TokenLayout, grid: tuple[int, int]) -> Query:
    """The query for a block of this layout: None picks ``cls`` when there is a class token, else ``patch-mean``
    (a model's natural query is its adapter's: :attr:`vitattn.models.LoadedModel.default_query`).

    Raises:
        UsageError: a token the block does not have, or a patch outside the grid.
    """
    if query is None:
        if layout.queries is not None:
            return Query(QueryKind(layout.queries[0]))
        return Query(QueryKind.cls if layout.has_cls else QueryKind.patch_mean)
    if not layout.offers(query):
        if layout.queries is not None:
            raise UsageError(f"query {query}: only {', '.join(layout.queries)} ask in this block", option="query")
        have = ", ".join(layout.roles) or "none"
        raise UsageError(f"this model has no {query.kind.value} token (its prefix tokens: {have})", option="query")
    if query.kind is QueryKind.patch:
        gh, gw = grid
        if not (0 <= query.row < gh and 0 <= query.col < gw):
            raise UsageError(
                f"{query}: patch outside the {gh}×{gw} grid (rows 0..{gh - 1}, cols 0..{gw - 1})", option="query"
            )
    return query


def query_rows(attn: torch.Tensor, query: Query, layout: TokenLayout, grid: tuple[int, int]) -> torch.Tensor:
    """The query's attention over all tokens.

    Args:
        attn: (B, H, Q, N) attention probabilities, rows = queries: Q = N for self-attention, else the
            layout's few query tokens (``layout.queries``: class attention, attention pool).
    Returns:
        (B, H, N) probabilities (each row sums to one over N).
    """
    if layout.queries is not None:
        if query.kind.value not in layout.queries:
            raise UsageError(f"query {query}: only {', '.join(layout.queries)} ask in this block", option="query")
        return attn[:, :, layout.queries.index(query.kind.value), :]  # (B, H, N)
    p = layout.num_prefix_tokens
    if query.kind is QueryKind.patch_mean:
        return attn[:, :, p:, :].mean(dim=2)  # (B, H, N)
    if query.kind is QueryKind.patch:
        return attn[:, :, p + query.row * grid[1] + query.col, :]  # (B, H, N)
    index = layout.index_of(query.kind.value)
    if index is None:
        raise UsageError(f"this model has no {query.kind.value} token", option="query")
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
    """Combine heads (dimension 1): (B, H, ...) -> (B, ...), e.g. (B, H, gh, gw) or (B, H, N, N)."""
    if how is HeadFusion.mean:
        return maps.mean(dim=1)
    if how is HeadFusion.max:
        return maps.amax(dim=1)
    return maps.amin(dim=1)


def query_weights(
    query: Query, layout: TokenLayout, grid: tuple[int, int], *, device: torch.device | None = None
) -> torch.Tensor:
    """The query as token weights ``w`` (N,): ``w @ M`` is the query's row of any (N, N) matrix ``M``.

    One-hot on the token for ``cls``, ``dist`` and ``patch:R,C``; uniform over the patch tokens for
    ``patch-mean`` (the mean of the patch rows), so :func:`query_rows` and ``w @ M`` agree.
    """
    import torch

    if layout.queries is not None:
        raise UsageError("token weights need a block where every token asks (self-attention)", option="query")
    p = layout.num_prefix_tokens
    gh, gw = grid
    w = torch.zeros(p + gh * gw, dtype=torch.float32, device=device)  # (N,)
    if query.kind is QueryKind.patch_mean:
        w[p:] = 1.0 / (gh * gw)
    elif query.kind is QueryKind.patch:
        w[p + query.row * gw + query.col] = 1.0
    else:
        index = layout.index_of(query.kind.value)
        if index is None:
            raise UsageError(f"this model has no {query.kind.value} token", option="query")
        w[index] = 1.0
    return w


def renormalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Scale every row of (..., N, N) to sum to one (rows must have a positive sum)."""
    return matrix / matrix.sum(dim=-1, keepdim=True)  # (..., N, N)


def discard_lowest(matrix: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of every row, never the diagonal (a token's own entry).

    Of the N - 1 entries of a row off the diagonal, the ``floor(ratio * (N - 1))`` smallest become 0
    (ties broken by position). Rows are not renormalised here.

    Args:
        matrix: (B, N, N) non-negative weights.
        ratio: in [0, 1).
    Returns:
        (B, N, N), a new tensor unless ``ratio`` drops nothing.
    """
    import torch

    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"discard ratio {ratio}: must be at least 0 and below 1", option="discard_ratio")
    n = matrix.shape[-1]
    k = int(ratio * (n - 1))
    if k == 0:
        return matrix
    scores = matrix.clone()  # (B, N, N)
    scores.diagonal(dim1=-2, dim2=-1).fill_(torch.inf)  # the diagonal is never among the lowest
    kth = scores.kthvalue(k, dim=-1, keepdim=True).values  # (B, N, 1) the k-th smallest of each row
    below = scores < kth  # (B, N, N)
    tied = scores == kth  # (B, N, N) near-uniform attention has exact ties in float32
    room = k - below.sum(dim=-1, keepdim=True, dtype=torch.int32)  # (B, N, 1) tied entries still to drop
    drop = below | (tied & (tied.cumsum(dim=-1, dtype=torch.int32) <= room))  # the first ties by position
    return matrix.masked_fill(drop, 0.0)  # (B, N, N)


def rollout_step(
    rollout: torch.Tensor | None,
    attn: torch.Tensor,
    *,
    fuse: HeadFusion = HeadFusion.mean,
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """One block of attention rollout (Abnar & Zuidema, 2020), in float32.

    The block's heads are fused, the lowest ``discard_ratio`` of each row dropped (never the diagonal),
    the identity added for the residual path and every row renormalised: ``Â = norm(drop(fuse(A)) + I)``.
    The result is ``Â @ rollout`` (later blocks on the left), or ``Â`` for the first block.

    Args:
        rollout: (B, N, N) rollout up to the previous block, or None before the first block.
        attn: (B, H, N, N) this block's attention probabilities.
    Returns:
        (B, N, N) row-stochastic rollout up to this block.
    """
    import torch

    a = fuse_heads(attn.float(), fuse)  # (B, N, N)
    a = discard_lowest(a, discard_ratio)  # (B, N, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (N, N)
    a = renormalize_rows(a + eye)  # (B, N, N)
    return a if rollout is None else a @ rollout.float()  # (B, N, N)


def attention_rollout(
    attns: Sequence[torch.Tensor], *, fuse: HeadFusion = HeadFusion.mean, discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout over blocks given in forward order: [(B, H, N, N)] -> (B, N, N)."""
    rollout = None
    for attn in attns:
        rollout = rollout_step(rollout, attn, fuse=fuse, discard_ratio=discard_ratio)
    if rollout is None:
        raise ValueError("attention_rollout needs at least one block")
    return rollout


def relevance_weights(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted attention of one block (Chefer, Gur & Wolf, 2021): ``Ā = mean_h (∇A ⊙ A)⁺``.

    Args:
        attn: (B, H, N, N) attention probabilities of the block.
        grad: (B, H, N, N) gradient of the target score with respect to that same block's ``attn``.
    Returns:
        (B, N, N) non-negative weights.
    """
    return (grad.float() * attn.float()).clamp(min=0).mean(dim=1)  # (B, N, N)


def grad_rollout(attns: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Class-specific relevance over blocks in forward order: ``R = I; R ← R + Ā_b R`` for each block b.

    Args:
        attns: [(B, H, N, N)] attention probabilities, block 0 first.
        grads: [(B, H, N, N)] the gradient of the target score with respect to each block's attention, paired
            by position with ``attns``.
    Returns:
        (B, N, N) relevance matrix.
    """
    import torch

    if len(attns) != len(grads) or not attns:
        raise ValueError("grad_rollout needs one gradient per block, and at least one block")
    b, _, n, _ = attns[0].shape
    r = torch.eye(n, dtype=torch.float32, device=attns[0].device).expand(b, n, n)  # (B, N, N)
    for attn, grad in zip(attns, grads, strict=True):
        r = r + relevance_weights(attn, grad) @ r  # (B, N, N)
    return r


def relevance_row_step(row: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The row form of one :func:`grad_rollout` step, applied from the last block backwards.

    ``R_c = (I + Ā_c) ... (I + Ā_0)``, so the query's row ``w R_c`` is built by starting from ``w`` at block
    c and right-multiplying by ``(I + Ā_b)`` for b = c, c - 1, ..., 0: the order in which backward
    delivers the gradients, with O(N) state per image instead of an (N, N) matrix.

    Args:
        row: (B, N) the row so far.
        weights: (B, N, N) block b's :func:`relevance_weights` ``Ā_b``.
    Returns:
        (B, N) ``row + row @ Ā_b``.
    """
    return row + (row.float().unsqueeze(1) @ weights).squeeze(1)  # (B, N)


def mass_mask(heat: np.ndarray, mass: float) -> np.ndarray:
    """The smallest set of cells holding at least ``mass`` of the map's total (non-negative) mass.

    Cells are taken from the largest down (ties by position) until their sum reaches ``mass`` times
    the total; negative values count as 0. A map with no mass gives an empty mask.

    Args:
        heat: (gh, gw) map, e.g. one head's attention over the patches.
        mass: fraction in (0, 1].
    Returns:
        (gh, gw) bool.
    """
    import numpy as np

    if not 0.0 < mass <= 1.0:
        raise UsageError(
            f"threshold {mass}: a fraction of the attention mass, above 0 and at most 1", option="threshold"
        )
    values = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=0.0), 0.0, None)  # (gh, gw)
    flat = values.ravel()
    order = np.argsort(-flat, kind="stable")  # largest first
    cumulative = np.cumsum(flat[order])
    keep = np.zeros(flat.shape, dtype=bool)
    total = cumulative[-1] if cumulative.size else 0.0
    if total <= 0:
        return keep.reshape(values.shape)
    target = mass * total * (1.0 - 1e-12)  # float noise in the running sum must not add a cell
    count = int(np.searchsorted(cumulative, target, side="left")) + 1
    keep[order[: min(count, flat.size)]] = True
    return keep.reshape(values.shape)
