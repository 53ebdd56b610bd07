"""Every choice and default of vitattn, defined once: enums for choices, frozen dataclasses for options.

The CLI uses these types and defaults directly (a bad choice fails while the command line is parsed, before
a model loads), and the library takes them as typed arguments. Options that can be checked without a model
are checked in ``__post_init__``; what depends on the model (block and head ranges, which prefix tokens
exist, the patch grid) is checked by :func:`vitattn.attention.resolve_settings`.

No torch, timm or matplotlib here: ``vitattn --help`` imports this module.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

from vitattn.errors import UsageError

DEFAULT_MODEL = "deit_small_distilled_patch16_224"
"""The model used when none is named."""

DEFAULT_OUT = Path("vitattn-out")
"""The output folder used when none is named."""

DEFAULT_MAX_PIXELS = 89_478_485
"""Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), in pixels."""

DEFAULT_EXPLORE_BUDGET = 24_000_000
"""The largest explorer page (``explore.html``), in bytes: 24 MB."""


class Method(str, Enum):
    """What a map shows."""

    raw = "raw"  # one block's attention, per head
    rollout = "rollout"  # attention rollout from block 0 up to the block
    grad_rollout = "grad-rollout"  # class-specific gradient-weighted relevance up to the block


class HeadFusion(str, Enum):
    """How heads are combined into one map."""

    mean = "mean"
    max = "max"
    min = "min"


class Precision(str, Enum):
    """Numeric precision of the forward pass (bf16 and fp16 run under autocast)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ImageFormat(str, Enum):
    """File format of the written pictures."""

    png = "png"
    jpg = "jpg"
    webp = "webp"


class QueryKind(str, Enum):
    """Whose attention a map shows."""

    cls = "cls"  # the class token's row
    dist = "dist"  # the distillation token's row
    pool = "pool"  # an attention-pool head's latent query (``global_pool='map'``)
    patch_mean = "patch-mean"  # the mean over every patch's row
    patch = "patch"  # one patch's row


_PATCH_RE = re.compile(r"^patch:(-?\d+),(-?\d+)$")


@dataclass(frozen=True)
class Query:
    """Whose attention to show: a prefix token (``cls``, ``dist``), an attention-pool head's latent query
    (``pool``), the mean over patch queries, or one patch.

    Attributes:
        kind: the query's kind.
        row, col: the patch for ``patch`` queries (grid coordinates).
    """

    kind: QueryKind
    row: int = 0
    col: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", QueryKind(self.kind))

    def __str__(self) -> str:
        return f"patch:{self.row},{self.col}" if self.kind is QueryKind.patch else self.kind.value

    @classmethod
    def parse(cls, text: str | Query) -> Query:
        """``cls``, ``dist``, ``pool``, ``patch-mean`` or ``patch:R,C`` (UsageError otherwise); no model needed."""
        if isinstance(text, Query):
            return text
        value = text.strip().lower()
        m = _PATCH_RE.match(value)
        if m:
            return cls(QueryKind.patch, int(m.group(1)), int(m.group(2)))
        try:
            kind = QueryKind(value)
        except ValueError:
            kind = QueryKind.patch  # "patch" alone has no coordinates
        if kind is QueryKind.patch:
            raise UsageError(f"unknown query {text!r}: use cls, dist, pool, patch-mean or patch:R,C", option="query")
        return cls(kind)


E = TypeVar("E", bound=Enum)


