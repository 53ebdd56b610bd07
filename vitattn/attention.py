"""Attention of a batch: preprocessed pictures -> per-block, per-head patch maps and predictions.

This composes the capture and maps stages for one batch; :mod:`vitattn.pipeline` streams many batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitattn.capture import AttentionCapture
from vitattn.errors import UsageError
from vitattn.maps import HeadFusion, Query, parse_query, patch_grid, query_rows
from vitattn.preprocess import Box, crop_box, to_batch

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from vitattn.models import LoadedModel

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    prob: float


@dataclass(frozen=True)
class Settings:
    """What to compute, resolved and validated against one model.

    Attributes:
        blocks: non-negative block indices.
        query: whose attention.
        heads: head indices kept.
        top_k: predictions to report (0: none, and the forward pass may stop after the last block).
        grid: (rows, cols) of the patch grid at the model's input size.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
    """

    blocks: tuple[int, ...]
    query: Query
    heads: tuple[int, ...]
    top_k: int
    grid: tuple[int, int]
    precision: str = "fp32"


def resolve_settings(
    loaded: LoadedModel,
    *,
    blocks: Sequence[int] = (-1,),
    query: str | None = None,
    heads: Sequence[int] | None = None,
    top_k: int | None = None,
    precision: str = "fp32",
) -> Settings:
    """Validate user choices against the model (UsageError with the valid range otherwise)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if not blocks:
        raise UsageError("no block chosen")
    resolved = tuple(sorted({loaded.resolve_block(b) for b in blocks}))
    grid = loaded.grid
    k = loaded.default_top_k() if top_k is None else top_k
    if k < 0:
        raise UsageError(f"--top-k {k}: must be 0 or more")
    return Settings(
        blocks=resolved,
        query=parse_query(query, loaded.layout, grid),
        heads=tuple(loaded.resolve_heads(list(heads) if heads is not None else None)),
        top_k=min(k, loaded.num_classes),
        grid=grid,
        precision=precision,
    )


@dataclass
class BlockMaps:
    """One block's attention for one picture.

    Attributes:
        block: non-negative block index.
        heads: (H', gh, gw) float32, the query's raw attention probabilities over the patch tokens, for
            the kept heads (prefix tokens excluded, not renormalised).
        prefix: (H', P) float32, the query's attention to each prefix token.
        head_ids: which heads the rows of ``heads`` are.
    """

    block: int
    heads: np.ndarray
    prefix: np.ndarray
    head_ids: tuple[int, ...]

    def fused(self, how: HeadFusion = HeadFusion.mean) -> np.ndarray:
        """Heads combined into one (gh, gw) map."""
        if how is HeadFusion.mean:
            return self.heads.mean(axis=0)  # type: ignore[no-any-return]
        if how is HeadFusion.max:
            return self.heads.max(axis=0)  # type: ignore[no-any-return]
        return self.heads.min(axis=0)  # type: ignore[no-any-return]


@dataclass
class ImageAttention:
    """Everything computed for one picture."""

    query: Query
    grid: tuple[int, int]
    blocks: dict[int, BlockMaps]
    top: list[Prediction] = field(default_factory=list)
    crop_box: Box | None = None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for bf16/fp16; a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def capturing(loaded: LoadedModel, settings: Settings) -> Iterator[AttentionCapture]:
    """A capture scope for the settings' blocks, keeping only the query's rows (O(N) per image and head)."""
    layout, query, grid = loaded.layout, settings.query, settings.grid

    def reduce(block: int, attn: torch.Tensor) -> torch.Tensor:
        return query_rows(attn, query, layout, grid).float()  # (B, H, N)

    with AttentionCapture(loaded.model, settings.blocks, reduce=reduce, stop_early=settings.top_k == 0) as cap:
        yield cap


def forward_batch(
    loaded: LoadedModel, cap: AttentionCapture, x: torch.Tensor, settings: Settings
) -> list[ImageAttention]:
    """Run one preprocessed batch ``x`` (B, 3, H, W) through the model inside a capture scope."""
    import torch

    layout = loaded.layout
    grid = layout.grid_for((int(x.shape[-2]), int(x.shape[-1])))
    head_index = torch.tensor(settings.heads)
    with torch.inference_mode(), autocast(loaded.device, settings.precision):
        logits, captured = cap.run(x.to(loaded.device, non_blocking=True))
        per_block = {}
        for b, rows in captured.items():
            rows = rows.index_select(1, head_index.to(rows.device))  # (B, H', N)
            maps = patch_grid(rows, layout, grid)  # (B, H', gh, gw)
            prefix = rows[:, :, : layout.num_prefix_tokens]  # (B, H', P)
            per_block[b] = (maps.cpu().numpy(), prefix.cpu().numpy())
        tops: list[list[Prediction]] = [[] for _ in range(x.shape[0])]
        if settings.top_k and logits is not None:
            probs = logits.float().softmax(dim=-1)  # (B, classes)
            values, indices = probs.topk(settings.top_k, dim=-1)  # (B, k)
            labels = loaded.labels
            for i in range(x.shape[0]):
                tops[i] = [
                    Prediction(int(j), labels[int(j)] if labels else str(int(j)), round(float(p), 6))
                    for p, j in zip(values[i].tolist(), indices[i].tolist(), strict=True)
                ]
    return [
        ImageAttention(
            query=settings.query,
            grid=grid,
            blocks={
                b: BlockMaps(block=b, heads=maps[i], prefix=prefix[i], head_ids=settings.heads)
                for b, (maps, prefix) in per_block.items()
            },
            top=tops[i],
        )
        for i in range(x.shape[0])
    ]


def compute_attention(
    loaded: LoadedModel,
    images: Sequence[Image.Image],
    *,
    blocks: Sequence[int] = (-1,),
    query: str | None = None,
    heads: Sequence[int] | None = None,
    top_k: int | None = 0,
    precision: str = "fp32",
) -> list[ImageAttention]:
    """Attention maps for upright RGB pictures, preprocessed with the model's own transform.

    Args:
        loaded: from :func:`vitattn.load_model`.
        images: PIL RGB pictures (apply EXIF orientation first, e.g. with :func:`vitattn.load_image`).
        blocks: block indices (negatives count from the end).
        query: ``cls``, ``dist``, ``patch-mean`` or ``patch:R,C``; None picks the model's default.
        heads: head indices to keep (None: all).
        top_k: predictions to report; None picks the model's default (5 for an ImageNet head).
        precision: ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        One :class:`ImageAttention` per picture, with ``crop_box`` set to the region the model saw.
    """
    settings = resolve_settings(loaded, blocks=blocks, query=query, heads=heads, top_k=top_k, precision=precision)
    transform = loaded.transform
    x = to_batch(images, transform)  # (B, 3, H, W)
    with capturing(loaded, settings) as cap:
        results = forward_batch(loaded, cap, x, settings)
    for img, res in zip(images, results, strict=True):
        res.crop_box = crop_box(transform, img.size)
    return results
