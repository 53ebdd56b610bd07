"""What a result consists of: its files (one function owns the list), its settings record, its JSON record
and its ``meta.json``. Plain data in, plain data out; nothing here draws, writes or runs a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn._version import __version__
from vitattn.errors import display_path
from vitattn.options import HeadFusion, Method, RenderOptions
from vitattn.outputs import META, fused_name, grid_name, head_name, mask_name, method_name, npy_name

if TYPE_CHECKING:
    from vitattn.attention import ImageAttention, Prediction, Settings
    from vitattn.discovery import InputItem
    from vitattn.models import LoadedModel


@dataclass(frozen=True)
class BlockFiles:
    """The files of one block's result, by role (names inside the input's folder).

    Attributes:
        maps: one overlay per map with a file of its own: each kept head then the fused map (``raw``), or
            the method's map.
        masks: with a threshold, one mask picture per entry of ``maps``; else empty.
        grid: the labelled grid picture.
        npy: the array file, when arrays are written.
    """

    block: int
    maps: tuple[str, ...]
    masks: tuple[str, ...]
    grid: str
    npy: str | None

    def names(self) -> list[str]:
        return [*self.maps, *self.masks, self.grid, *([self.npy] if self.npy else [])]


def result_files(settings: Settings, render: RenderOptions, fuse: HeadFusion) -> list[BlockFiles]:
    """Every file a result has, per chosen block: what the writer writes and what resume checks."""
    ext = render.format.value
    files = []
    for b in settings.blocks:
        if settings.method is Method.raw:
            maps = [head_name(b, h, ext) for h in settings.heads] + [fused_name(b, fuse.value, ext)]
            npy = npy_name(b)
        else:
            maps = [method_name(b, settings.method.value, ext)]
            npy = method_name(b, settings.method.value, "npy")
        masks = [mask_name(n) for n in maps] if render.threshold is not None else []
        files.append(BlockFiles(b, tuple(maps), tuple(masks), grid_name(b, ext), npy if render.npy else None))
    return files


def all_names(files: list[BlockFiles]) -> list[str]:
    """Every file name of a result, ``meta.json`` last (it is written last)."""
    return [n for f in files for n in f.names()] + [META]


def settings_record(loaded: LoadedModel, settings: Settings, render: RenderOptions) -> dict[str, Any]:
    """Everything that decides an input's outputs; a rerun with the same record skips the input.

    Options added after the first release appear only when they differ from their defaults, so results made
    before them still count as done with the default settings.
    """
    record: dict[str, Any] = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "blocks": list(settings.blocks),
        "query": str(settings.query),
        "heads": list(settings.heads),
        "top_k": settings.top_k,
        "precision": settings.precision.value,
        "cmap": render.cmap,
        "alpha": render.alpha,
        "max_side": render.max_side,
        "shared_scale": render.shared_scale,
        "npy": render.npy,
        "format": render.format.value,
        "fuse": settings.fuse.value,
    }
    if loaded.weights == "random":
        from vitattn.models import RANDOM_WEIGHTS_SEED

        record["seed"] = RANDOM_WEIGHTS_SEED  # random weights are seeded: the seed decides the maps
    if settings.method is not Method.raw:
        record["method"] = settings.method.value
    if settings.discard_ratio:
        record["discard_ratio"] = settings.discard_ratio
    if settings.target_class is not None:
        record["target_class"] = settings.target_class
    if render.threshold is not None:
        record["threshold"] = render.threshold
    if render.fuse is not None and render.fuse is not settings.fuse:
        record["render_fuse"] = render.fuse.value
    return record


def base_record(item: InputItem, loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    """The JSON record's fields known before an input is processed."""
    return {
        "input": display_path(item.path) if _undecodable(item.path) else item.path,
        "status": "ok",
        "model": loaded.spec,
        "block": settings.blocks[0],
        "method": settings.method.value,
        "query": str(settings.query),
        "grid": list(settings.grid),
        "heads": list(settings.heads),
    }


