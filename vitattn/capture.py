"""Capture stage: scoped hooks that read the attention probabilities of chosen blocks.

How it works, for every supported family (vit, deit, beit, eva, relpos...): timm's attention modules
compute ``softmax(q k^T * scale + bias)`` and pass it through ``self.attn_drop`` on their unfused path.
Inside the scope, only the chosen blocks are switched to that path (``fused_attn = False``) and a forward
hook on their ``attn_drop`` reads the probabilities; every other block keeps timm's fused kernel. On exit
the hooks are removed and the flags restored, also when the forward pass raised. A forward pass that
captured nothing from a chosen block raises :class:`CaptureError` instead of yielding empty maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vitattn.errors import CaptureError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Called in the hook with (block index, attention probabilities (B, H, N, N)); what it returns is kept.
#: Reducing here (e.g. to one query row) keeps memory at O(N) per image instead of O(N^2).
Reducer = Callable[[int, "torch.Tensor"], Any]


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once every wanted block is captured."""


class AttentionCapture:
    """Context manager capturing attention probabilities of chosen blocks during forward passes.

    Example:
        >>> with AttentionCapture(model, [11], reduce=lambda b, a: a[:, :, 0]) as cap:
        ...     logits, captured = cap.run(x)   # captured[11]: (B, H, N) CLS rows
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[int],
        *,
        reduce: Reducer | None = None,
        stop_early: bool = False,
    ) -> None:
        """
        Args:
            model: a timm ViT-style model with ``model.blocks[i].attn.attn_drop``.
            blocks: non-negative block indices to capture.
            reduce: applied to each block's (B, H, N, N) probabilities inside the hook; identity if None.
            stop_early: end the forward pass as soon as every chosen block is captured (no logits).
        """
        self.model = model
        self.blocks = sorted(set(blocks))
        self.reduce = reduce
        self.stop_early = stop_early
        self.captured: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._saved_fused: dict[int, Any] = {}
        self._active = False

    def __enter__(self) -> AttentionCapture:
        all_blocks: Any = self.model.blocks
        try:
            for b in self.blocks:
                attn = all_blocks[b].attn
                if hasattr(attn, "fused_attn"):
                    self._saved_fused[b] = attn.fused_attn
                    attn.fused_attn = False
                hook = attn.attn_drop.register_forward_hook(self._make_hook(b))
                self._handles.append(hook)
        except BaseException:
            self._release()
            raise
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()  # never swallows: returns None

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        all_blocks: Any = self.model.blocks
        for b, fused in self._saved_fused.items():
            all_blocks[b].attn.fused_attn = fused
        self._saved_fused.clear()
        self._active = False

    def _make_hook(self, block: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if block in self.captured:
                raise CaptureError(f"block {block}: attention was computed twice in one forward pass")
            # output: (B, H, N, N) probabilities (attn_drop is the identity in eval mode)
            self.captured[block] = self.reduce(block, output) if self.reduce else output
            if self.stop_early and len(self.captured) == len(self.blocks):
                raise _StopForward

        return hook

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor | None, dict[int, Any]]:
        """One forward pass of ``x`` (B, C, H, W). Returns (logits or None if stopped early, captured by block).

        Raises:
            CaptureError: a chosen block produced no attention probabilities (e.g. a custom fused path).
        """
        if not self._active:
            raise RuntimeError("AttentionCapture.run() must be called inside its `with` block")
        self.captured = {}
        logits: torch.Tensor | None
        try:
            logits = self.model(x)
        except _StopForward:
            logits = None
        missing = [b for b in self.blocks if b not in self.captured]
        if missing:
            raise CaptureError(
                f"no attention was captured from block(s) {missing}: the attention module of "
                f"{type(self.model).__name__} did not run its unfused softmax path"
            )
        captured, self.captured = self.captured, {}
        return logits, captured
