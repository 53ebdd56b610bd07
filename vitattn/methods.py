"""Methods stage: explanations beyond one block's raw attention, as stateful capture reducers.

A method is a reducer for :class:`~vitattn.capture.AttentionCapture`. The capture feeds it the attention
probabilities of every block from 0 up to the last chosen one, in forward order; the reducer keeps only
what the method needs and, for each chosen block, fills ``rows[block]``: the query's row (B, N) of the
method's matrix after that block. For chosen blocks it also returns the query's raw per-head rows
(B, H, N), which the capture keeps (head statistics and the grid picture), so nothing of size N×N per
block outlives the hook. The math lives in :mod:`vitattn.maps`; adding a method is adding a reducer to
:data:`METHODS`.

- ``rollout`` (Abnar & Zuidema, 2020) holds one (B, N, N) matrix, updated block by block.
- ``grad-rollout`` (Chefer, Gur & Wolf, 2021) needs the gradient of the target score with respect to each
  block's attention. A tensor hook registered on each block's attention in its forward hook, keyed by
  that block's index, receives exactly that block's gradient; backward delivers them from the last block
  to the first, and the relevance rows are built in that order (O(N) per image and chosen block).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from vitattn.errors import CaptureError
from vitattn.maps import (
    query_rows,
    query_weights,
    relevance_row_step,
    relevance_weights,
    rollout_step,
)
from vitattn.options import HeadFusion, Method, Query

if TYPE_CHECKING:
    import torch

    from vitattn.models import TokenLayout


def _no_autocast(device: torch.device) -> AbstractContextManager[Any]:
    """The method's math in float32 even inside an autocast region."""
    import torch

    return torch.autocast(device_type=device.type, enabled=False)


