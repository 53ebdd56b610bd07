"""Attention of a batch: preprocessed pictures -> per-block, per-head patch maps and predictions.

This composes the capture and maps stages for one batch; :mod:`vitattn.pipeline` streams many batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitattn.capture import AttentionCapture
from vitattn.errors import CaptureError, UsageError
from vitattn.maps import check_query, patch_grid, query_rows
from vitattn.methods import METHODS, GradRolloutReducer, MethodReducer
from vitattn.options import (
    AttentionOptions,
    HeadFusion,
    Method,
    Precision,
    Query,
    QueryKind,
    RenderOptions,
    parse_choice,
)
from vitattn.preprocess import Box

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from vitattn.models import LoadedModel


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    prob: float


@dataclass(frozen=True)
class Settings:
    """What to compute, resolved and validated against one model (from :class:`AttentionOptions`).

    Attributes:
        blocks: non-negative block indices, ascending.
        query: whose attention (the model's natural query when none was asked for).
        heads: head indices kept.
        top_k: predictions to report (0: none, and the forward pass may stop after the last block).
        grid: (rows, cols) of the chosen blocks' patch grid at the model's input size (a stage's, for Swin).
        precision: forward-pass precision.
        method: ``raw``, ``rollout`` or ``grad-rollout``.
        fuse: how heads are combined: the fused raw map, and each block's heads in ``rollout``.
        discard_ratio: ``rollout`` only: the fraction of each row's lowest entries dropped, in [0, 1).
        target_class: ``grad-rollout`` only: the class explained; None for each image's top-1 class.
        depth: the model's number of blocks (to read negative block indices).
        candidates: the blocks that offer the query (negative indices count from their end).
    """

    blocks: tuple[int, ...]
    query: Query
    heads: tuple[int, ...]
    top_k: int
    grid: tuple[int, int]
    precision: Precision = Precision.fp32
    method: Method = Method.raw
    fuse: HeadFusion = HeadFusion.mean
    discard_ratio: float = 0.0
    target_class: int | None = None
    depth: int = 0
    candidates: tuple[int, ...] = ()


def resolve_settings(loaded: LoadedModel, options: AttentionOptions | None = None) -> Settings:
    """Check the options against the model (UsageError naming the valid range otherwise).

    The query defaults to the family's natural one (:attr:`LoadedModel.default_query`). Blocks are the
    model's attention sites; where only some of them offer the query (class-attention blocks, an
    attention-pool head), negative indices count from the end of those.
    """
    o = options or AttentionOptions()
    query = o.query if o.query is not None else loaded.default_query
    sites = loaded.sites
    offering = tuple(i for i, site in enumerate(sites) if site.layout.offers(query))
    if not offering:
        names = sorted({n for site in sites for n in site.layout.query_names()})
        what = "token" if query.kind in (QueryKind.cls, QueryKind.dist) else "query"
        have = ", ".join(loaded.layout.roles) or "none"
        raise UsageError(
            f"this model has no {query.kind.value} {what} (its prefix tokens: {have}; its queries: {', '.join(names)})",
            option="query",
        )
    if o.blocks is None:
        resolved = offering
    else:
        resolved = tuple(sorted({_resolve_block(loaded, b, query, offering) for b in o.blocks}))
    grids = {b: sites[b].layout.grid_for(loaded.input_size) for b in resolved}  # a stage's, for hierarchies
    if len(set(grids.values())) > 1:
        shown = ", ".join(f"{gh}×{gw}" for gh, gw in sorted(set(grids.values()), reverse=True))
        raise UsageError(
            f"blocks {_spans(resolved)} lie on different grids ({shown}): choose blocks of one stage", option="blocks"
        )
    grid = grids[resolved[0]]
    for b in resolved:  # a patch query is in the blocks' own grid
        check_query(query, sites[b].layout, grid)
    if o.method is not Method.raw:
        _check_method(loaded, o.method, resolved)
    k = loaded.default_top_k() if o.top_k is None else o.top_k
    if o.method is Method.grad_rollout and loaded.num_classes <= 0:
        raise UsageError("grad-rollout explains a class score, and this model has no classifier head", option="method")
    if o.target_class is not None and o.target_class >= loaded.num_classes:
        n = loaded.num_classes
        raise UsageError(
            f"target class {o.target_class} is out of range: this model has {n} classes (0..{n - 1})",
            option="target_class",
        )
    heads = _resolve_heads(loaded, o.heads, resolved)
    return Settings(
        blocks=resolved,
        query=query,
        heads=heads,
        top_k=min(k, loaded.num_classes),
        grid=grid,
        precision=o.precision,
        method=o.method,
        fuse=o.fuse,
        discard_ratio=o.discard_ratio or 0.0,
        target_class=o.target_class,
        depth=loaded.depth,
        candidates=offering,
    )


def _resolve_block(loaded: LoadedModel, block: int, query: Query, offering: tuple[int, ...]) -> int:
    """A block index as a site index; negatives count from the end of the blocks offering the query."""
    if block < 0 and len(offering) < loaded.depth:
        if -len(offering) <= block:
            return offering[block]
        raise UsageError(
            f"block {block} is out of range: {len(offering)} blocks of this model offer the {query} query "
            f"(-{len(offering)}..-1, or {_spans(offering)})",
            option="blocks",
        )
    index = loaded.resolve_block(block)
    if index not in offering:
        site = loaded.sites[index]
        raise UsageError(
            f"block {block} ({site.path}, {site.kind} attention) has no {query} query "
            f"(it offers {', '.join(site.layout.query_names())}; blocks {_spans(offering)} offer {query})",
            option="blocks",
        )
    return index


def _resolve_heads(loaded: LoadedModel, heads: tuple[int, ...] | None, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """Head indices valid in every chosen block (all of them when None; the blocks must then agree)."""
    counts = sorted({loaded.sites[b].heads for b in blocks})
    if heads is None:
        if len(counts) > 1:
            raise UsageError(
                f"blocks {_spans(blocks)} have different numbers of heads ({', '.join(map(str, counts))}): "
                "choose blocks of one kind, or the heads to show",
                option="heads",
            )
        return tuple(range(counts[0]))
    n = counts[0]
    bad = [h for h in heads if not 0 <= h < n]
    if bad:
        raise UsageError(
            f"head {bad[0]} is out of range: the chosen blocks have {n} heads (0..{n - 1})", option="heads"
        )
    return tuple(dict.fromkeys(heads))


def _spans(indices: tuple[int, ...]) -> str:
    """``0..11, 13`` for (0, 1, ..., 11, 13)."""
    spans: list[str] = []
    start = prev = indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(str(start) if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(spans)


def _check_method(loaded: LoadedModel, method: Method, blocks: tuple[int, ...]) -> None:
    """Rollout and grad-rollout chain blocks 0..last chosen: each must be self-attention over one token set."""
    sites = loaded.sites[: max(blocks) + 1]
    for b, site in enumerate(sites):
        if site.kind != "self" or site.layout != sites[0].layout:
            raise UsageError(
                f"{method.value} is not defined at block {b} of this model ({site.path}, {site.kind} attention): "
                "it chains self-attention blocks over one token set; use the raw method there",
                option="method",
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

    ``result[b]`` is block ``b``'s :class:`BlockMaps`, with ``b`` as the caller gave it (``-1``: the last
    block); ``result.blocks`` holds them by non-negative index.

    Attributes:
        method: what ``BlockMaps.method_map`` holds (``raw``: nothing; the heads are the maps).
        target: with ``grad-rollout``, the class that was explained, with its probability.
        crop_box: the region of ``photo`` the model saw, in its pixels (left, top, right, bottom).
        depth: the model's number of blocks.
        photo: the picture the maps belong to, when it was given as a picture.
        candidates: the blocks that offer the query; negative indices count from their end.
    """

    query: Query
    grid: tuple[int, int]
    blocks: dict[int, BlockMaps]
    top: list[Prediction] = field(default_factory=list)
    crop_box: Box | None = None
    method: Method = Method.raw
    target: Prediction | None = None
    depth: int = 0
    photo: Image.Image | None = field(default=None, repr=False)
    candidates: tuple[int, ...] = ()

    def __getitem__(self, block: int) -> BlockMaps:
        if block < 0 and self.candidates and -len(self.candidates) <= block:
            index = self.candidates[block]
        else:
            index = block % self.depth if self.depth and -self.depth <= block < 0 else block
        if index not in self.blocks:
            have = ", ".join(str(b) for b in self.blocks)
            raise KeyError(f"block {block} was not computed (computed: {have})")
        return self.blocks[index]

    def overlay(
        self,
        photo: Image.Image | None = None,
        *,
        block: int = -1,
        head: int | HeadFusion | str = HeadFusion.mean,
        cmap: str = RenderOptions.cmap,
        alpha: float = RenderOptions.alpha,
        max_side: int = RenderOptions.max_side,
    ) -> Image.Image:
        """One map drawn over the picture, the model's crop box mapped onto it.

        Args:
            photo: the picture to draw on; None: the one the maps were computed from.
            block: which block, as given to :func:`vitattn.explain` (negatives count from the end).
            head: a head index, or ``mean`` / ``max`` / ``min`` for the fused heads; with rollout or
                grad-rollout, ``method`` draws the method's map.
            cmap: any matplotlib colormap.
            alpha: heat opacity.
            max_side: long side of the picture drawn, in pixels (0: the photo's own size).
        """
        from vitattn.colors import colormap_lut, scale_maps
        from vitattn.overlays import overlay

        picture = photo if photo is not None else self.photo
        if picture is None:
            raise UsageError("no picture to draw on: pass the photo the maps were computed from", option="photo")
        bm = self[block]
        if head == "method":
            if bm.method_map is None:
                raise UsageError(f"block {block} has no {self.method.value} map", option="head")
            heat = bm.method_map
        elif isinstance(head, int):
            if head not in bm.head_ids:
                raise UsageError(f"head {head} was not computed (computed: {list(bm.head_ids)})", option="head")
            heat = bm.heads[bm.head_ids.index(head)]
        else:
            heat = bm.fused(parse_choice(HeadFusion, head, "head"))
        scaled = scale_maps(heat[None], shared=False)[0]  # (gh, gw) in [0, 1]
        box = _crop_box_for(picture.size, self.crop_box, self.photo)
        return overlay(picture, scaled, crop_box=box, lut=colormap_lut(cmap), alpha=alpha, max_side=max_side)


def _crop_box_for(size: tuple[int, int], box: Box | None, source: Image.Image | None) -> Box:
    """The crop box (in ``source`` pixels) scaled onto a copy of the picture of this size (e.g. the full-size
    original); the whole picture when there is no box."""
    w, h = size
    if box is None or source is None:
        return (0.0, 0.0, float(w), float(h))
    sx, sy = w / source.width, h / source.height
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Autocast for bf16/fp16; a no-op for fp32."""
    import torch

    if precision is Precision.fp32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision is Precision.bf16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def capturing(loaded: LoadedModel, settings: Settings) -> Iterator[AttentionCapture]:
    """A capture scope for the settings, keeping only the query's rows (O(N) per image and head).

    ``raw`` captures the chosen blocks only. ``rollout`` and ``grad-rollout`` capture every block from 0
    up to the last chosen one through the method's reducer (:mod:`vitattn.methods`); the blocks after it
    keep timm's fused kernel.
    """
    query, grid, sites, family = settings.query, settings.grid, loaded.sites, loaded.family
    factory = METHODS.get(settings.method)
    if factory is not None:
        layout = sites[0].layout  # one token set for every chained block (resolve_settings checked)
        reducer = factory(
            settings.blocks, query, layout, grid, fuse=settings.fuse, discard_ratio=settings.discard_ratio
        )
        stop = settings.top_k == 0 and not reducer.needs_grad
        with AttentionCapture(loaded.model, reducer.blocks, reduce=reducer, stop_early=stop, family=family) as cap:
            yield cap
        return

    def reduce(block: int, attn: torch.Tensor) -> torch.Tensor:
        keys = sites[block].layout
        return query_rows(attn, query, keys, keys.grid_for(loaded.input_size)).float()  # (B, H, N)

    stop = settings.top_k == 0
    with AttentionCapture(loaded.model, settings.blocks, reduce=reduce, stop_early=stop, family=family) as cap:
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

    input_hw = (int(x.shape[-2]), int(x.shape[-1]))
    grid = loaded.sites[settings.blocks[0]].layout.grid_for(input_hw)  # every chosen block's (resolve_settings)
    head_index = torch.tensor(settings.heads)
    n = x.shape[0]
    logits, captured, method_rows, targets = _run(loaded, cap, x, settings)
    with torch.inference_mode():
        per_block = {}
        for b, rows in captured.items():
            keys = loaded.sites[b].layout  # the tokens this block attends over
            rows = rows.index_select(1, head_index.to(rows.device))  # (B, H', N)
            maps = patch_grid(rows, keys, grid)  # (B, H', gh, gw)
            prefix = rows[:, :, : keys.num_prefix_tokens]  # (B, H', P)
            per_block[b] = (maps.cpu().numpy(), prefix.cpu().numpy())
        method_maps = {
            b: patch_grid(rows[:, None].float(), loaded.sites[b].layout, grid)[:, 0].cpu().numpy()  # (B, gh, gw)
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
            depth=settings.depth,
            candidates=settings.candidates,
        )
        for i in range(n)
    ]
