"""Attention of a batch: preprocessed pictures -> per-block, per-head patch maps and predictions.

This composes the capture and maps stages for one batch; :mod:`vitattn.pipeline` streams many batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitattn.capture import AttentionCapture
from vitattn.errors import CaptureError, UsageError
from vitattn.maps import HeadFusion, Query, parse_query, patch_grid, query_rows
from vitattn.methods import METHODS, GradRolloutReducer, Method, MethodReducer, parse_method
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
        method: ``raw`` (each block's own attention), ``rollout`` or ``grad-rollout`` (from block 0 up to
            each chosen block).
        fuse: how heads are combined: the fused raw map, and each block's heads in ``rollout``.
        discard_ratio: ``rollout`` only: the fraction of each row's lowest entries dropped (never the
            diagonal), in [0, 1).
        target_class: ``grad-rollout`` only: the class explained; None for each image's top-1 class.
    """

    blocks: tuple[int, ...]
    query: Query
    heads: tuple[int, ...]
    top_k: int
    grid: tuple[int, int]
    precision: str = "fp32"
    method: Method = Method.raw
    fuse: HeadFusion = HeadFusion.mean
    discard_ratio: float = 0.0
    target_class: int | None = None


def resolve_settings(
    loaded: LoadedModel,
    *,
    blocks: Sequence[int] = (-1,),
    query: str | None = None,
    heads: Sequence[int] | None = None,
    top_k: int | None = None,
    precision: str = "fp32",
    method: str | Method = Method.raw,
    fuse: str | HeadFusion = HeadFusion.mean,
    discard_ratio: float | None = None,
    target_class: int | str | None = None,
) -> Settings:
    """Validate user choices against the model (UsageError with the valid range otherwise).

    ``discard_ratio`` applies to ``rollout`` only and ``target_class`` (an index, or ``top1``) to
    ``grad-rollout`` only; giving them with another method is a usage error.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if not blocks:
        raise UsageError("no block chosen")
    resolved = tuple(sorted({loaded.resolve_block(b) for b in blocks}))
    grid = loaded.grid
    k = loaded.default_top_k() if top_k is None else top_k
    if k < 0:
        raise UsageError(f"--top-k {k}: must be 0 or more")
    how = parse_method(method)
    return Settings(
        blocks=resolved,
        query=parse_query(query, loaded.layout, grid),
        heads=tuple(loaded.resolve_heads(list(heads) if heads is not None else None)),
        top_k=min(k, loaded.num_classes),
        grid=grid,
        precision=precision,
        method=how,
        fuse=parse_fusion(fuse),
        discard_ratio=_discard_ratio(discard_ratio, how),
        target_class=_target_class(target_class, how, loaded.num_classes),
    )


def parse_fusion(value: str | HeadFusion) -> HeadFusion:
    """``mean``, ``max`` or ``min`` (UsageError otherwise)."""
    try:
        return HeadFusion(value.strip().lower() if isinstance(value, str) else value)
    except ValueError:
        raise UsageError(f"unknown --fuse {value!r}: use mean, max or min") from None


def _discard_ratio(value: float | None, method: Method) -> float:
    if value is None:
        return 0.0
    if method is not Method.rollout:
        raise UsageError(f"--discard-ratio applies to --method rollout only (not {method.value})")
    if not 0.0 <= value < 1.0:
        raise UsageError(f"--discard-ratio {value}: the fraction of each row dropped, at least 0 and below 1")
    return float(value)


def _target_class(value: int | str | None, method: Method, num_classes: int) -> int | None:
    if method is Method.grad_rollout and num_classes <= 0:
        raise UsageError("--method grad-rollout explains a class score, and this model has no classifier head")
    if value is None:
        return None
    if method is not Method.grad_rollout:
        raise UsageError(f"--target-class applies to --method grad-rollout only (not {method.value})")
    text = str(value).strip().lower()
    if text == "top1":
        return None
    try:
        index = int(text)
    except ValueError:
        raise UsageError(f"--target-class {value!r}: a class index or top1") from None
    if not 0 <= index < num_classes:
        raise UsageError(
            f"--target-class {index} is out of range: this model has {num_classes} classes (0..{num_classes - 1})"
        )
    return index


@dataclass
class BlockMaps:
    """One block's attention for one picture.

    Attributes:
        block: non-negative block index.
        heads: (H', gh, gw) float32, the query's raw attention probabilities over the patch tokens, for
            the kept heads (prefix tokens excluded, not renormalised).
        prefix: (H', P) float32, the query's attention to each prefix token.
        head_ids: which heads the rows of ``heads`` are.
        method_map: (gh, gw) float32 with ``rollout`` / ``grad-rollout``: the query's row of the method's
            matrix up to this block, over the patch tokens (prefix excluded, not renormalised); else None.
    """

    block: int
    heads: np.ndarray
    prefix: np.ndarray
    head_ids: tuple[int, ...]
    method_map: np.ndarray | None = None

    def fused(self, how: HeadFusion = HeadFusion.mean) -> np.ndarray:
        """Heads combined into one (gh, gw) map."""
        if how is HeadFusion.mean:
            return self.heads.mean(axis=0)  # type: ignore[no-any-return]
        if how is HeadFusion.max:
            return self.heads.max(axis=0)  # type: ignore[no-any-return]
        return self.heads.min(axis=0)  # type: ignore[no-any-return]


@dataclass
class ImageAttention:
    """Everything computed for one picture.

    Attributes:
        method: what ``BlockMaps.method_map`` holds (``raw``: nothing; the heads are the maps).
        target: with ``grad-rollout``, the class that was explained, with its probability.
    """

    query: Query
    grid: tuple[int, int]
    blocks: dict[int, BlockMaps]
    top: list[Prediction] = field(default_factory=list)
    crop_box: Box | None = None
    method: Method = Method.raw
    target: Prediction | None = None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for bf16/fp16; a no-op for fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def capturing(loaded: LoadedModel, settings: Settings) -> Iterator[AttentionCapture]:
    """A capture scope for the settings, keeping only the query's rows (O(N) per image and head).

    ``raw`` captures the chosen blocks only. ``rollout`` and ``grad-rollout`` capture every block from 0
    up to the last chosen one through the method's reducer (:mod:`vitattn.methods`); the blocks after it
    keep timm's fused kernel.
    """
    layout, query, grid = loaded.layout, settings.query, settings.grid
    factory = METHODS.get(settings.method)
    if factory is not None:
        reducer = factory(
            settings.blocks, query, layout, grid, fuse=settings.fuse, discard_ratio=settings.discard_ratio
        )
        stop = settings.top_k == 0 and not reducer.needs_grad
        with AttentionCapture(loaded.model, reducer.blocks, reduce=reducer, stop_early=stop) as cap:
            yield cap
        return

    def reduce(block: int, attn: torch.Tensor) -> torch.Tensor:
        return query_rows(attn, query, layout, grid).float()  # (B, H, N)

    with AttentionCapture(loaded.model, settings.blocks, reduce=reduce, stop_early=settings.top_k == 0) as cap:
        yield cap


def _run(
    loaded: LoadedModel, cap: AttentionCapture, x: torch.Tensor, settings: Settings
) -> tuple[torch.Tensor | None, dict[int, Any], dict[int, torch.Tensor], torch.Tensor | None]:
    """One forward pass (and a backward pass for grad-rollout).

    Returns:
        logits or None, raw rows (B, H, N) by chosen block, method rows (B, N) by chosen block, and the
        explained classes (B,) for grad-rollout.
    """
    import torch

    reducer = cap.reduce if isinstance(cap.reduce, MethodReducer) else None
    x = x.to(loaded.device, non_blocking=True)
    targets = None
    if isinstance(reducer, GradRolloutReducer):
        # autograd through the full model; only blocks 0..last chosen left the fused path (capturing)
        with torch.enable_grad(), autocast(loaded.device, settings.precision):
            logits, captured = cap.run(x.detach().requires_grad_(True))
            if logits is None:
                raise CaptureError("grad-rollout needs the model's logits: the forward pass must not stop early")
            targets = reducer.backward(logits, settings.target_class)
            logits = logits.detach()
    else:
        with torch.inference_mode(), autocast(loaded.device, settings.precision):
            logits, captured = cap.run(x)
    method_rows = reducer.finish() if reducer is not None else {}
    raw = {b: rows for b, rows in captured.items() if b in settings.blocks}
    return logits, raw, method_rows, targets


def forward_batch(
    loaded: LoadedModel, cap: AttentionCapture, x: torch.Tensor, settings: Settings
) -> list[ImageAttention]:
    """Run one preprocessed batch ``x`` (B, 3, H, W) through the model inside a capture scope."""
    import torch

    layout = loaded.layout
    grid = layout.grid_for((int(x.shape[-2]), int(x.shape[-1])))
    head_index = torch.tensor(settings.heads)
    n = x.shape[0]
    logits, captured, method_rows, targets = _run(loaded, cap, x, settings)
    with torch.inference_mode():
        per_block = {}
        for b, rows in captured.items():
            rows = rows.index_select(1, head_index.to(rows.device))  # (B, H', N)
            maps = patch_grid(rows, layout, grid)  # (B, H', gh, gw)
            prefix = rows[:, :, : layout.num_prefix_tokens]  # (B, H', P)
            per_block[b] = (maps.cpu().numpy(), prefix.cpu().numpy())
        method_maps = {
            b: patch_grid(rows[:, None].float(), layout, grid)[:, 0].cpu().numpy()  # (B, gh, gw)
            for b, rows in method_rows.items()
        }
        labels = loaded.labels

        def prediction(j: int, p: float) -> Prediction:
            return Prediction(j, labels[j] if labels else str(j), round(p, 6))

        probs = logits.float().softmax(dim=-1) if logits is not None else None  # (B, classes)
        tops: list[list[Prediction]] = [[] for _ in range(n)]
        if settings.top_k and probs is not None:
            values, indices = probs.topk(settings.top_k, dim=-1)  # (B, k)
            for i in range(n):
                tops[i] = [
                    prediction(int(j), float(p)) for p, j in zip(values[i].tolist(), indices[i].tolist(), strict=True)
                ]
        explained: list[Prediction | None] = [None] * n
        if targets is not None and probs is not None:
            explained = [prediction(int(t), float(probs[i, int(t)])) for i, t in enumerate(targets.tolist())]
    return [
        ImageAttention(
            query=settings.query,
            grid=grid,
            blocks={
                b: BlockMaps(
                    block=b,
                    heads=maps[i],
                    prefix=prefix[i],
                    head_ids=settings.heads,
                    method_map=method_maps[b][i] if b in method_maps else None,
                )
                for b, (maps, prefix) in per_block.items()
            },
            top=tops[i],
            method=settings.method,
            target=explained[i],
        )
        for i in range(n)
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
    method: str | Method = Method.raw,
    fuse: str | HeadFusion = HeadFusion.mean,
    discard_ratio: float | None = None,
    target_class: int | str | None = None,
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
        method: ``raw``, ``rollout`` (attention rollout) or ``grad-rollout`` (class-specific relevance);
            the latter two fill ``BlockMaps.method_map`` for every chosen block, from one forward pass
            (plus one backward pass for ``grad-rollout``).
        fuse: ``mean``, ``max`` or ``min``: how heads are combined (for ``rollout``, in every block).
        discard_ratio: ``rollout`` only: drop this fraction of each row's lowest entries, in [0, 1).
        target_class: ``grad-rollout`` only: a class index, or None / ``top1`` for each image's top class.

    Returns:
        One :class:`ImageAttention` per picture, with ``crop_box`` set to the region the model saw.
    """
    settings = resolve_settings(
        loaded,
        blocks=blocks,
        query=query,
        heads=heads,
        top_k=top_k,
        precision=precision,
        method=method,
        fuse=fuse,
        discard_ratio=discard_ratio,
        target_class=target_class,
    )
    transform = loaded.transform
    x = to_batch(images, transform)  # (B, 3, H, W)
    with capturing(loaded, settings) as cap:
        results = forward_batch(loaded, cap, x, settings)
    for img, res in zip(images, results, strict=True):
        res.crop_box = crop_box(transform, img.size)
    return results