def parse_choice(enum: type[E], value: object, option: str) -> E:
    """One of an enum's values, given as the enum or its text in any case (UsageError otherwise)."""
    try:
        return enum(value.strip().lower() if isinstance(value, str) else value)
    except ValueError:
        names = ", ".join(str(m.value) for m in enum)
        raise UsageError(f"unknown {option.replace('_', ' ')} {value!r}: use {names}", option=option) from None


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load, with which weights, where.

    Attributes:
        spec: a timm model name, ``hf-hub:ORG/NAME``, ``local-dir:PATH``, or ``demo`` (the bundled model).
        weights: a local checkpoint to load instead of the pretrained weights.
        pretrained: fetch the pretrained weights; False gives seeded random weights (meaningless maps).
        device: ``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    """

    spec: str = DEFAULT_MODEL
    weights: str | None = None
    pretrained: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.weights is not None:
            object.__setattr__(self, "weights", os.fspath(self.weights))
            if not self.pretrained:
                raise UsageError("a weights file and random weights contradict each other", option="weights")
        if not self.spec.strip():
            raise UsageError("empty model name", option="model")


@dataclass(frozen=True)
class AttentionOptions:
    """What to compute for each picture. Model-dependent checks happen in ``resolve_settings``.

    Attributes:
        blocks: block indices, negatives counting from the end; None: every block.
        query: whose attention; None: the model's natural query (``cls`` when the head reads a class token,
            ``pool`` with an attention-pool head, else ``patch-mean``).
        heads: head indices kept; None: all.
        method: ``raw`` (each block's own attention), ``rollout`` or ``grad-rollout`` (block 0 up to each
            chosen block).
        fuse: how heads are combined: the fused map, and every block's heads in ``rollout``.
        discard_ratio: ``rollout`` only: drop this fraction of each row's lowest entries, in [0, 1).
        target_class: ``grad-rollout`` only: the class explained; None: each image's top-1 class.
        top_k: predictions to report; None: 5 for an ImageNet head, else up to 5 when the labels are known,
            else 0. With 0 the forward pass may stop after the last captured block.
        precision: ``fp32``, or ``bf16`` / ``fp16`` under autocast.
    """

    blocks: tuple[int, ...] | None = (-1,)
    query: Query | None = None
    heads: tuple[int, ...] | None = None
    method: Method = Method.raw
    fuse: HeadFusion = HeadFusion.mean
    discard_ratio: float | None = None
    target_class: int | None = None
    top_k: int | None = None
    precision: Precision = Precision.fp32

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.blocks is not None:
            blocks = (self.blocks,) if isinstance(self.blocks, int) else tuple(int(b) for b in self.blocks)
            if not blocks:
                raise UsageError("no block chosen", option="blocks")
            set_(self, "blocks", blocks)
        if self.heads is not None:
            heads = (self.heads,) if isinstance(self.heads, int) else tuple(int(h) for h in self.heads)
            if not heads:
                raise UsageError("no head chosen", option="heads")
            set_(self, "heads", heads)
        if self.query is not None:
            set_(self, "query", Query.parse(self.query))
        method = parse_choice(Method, self.method, "method")
        set_(self, "method", method)
        set_(self, "fuse", parse_choice(HeadFusion, self.fuse, "fuse"))
        set_(self, "precision", parse_choice(Precision, self.precision, "precision"))
        if self.discard_ratio is not None:
            if method is not Method.rollout:
                raise UsageError(
                    f"a discard ratio applies to rollout only (not {method.value})", option="discard_ratio"
                )
            if not 0.0 <= self.discard_ratio < 1.0:
                raise UsageError(
                    f"discard ratio {self.discard_ratio}: the fraction of each row dropped, at least 0 and below 1",
                    option="discard_ratio",
                )
        if self.target_class is not None:
            if method is not Method.grad_rollout:
                raise UsageError(
                    f"a target class applies to grad-rollout only (not {method.value})", option="target_class"
                )
            if self.target_class < 0:
                raise UsageError(f"target class {self.target_class}: a class index is 0 or more", option="target_class")
        if self.heads is not None and method is not Method.raw:
            raise UsageError(
                f"choosing heads applies to raw maps only: {method.value} fuses every head of every block",
                option="heads",
            )
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"top-k {self.top_k}: must be 0 or more", option="top_k")


@dataclass(frozen=True)
class RenderOptions:
    """How maps are drawn and which files are written.

    Attributes:
        out: output root folder (a string or a path).
        cmap: matplotlib colormap name.
        alpha: heat opacity over the photo, 0..1.
        max_side: long side of written overlays in pixels (0: the photo's own size).
        shared_scale: one colour scale across heads (else each head spans its own range).
        npy: also write the raw arrays.
        format: picture file format.
        fuse: how heads are combined for the drawn fused map; None: the attention options' ``fuse``.
        threshold: also draw, for each head and the fused map (or the method's map), the smallest set of
            patches holding this fraction of the map's mass over the patches, in (0, 1]; None: no masks.
    """

    out: Path = DEFAULT_OUT
    cmap: str = "inferno"
    alpha: float = 0.6
    max_side: int = 512
    shared_scale: bool = False
    npy: bool = False
    format: ImageFormat = ImageFormat.png
    fuse: HeadFusion | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "out", Path(self.out))
        fmt = self.format.lower().replace("jpeg", "jpg") if isinstance(self.format, str) else self.format
        set_(self, "format", parse_choice(ImageFormat, fmt, "format"))
        if self.fuse is not None:
            set_(self, "fuse", parse_choice(HeadFusion, self.fuse, "fuse"))
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise UsageError(f"alpha {self.alpha}: the heat opacity, from 0 to 1", option="alpha")
        if self.max_side < 0:
            raise UsageError(f"max side {self.max_side}: 0 (the photo's own size) or more pixels", option="max_side")
        if self.threshold is not None and not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise UsageError(
                f"threshold {self.threshold}: the fraction of a map's mass to outline, above 0 and at most 1",
                option="threshold",
            )


class Engine(str, Enum):
    """What runs the batches of a run."""

    local = "local"  # this process: threads decode, the model runs, threads write (vitattn.scheduler)
    ray = "ray"  # a Ray cluster: one model replica per actor (vitattn.ray_engine); needs vitattn[ray]


def parse_ray_workers(value: int | str | tuple[int, int] | None) -> tuple[int, int] | None:
    """Model replicas on Ray: ``N`` (fixed), ``MIN-MAX`` (autoscaled between), or None (as many as the
    cluster's resources allow). UsageError otherwise."""
    if value is None or isinstance(value, tuple):
        bounds = value
    elif isinstance(value, int):
        bounds = (value, value)
    else:
        low, sep, high = value.strip().partition("-")
        try:
            bounds = (int(low), int(high)) if sep else (int(low), int(low))
        except ValueError:
            raise UsageError(f"{value!r}: a number of workers N, or MIN-MAX", option="ray_workers") from None
    if bounds is not None and not 1 <= bounds[0] <= bounds[1]:
        raise UsageError(f"{value!r}: at least 1 worker, and MIN at most MAX", option="ray_workers")
    return bounds


def _default_workers() -> int:
    """Threads per side stage (load, write): 2 on a small machine, up to 8 where cores allow (GPU hosts)."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class RunOptions:
    """How a run over many inputs behaves.

    Attributes:
        batch_size: pictures per forward pass.
        overwrite: redo inputs whose outputs exist.
        fail_fast: stop at the first failed input.
        max_pixels: the largest picture accepted, in pixels; None: no limit.
        decode_workers, render_workers: threads that decode ahead of the model and write behind it.
        engine: what runs the batches: this process, or a Ray cluster.
        ray_address: the Ray cluster to use; None: ``RAY_ADDRESS``, else a local Ray started for the run.
        ray_workers: model replicas on Ray, (MIN, MAX) (autoscaled between; equal: fixed); None: as many as
            the cluster's CPUs (or GPUs, with ``ray_gpus_per_worker``) allow.
        ray_gpus_per_worker: GPUs each replica reserves (fractions share a GPU); 0: CPU replicas.
    """

    batch_size: int = 16
    overwrite: bool = False
    fail_fast: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_workers: int = field(default_factory=_default_workers)
    render_workers: int = field(default_factory=_default_workers)
    engine: Engine = Engine.local
    ray_address: str | None = None
    ray_workers: tuple[int, int] | None = None
    ray_gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", parse_choice(Engine, self.engine, "engine"))
        object.__setattr__(self, "ray_workers", parse_ray_workers(self.ray_workers))
        if not (math.isfinite(self.ray_gpus_per_worker) and self.ray_gpus_per_worker >= 0):
            raise UsageError(
                f"GPUs per worker {self.ray_gpus_per_worker}: 0 (CPU workers) or more", option="ray_gpus_per_worker"
            )
        if self.batch_size < 1:
            raise UsageError(f"batch size {self.batch_size}: at least 1", option="batch_size")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise UsageError(f"max pixels {self.max_pixels}: at least 1 (None: no limit)", option="max_pixels")
        if self.decode_workers < 1 or self.render_workers < 1:
            raise UsageError("at least one decode and one render worker", option="workers")


@dataclass(frozen=True)
class InputOptions:
    """Where the inputs come from.

    Attributes:
        paths: image files, folders, or ``-`` for a list of paths on stdin.
        recursive: descend into sub-folders.
        null_separated: the stdin list is NUL-separated (``find -print0``), else one path a line.
    """

    paths: tuple[str, ...] = ("-",)
    recursive: bool = False
    null_separated: bool = False

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))
        if not self.paths:
            raise UsageError("no inputs", option="inputs")


DEFAULT_STATS_OUT = Path("vitattn-stats")
"""The report folder of ``vitattn stats`` when none is named."""


@dataclass(frozen=True)
class StatsOptions:
    """Where a dataset-statistics report goes and how it is kept.

    Attributes:
        out: the report folder (``heads.csv``, ``stats.json``, plots, ``partial/``).
        classes: the most frequent top-1 classes given a mean map of their own (and the overall map).
        checkpoint_seconds: how often the running sums are saved to ``partial/`` during a run (and always at
            its end or interruption), in seconds.
        overwrite: start afresh, discarding the statistics in ``out``; otherwise a rerun adds only the
            inputs that are not counted yet.
        plots: draw the plots.
    """

    out: Path = DEFAULT_STATS_OUT
    classes: int = 20
    checkpoint_seconds: float = 60.0
    overwrite: bool = False
    plots: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.classes < 0:
            raise UsageError(f"classes {self.classes}: 0 or more", option="classes")
        if not (math.isfinite(self.checkpoint_seconds) and self.checkpoint_seconds > 0):
            raise UsageError(
                f"checkpoint interval {self.checkpoint_seconds}: a positive number of seconds",
                option="checkpoint_seconds",
            )
