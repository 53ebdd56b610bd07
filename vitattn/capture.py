"""Capture stage: scoped hooks that read the attention probabilities of chosen blocks.

A *block* here is one attention site of the model's family (:mod:`vitattn.adapters`): for ViT-like models
``blocks[i].attn`` (then an attention-pool head, if any); for class-attention families their class-attention
blocks. Each site has a reader that knows how its module's probabilities are read: most switch only the
chosen modules to timm's unfused path (``fused_attn = False``) and hook the ``attn_drop`` their softmax
passes through; others recompute ``softmax(q k^T * scale + mask)`` from the module's own parameters on the
input it received (:mod:`vitattn.adapters.readers`). Every other module keeps timm's fused kernel. On exit
the hooks are removed and the flags restored, also when the forward pass raised. A forward pass that
captured nothing from a chosen block raises :class:`CaptureError` instead of yielding empty maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vitattn.errors import CaptureError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitattn.adapters.base import Family

#: Called in the hook with (block index, attention probabilities (B, H, Q, N)); what it returns is kept.
#: Q = N for self-attention; class-attention and attention-pool blocks have Q = their few query tokens.
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
        family: Family | None = None,
    ) -> None:
        """
        Args:
            model: a timm model some adapter reads (:mod:`vitattn.adapters`).
            blocks: non-negative block (site) indices to capture.
            reduce: applied to each block's (B, H, Q, N) probabilities inside the hook; identity if None.
            stop_early: end the forward pass as soon as every chosen block is captured (no logits).
            family: the model's adapter reading (``LoadedModel.family``); None: read from the model
                (:func:`vitattn.adapters.capture_family`).
        """
        if family is None:
            from vitattn.adapters import capture_family

            family = capture_family(model)
        self.model = model
        self.family = family
        self.blocks = sorted(set(blocks))
        self.reduce = reduce
        self.stop_early = stop_early
        self.captured: dict[int, Any] = {}
        self._releases: list[Callable[[], None]] = []
        self._active = False
        depth = len(family.sites)
        bad = [b for b in self.blocks if not 0 <= b < depth]
        if bad:
            raise UsageError(f"block {bad[0]} is out of range: this model has {depth} blocks (0..{depth - 1})")

    def __enter__(self) -> AttentionCapture:
        try:
            for b in self.blocks:
                site = self.family.sites[b]
                module = self.model.get_submodule(site.path)
                self._releases.append(site.reader.attach(module, self._make_hook(b)))
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
        while self._releases:
            self._releases.pop()()  # hooks removed and flags restored, last attached first
        self._active = False

    def _make_hook(self, block: int) -> Callable[[torch.Tensor], None]:
        def hook(attn: torch.Tensor) -> None:
            if block in self.captured:
                raise CaptureError(f"block {block}: attention was computed twice in one forward pass")
            # attn: (B, H, Q, N) probabilities
            self.captured[block] = self.reduce(block, attn) if self.reduce else attn
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
