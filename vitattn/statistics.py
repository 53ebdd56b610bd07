"""Dataset statistics: per-block, per-head attention statistics as exactly mergeable running sums.

Two parts. :class:`StatsReducer` is a capture reducer: inside the hook it turns one block's attention
probabilities (B, H, N, N) into a few numbers per image and head, so nothing of size N×N outlives the hook.
:class:`StatsState` accumulates those numbers over any number of images as sums, sums of squares, counts
and histograms (never averages of averages), so two states merge exactly and a run can be cut, saved and
resumed anywhere.

Definitions (per block and head, for one image; N = P prefix tokens + M = gh·gw patches):

- ``distance_px`` / ``distance_patches``: mean attention distance (Dosovitskiy et al. 2021, Fig. 7).
  For each patch query q, its attention over the patch keys k is renormalised to sum to one over the
  patches, and ``d_q = Σ_k a_qk ‖c_q − c_k‖`` with c the patch centres, in input pixels or in patches
  (grid steps). The image's value is the mean of ``d_q`` over all M patch queries.
- ``entropy``: entropy of the query's (class token's, else the mean patch query's) attention over the
  patches, renormalised over them, divided by ``log M``: 0 for one patch, 1 for uniform (as ``head_stats``).
- ``query_prefix_mass``: the query's attention to all prefix tokens.
- ``prefix_mass``: the mean over patch queries of their attention to all prefix tokens, and
  ``prefix_mass_cls`` / ``prefix_mass_dist`` / ``prefix_mass_reg`` to the class token, the distillation
  token and all register tokens.
- sink: the grid position of the peak of the query's attention over the patches, counted per position;
  ``sink_share`` is the largest count over the images (the share of images whose peak is that patch).

Over the images each statistic has a mean, a (population) standard deviation and a count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitattn.errors import UsageError
from vitattn.maps import query_rows
from vitattn.options import Query

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vitattn.models import TokenLayout

#: Prefix-token groups reported separately: a role name -> the group whose mass it adds to.
PREFIX_GROUPS = ("cls", "dist", "reg")

STATE_VERSION = 1


def prefix_group(role: str) -> str:
    """``cls`` -> ``cls``, ``dist`` -> ``dist``, ``reg0``, ``reg1``... -> ``reg``."""
    return "reg" if role.startswith("reg") else role


def stat_names(roles: Sequence[str]) -> tuple[str, ...]:
    """The per-image statistics for a model with these prefix tokens, in report order."""
    names = ["distance_px", "distance_patches", "entropy"]
    if roles:
        names += ["query_prefix_mass", "prefix_mass"]
        groups = dict.fromkeys(prefix_group(r) for r in roles)
        names += [f"prefix_mass_{g}" for g in groups]
    return tuple(names)


def distance_matrices(grid: tuple[int, int], patch_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances between patch centres (M, M), row-major patches: (in patches, in input pixels), float32."""
    import torch

    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # (M,) row of each patch
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)  # (M,) column of each patch
    dr = rows[:, None] - rows[None, :]  # (M, M)
    dc = cols[:, None] - cols[None, :]  # (M, M)
    patches = torch.sqrt(dr**2 + dc**2)  # (M, M)
    pixels = torch.sqrt((dr * patch_size[0]) ** 2 + (dc * patch_size[1]) ** 2)  # (M, M)
    return patches.float(), pixels.float()


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mean attention distance of each image and head.

    Args:
        attn: (B, H, N, N) attention probabilities, rows = queries, N = P + M.
        distances: (M, M) distance between patch centres.
        num_prefix: P.
    Returns:
        (B, H): the mean over patch queries of the attention-weighted distance to the patch keys, the
        attention renormalised over the patch keys.
    """
    pp = attn[:, :, num_prefix:, num_prefix:]  # (B, H, M, M) patch queries -> patch keys
    mass = pp.sum(dim=-1)  # (B, H, M)
    weighted = (pp * distances).sum(dim=-1)  # (B, H, M)
    return (weighted / mass.clamp_min(1e-30)).mean(dim=-1)  # (B, H)


def normalised_entropy(rows: torch.Tensor) -> torch.Tensor:
    """Entropy of (..., M) non-negative weights renormalised to sum to one, divided by log M, in [0, 1]."""
    import torch

    m = rows.shape[-1]
    p = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-30)  # (..., M)
    nats = -torch.special.xlogy(p, p).sum(dim=-1)  # (...)
    return nats / math.log(m) if m > 1 else torch.zeros_like(nats)


class StatsReducer:
    """Capture reducer: one block's (B, H, N, N) attention -> per-image statistics (small tensors).

    For each captured block it returns a dict of float32 CPU-bound tensors: every name of
    :func:`stat_names` -> (B, H), ``peak`` -> (B, H) int64 patch index, and for ``map_block`` also
    ``map`` -> (B, M), the query's attention over the patches, mean over heads.
    """

    def __init__(
        self, layout: TokenLayout, grid: tuple[int, int], query: Query, *, map_block: int | None = None
    ) -> None:
        self.layout, self.grid, self.query = layout, grid, query
        self.map_block = map_block
        self.names = stat_names(layout.roles)
        self._distances: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        roles = layout.roles
        self._groups = {g: [i for i, r in enumerate(roles) if prefix_group(r) == g] for g in PREFIX_GROUPS}

    def _dist(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._distances:
            patches, pixels = distance_matrices(self.grid, self.layout.patch_size)
            self._distances[device] = (patches.to(device), pixels.to(device))
        return self._distances[device]

    def __call__(self, block: int, attn: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        p = self.layout.num_prefix_tokens
        gh, gw = self.grid
        if attn.shape[-1] != p + gh * gw:
            raise UsageError(
                f"token count {attn.shape[-1]} does not match {p} prefix tokens + a {gh}×{gw} patch grid; "
                "is the input size the model's own?"
            )
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad(), torch.autocast(device_type=attn.device.type, enabled=False):
            a = attn.detach().float()  # (B, H, N, N)
            d_patches, d_pixels = self._dist(a.device)
            out["distance_patches"] = mean_attention_distance(a, d_patches, p)  # (B, H)
            ph, pw = self.layout.patch_size
            if ph == pw:
                out["distance_px"] = out["distance_patches"] * ph  # (B, H)
            else:
                out["distance_px"] = mean_attention_distance(a, d_pixels, p)  # (B, H)
            row = query_rows(a, self.query, self.layout, self.grid)  # (B, H, N)
            patches = row[:, :, p:]  # (B, H, M)
            out["entropy"] = normalised_entropy(patches)  # (B, H)
            if p:
                out["query_prefix_mass"] = row[:, :, :p].sum(dim=-1)  # (B, H)
                to_prefix = a[:, :, p:, :p].mean(dim=2)  # (B, H, P) mean over patch queries
                out["prefix_mass"] = to_prefix.sum(dim=-1)  # (B, H)
                for g, idx in self._groups.items():
                    if idx:
                        out[f"prefix_mass_{g}"] = to_prefix[:, :, idx].sum(dim=-1)  # (B, H)
            out["peak"] = patches.argmax(dim=-1)  # (B, H)
            if block == self.map_block:
                out["map"] = patches.mean(dim=1)  # (B, M)
        return {k: v.cpu() for k, v in out.items()}


@dataclass
class StatsState:
    """Running sums over images: small, picklable, exactly mergeable (sums and counts only).

    Attributes:
        blocks: the blocks, ascending (non-negative indices).
        heads: heads per block.
        grid: (gh, gw) patch grid.
        names: the statistics (:func:`stat_names`).
        images: images added.
        sums, squares: (S, L, H) float64 sums of each statistic and of its square, S = len(names).
        peaks: (L, H, M) int64, images whose query attention peaks at each patch.
        map_sum: (M,) float64, sum of the fused query map over all images.
        class_count: top-1 class -> images predicted as it.
        class_sum: top-1 class -> (M,) float64 sum of its images' fused query maps.
    """

    blocks: tuple[int, ...]
    heads: int
    grid: tuple[int, int]
    names: tuple[str, ...]
    images: int = 0
    sums: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]
    squares: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]
    peaks: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]
    map_sum: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]
    class_count: dict[int, int] = field(default_factory=dict)
    class_sum: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        import numpy as np

        self.blocks = tuple(int(b) for b in self.blocks)
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        self.names = tuple(self.names)
        s, nb, h, m = len(self.names), len(self.blocks), self.heads, self.grid[0] * self.grid[1]
        if self.sums is None:
            self.sums = np.zeros((s, nb, h), np.float64)
        if self.squares is None:
            self.squares = np.zeros((s, nb, h), np.float64)
        if self.peaks is None:
            self.peaks = np.zeros((nb, h, m), np.int64)
        if self.map_sum is None:
            self.map_sum = np.zeros(m, np.float64)

    @property
    def key(self) -> tuple[Any, ...]:
        """What two states must share to merge."""
        return (self.blocks, self.heads, self.grid, self.names)

    @classmethod
    def like(cls, other: StatsState) -> StatsState:
        """An empty state of the same shape."""
        return cls(other.blocks, other.heads, other.grid, other.names)

    # -- adding -------------------------------------------------------------------------------
    def add(
        self,
        captured: Mapping[int, Mapping[str, torch.Tensor]],
        top1: Sequence[int] | None = None,
        keep: Sequence[bool] | None = None,
    ) -> None:
        """Add one batch: ``captured[block]`` as :class:`StatsReducer` returns it; ``top1`` (B,) classes.

        Args:
            keep: (B,) which images to add (others are left out, e.g. non-finite); None: all.
        """
        import numpy as np

        first = captured[self.blocks[0]]
        n = int(first["peak"].shape[0])
        mask = np.ones(n, bool) if keep is None else np.asarray(keep, bool)  # (B,)
        if not mask.any():
            return
        m = self.grid[0] * self.grid[1]
        for li, b in enumerate(self.blocks):
            c = captured[b]
            for si, name in enumerate(self.names):
                v = c[name].double().numpy()[mask]  # (B', H)
                self.sums[si, li] += v.sum(axis=0)
                self.squares[si, li] += (v * v).sum(axis=0)
            peak = c["peak"].numpy()[mask]  # (B', H)
            for h in range(self.heads):
                self.peaks[li, h] += np.bincount(peak[:, h], minlength=m)
        maps = next((c["map"] for c in captured.values() if "map" in c), None)
        if maps is not None:
            fused = maps.double().numpy()[mask]  # (B', M)
            self.map_sum += fused.sum(axis=0)
            if top1 is not None:
                classes = np.asarray(top1, np.int64)[mask]  # (B',)
                for cls in np.unique(classes).tolist():
                    rows = fused[classes == cls]  # (k, M)
                    self.class_count[cls] = self.class_count.get(cls, 0) + int(rows.shape[0])
                    self.class_sum[cls] = self.class_sum.get(cls, np.zeros(m, np.float64)) + rows.sum(axis=0)
        self.images += int(mask.sum())

    def merge(self, other: StatsState) -> StatsState:
        """Add ``other`` into this state (exact: sums and counts add). Returns self."""
        if other.key != self.key:
            raise UsageError(
                f"cannot merge statistics of blocks {list(other.blocks)}, {other.heads} heads, grid "
                f"{other.grid[0]}×{other.grid[1]} into blocks {list(self.blocks)}, {self.heads} heads, grid "
                f"{self.grid[0]}×{self.grid[1]}"
            )
        self.images += other.images
        self.sums += other.sums
        self.squares += other.squares
        self.peaks += other.peaks
        self.map_sum += other.map_sum
        for cls, n in other.class_count.items():
            self.class_count[cls] = self.class_count.get(cls, 0) + n
            s = other.class_sum[cls]
            self.class_sum[cls] = self.class_sum[cls] + s if cls in self.class_sum else s.copy()
        return self

    # -- reading ------------------------------------------------------------------------------
    def moments(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mean, population std), each (L, H), of one statistic over the images (NaN with none)."""
        import numpy as np

        si = self.names.index(name)
        n = self.images
        if n == 0:
            nan = np.full(self.sums.shape[1:], np.nan)
            return nan, nan.copy()
        mean = self.sums[si] / n
        var = np.maximum(self.squares[si] / n - mean * mean, 0.0)
        return mean, np.sqrt(var)

    def sink(self) -> tuple[np.ndarray, np.ndarray]:
        """(share (L, H) of images whose peak is the most frequent peak patch, that patch's index (L, H))."""
        import numpy as np

        top = self.peaks.argmax(axis=-1)  # (L, H)
        counts = np.take_along_axis(self.peaks, top[..., None], axis=-1)[..., 0]  # (L, H)
        share = counts / self.images if self.images else np.full(counts.shape, np.nan)
        return share, top

    def class_map(self, cls: int | None = None) -> np.ndarray:
        """(gh, gw) mean fused query map over the images predicted as ``cls`` (None: all images)."""
        if cls is None:
            total, n = self.map_sum, self.images
        else:
            total, n = self.class_sum[cls], self.class_count[cls]
        return (total / max(n, 1)).reshape(self.grid)

    def top_classes(self, n: int) -> list[int]:
        """The ``n`` most frequent top-1 classes, most frequent first (ties: lower index first)."""
        return sorted(self.class_count, key=lambda c: (-self.class_count[c], c))[:n]

    # -- storing ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (float64 values round-trip exactly through Python's JSON)."""
        return {
            "version": STATE_VERSION,
            "blocks": list(self.blocks),
            "heads": self.heads,
            "grid": list(self.grid),
            "names": list(self.names),
            "images": self.images,
            "sums": self.sums.tolist(),
            "squares": self.squares.tolist(),
            "peaks": self.peaks.tolist(),
            "map_sum": self.map_sum.tolist(),
            "classes": {str(c): {"count": n, "sum": self.class_sum[c].tolist()} for c, n in self.class_count.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StatsState:
        import numpy as np

        if d.get("version") != STATE_VERSION:
            raise ValueError(f"statistics state version {d.get('version')!r}, expected {STATE_VERSION}")
        grid = (int(d["grid"][0]), int(d["grid"][1]))
        state = cls(
            blocks=tuple(d["blocks"]),
            heads=int(d["heads"]),
            grid=grid,
            names=tuple(d["names"]),
            images=int(d["images"]),
            sums=np.asarray(d["sums"], np.float64),
            squares=np.asarray(d["squares"], np.float64),
            peaks=np.asarray(d["peaks"], np.int64),
            map_sum=np.asarray(d["map_sum"], np.float64),
        )
        for c, entry in d["classes"].items():
            state.class_count[int(c)] = int(entry["count"])
            state.class_sum[int(c)] = np.asarray(entry["sum"], np.float64)
        s, nb, h, m = len(state.names), len(state.blocks), state.heads, grid[0] * grid[1]
        shapes = {"sums": (s, nb, h), "squares": (s, nb, h), "peaks": (nb, h, m), "map_sum": (m,)}
        for name, shape in shapes.items():
            if getattr(state, name).shape != shape:
                raise ValueError(f"statistics state: {name} has shape {getattr(state, name).shape}, not {shape}")
        return state


def merge_states(states: Iterable[StatsState]) -> StatsState:
    """One state holding every given state's images (at least one state)."""
    it = iter(states)
    first = next(it, None)
    if first is None:
        raise ValueError("merge_states needs at least one state")
    total = StatsState.like(first).merge(first)
    for s in it:
        total.merge(s)
    return total