class MethodReducer:
    """Shared skeleton: order checks, raw rows of the chosen blocks, the per-block method rows.

    Attributes:
        chosen: the chosen blocks, ascending.
        blocks: every block the capture must see: 0 up to the last chosen one.
        rows: after a pass, the query's row (B, N) of the method's matrix, by chosen block.
    """

    needs_grad: ClassVar[bool] = False
    rows: dict[int, torch.Tensor]
    _next: int

    def __init__(
        self,
        chosen: Sequence[int],
        query: Query,
        layout: TokenLayout,
        grid: tuple[int, int],
        *,
        fuse: HeadFusion = HeadFusion.mean,
        discard_ratio: float = 0.0,
    ) -> None:
        if not chosen:
            raise ValueError("no block chosen")
        self.chosen = tuple(sorted(set(chosen)))
        self.blocks = tuple(range(self.chosen[-1] + 1))
        self.query, self.layout, self.grid = query, layout, grid
        self.fuse = fuse
        self.discard_ratio = discard_ratio
        self.reset()

    def __call__(self, block: int, attn: torch.Tensor) -> torch.Tensor | None:
        """The capture hook's reducer: ``attn`` (B, H, N, N) of ``block``; returns raw rows of chosen blocks."""
        if block == 0:
            self.reset()
        if block != self._next:
            raise CaptureError(f"{self.name}: attention of block {block} arrived before block {self._next}'s")
        self._next = block + 1
        self._update(block, attn)
        if block not in self.chosen:
            return None
        return query_rows(attn.detach(), self.query, self.layout, self.grid).float()  # (B, H, N)

    @property
    def name(self) -> str:
        return type(self).__name__

    def reset(self) -> None:
        """Forget the previous pass (called at block 0)."""
        self.rows = {}
        self._next = 0

    def _update(self, block: int, attn: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> dict[int, torch.Tensor]:
        """The rows of every chosen block after a complete pass (CaptureError when some are missing)."""
        missing = [b for b in self.chosen if b not in self.rows]
        if missing:
            raise CaptureError(f"{self.name}: no result for block(s) {missing}")
        rows, self.rows = self.rows, {}
        return rows


class RolloutReducer(MethodReducer):
    """Attention rollout, computed during the forward pass with one (B, N, N) matrix per batch.

    Attributes:
        matrix: (B, N, N) the rollout up to the last block seen.
    """

    matrix: torch.Tensor | None

    def reset(self) -> None:
        super().reset()
        self.matrix = None

    def _update(self, block: int, attn: torch.Tensor) -> None:
        import torch

        with torch.no_grad(), _no_autocast(attn.device):
            previous, self.matrix = self.matrix, None  # drop the old matrix before making the new one
            self.matrix = rollout_step(
                previous, attn.detach(), fuse=self.fuse, discard_ratio=self.discard_ratio
            )  # (B, N, N)
            del previous
            if block in self.chosen:
                rows = query_rows(self.matrix[:, None], self.query, self.layout, self.grid)  # (B, 1, N)
                self.rows[block] = rows[:, 0]  # (B, N)


class GradRolloutReducer(MethodReducer):
    """Class-specific relevance: forward hooks keep each block's attention and hook its gradient.

    Call :meth:`backward` with the logits of the same pass; it back-propagates the target score and the
    tensor hooks, one per block and bound to that block's index, build the relevance rows.
    """

    needs_grad = True

    _attn: dict[int, torch.Tensor]  # the forward's attention, until its gradient arrives
    _partial: dict[int, torch.Tensor]  # chosen block -> (B, N) row being built
    _grad_next: int  # the block whose gradient backward must deliver next

    def reset(self) -> None:
        super().reset()
        self._attn = {}
        self._partial = {}
        self._grad_next = -1

    def _update(self, block: int, attn: torch.Tensor) -> None:
        if not attn.requires_grad:
            raise CaptureError(
                "grad-rollout needs a forward pass with gradients (not under torch.no_grad or inference_mode)"
            )
        self._attn[block] = attn
        attn.register_hook(functools.partial(self._on_grad, block))  # type: ignore[no-untyped-call]
        self._grad_next = block

    def _on_grad(self, block: int, grad: torch.Tensor) -> None:
        """Tensor hook of ``block``'s attention: ``grad`` is d(score)/d(attention of this very block)."""
        import torch

        if block != self._grad_next:
            raise CaptureError(f"grad-rollout: gradient of block {block} arrived before block {self._grad_next}'s")
        attn = self._attn.pop(block)  # (B, H, N, N)
        with torch.no_grad(), _no_autocast(grad.device):
            weights = relevance_weights(attn.detach(), grad)  # (B, N, N)
            if block in self.chosen:
                w = query_weights(self.query, self.layout, self.grid, device=grad.device)  # (N,)
                self._partial[block] = w.expand(grad.shape[0], -1)  # (B, N)
            for c, row in self._partial.items():
                self._partial[c] = relevance_row_step(row, weights)  # (B, N)
        self._grad_next = block - 1
        if block == 0:
            self.rows = self._partial
            self._partial = {}

    def backward(self, logits: torch.Tensor, target_class: int | None = None) -> torch.Tensor:
        """Back-propagate each image's target score; returns the targets (B,).

        Args:
            logits: (B, classes) from the forward pass that fed this reducer.
            target_class: one class for every image, or None for each image's top-1 class.
        """
        import torch

        if 0 not in self._attn:
            raise CaptureError("grad-rollout: backward() before a forward pass through block 0")
        if target_class is None:
            targets = logits.detach().argmax(dim=-1)  # (B,)
        else:
            targets = torch.full((logits.shape[0],), target_class, dtype=torch.long, device=logits.device)
        score = logits.float().gather(1, targets[:, None]).sum()  # images are independent: one backward
        torch.autograd.grad(score, [self._attn[0]])  # the tensor hooks do the work; parameters get no .grad
        if self._grad_next != -1 or self._attn:
            raise CaptureError(f"grad-rollout: no gradient reached block(s) {sorted(self._attn)}")
        return targets


#: The registry: method -> reducer class. ``raw`` needs none (the capture keeps query rows directly).
METHODS: dict[Method, type[MethodReducer]] = {
    Method.rollout: RolloutReducer,
    Method.grad_rollout: GradRolloutReducer,
}