def _undecodable(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def record_rest(folder: Path, files: list[BlockFiles], method: Method, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON record's files (first block), every block's files, predictions and statistics."""
    blocks = [{"block": f.block, "files": _block_entry(folder, f, method)} for f in files]
    rest: dict[str, Any] = {"files": blocks[0]["files"], "blocks": blocks, "top": meta.get("top", [])}
    if "target" in meta:
        rest["target"] = meta["target"]
    rest["head_stats"] = meta.get("head_stats", {})
    return rest


def _block_entry(folder: Path, f: BlockFiles, method: Method) -> dict[str, Any]:
    """One block's ``files`` entry of a JSON record.

    raw: ``heads`` (one per head), ``mean`` (the fused map, whatever the fusion is), ``grid``, ``npy``,
    ``masks`` (``heads`` and ``mean``). Other methods: ``heads`` (empty), ``map`` (the method's map),
    ``grid``, ``npy``, ``masks`` (``map``). ``npy`` and ``masks`` only when written; ``meta`` always.
    """
    entry: dict[str, Any]
    if method is Method.raw:
        entry = {"heads": [str(folder / n) for n in f.maps[:-1]], "mean": str(folder / f.maps[-1])}
        masks: dict[str, Any] = {"heads": [str(folder / n) for n in f.masks[:-1]]}
        if f.masks:
            masks["mean"] = str(folder / f.masks[-1])
    else:
        entry = {"heads": [], "map": str(folder / f.maps[0])}
        masks = {"map": str(folder / f.masks[0])} if f.masks else {}
    entry["grid"] = str(folder / f.grid)
    if f.npy:
        entry["npy"] = str(folder / f.npy)
    if f.masks:
        entry["masks"] = masks
    entry["meta"] = str(folder / META)
    return entry


def meta_record(
    *,
    base: dict[str, Any],
    settings: Settings,
    settings_rec: dict[str, Any],
    model_info: dict[str, Any],
    fuse: HeadFusion,
    att: ImageAttention,
    input_stat: dict[str, int],
    image_size: tuple[int, int],
    crop_box: tuple[float, float, float, float],
    files: list[str],
    warnings: list[str],
    threshold: float | None,
) -> dict[str, Any]:
    """The contents of an input's ``meta.json``."""
    meta: dict[str, Any] = {
        "vitattn": __version__,
        "input": base["input"],
        "input_stat": input_stat,
        "image_size": list(image_size),
        "settings": settings_rec,
        "model": model_info,
        "blocks": list(settings.blocks),
        "method": att.method.value,
        "fuse": fuse.value,
        "query": str(att.query),
        "grid": list(att.grid),
        "heads": list(settings.heads),
        "crop_box": [round(v, 3) for v in crop_box],
        "top": [prediction_record(p) for p in att.top],
        "head_stats": head_stats(att),
        "files": files,
        "warnings": warnings,
    }
    if att.method is Method.rollout:
        meta["discard_ratio"] = settings.discard_ratio
    if att.target is not None:
        meta["target"] = prediction_record(att.target)
    if threshold is not None:
        meta["threshold"] = threshold
    return meta


def prediction_record(p: Prediction) -> dict[str, Any]:
    return {"index": p.index, "label": p.label, "prob": p.prob}


def head_stats(att: ImageAttention) -> dict[str, Any]:
    """Per block and head: entropy over patches, mass on prefix tokens, grid position of the peak.

    ``entropy`` is that of the query's attention over the patches, renormalised to sum to one over them, divided
    by its largest possible value ``log(patches)``: 0 for all attention on one patch, 1 for uniform attention.
    """
    import numpy as np

    stats: dict[str, Any] = {}
    for b, bm in att.blocks.items():
        rows = []
        for k, head in enumerate(bm.head_ids):
            m = bm.heads[k]  # (gh, gw)
            total = float(m.sum())
            p = m / total if total > 0 else m
            nats = float(-(p[p > 0] * np.log(p[p > 0])).sum())
            entropy = nats / math.log(m.size) if m.size > 1 else 0.0  # in [0, 1]
            peak = np.unravel_index(int(m.argmax()), m.shape)
            rows.append(
                {
                    "head": head,
                    "entropy": round(entropy, 5),
                    "prefix_mass": round(float(bm.prefix[k].sum()), 6),
                    "peak": [int(peak[0]), int(peak[1])],
                }
            )
        stats[str(b)] = rows
    return stats
