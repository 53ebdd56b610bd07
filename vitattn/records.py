"""What a result consists of: its files (one function owns the list), its settings record, its JSON record
and its ``meta.json``. Plain data in, plain data out; nothing here draws, writes or runs a model.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn._version import __version__
from vitattn.errors import display_path
from vitattn.options import HeadFusion, Method, Precision, Query, QueryKind, RenderOptions
from vitattn.store import META

if TYPE_CHECKING:
    from vitattn.attention import ImageAttention, Prediction, Settings
    from vitattn.discovery import InputItem
    from vitattn.models import LoadedModel


@dataclass(frozen=True)
class BlockFiles:
    """The files of one result (one block, computed one way), by role: names inside the input's folder.

    Attributes:
        key: the result's name in ``meta.json``: its file-name stem, with the model's sub-folder when the
            model is not the folder's first (``block11``, ``block11_rollout``, ``test_vit@random/block5``).
        maps: one overlay per map with a file of its own: each kept head then the fused map (``raw``), or
            the method's map.
        masks: with a threshold, one mask picture per entry of ``maps``; else empty.
        grid: the labelled grid picture.
        npy: the array file, when arrays are written.
    """

    block: int
    key: str
    maps: tuple[str, ...]
    masks: tuple[str, ...]
    grid: str
    npy: str | None

    def names(self) -> list[str]:
        return [*self.maps, *self.masks, self.grid, *([self.npy] if self.npy else [])]


def query_tag(query: Query) -> str:
    """A query as a file-name part: ``dist``, ``patch-mean``, ``patch:3,4`` -> ``patch3-4``."""
    return f"patch{query.row}-{query.col}" if query.kind is QueryKind.patch else query.kind.value


def result_stem(settings: Settings, block: int, *, default_query: Query, all_heads: int) -> str:
    """The part of a result's file names that says how it was computed, where that differs from the defaults.

    ``block{B}``, then the method (not ``raw``), the query (not the model's default), the grad-rollout target
    class, the precision (not fp32), the head fusion (not mean), rollout's discard ratio (not 0), and a head
    subset: ``block11``, ``block11_max``, ``block11_rollout``, ``block11_patch3-4``,
    ``block11_grad-rollout_class281``.
    """
    parts = [f"block{block}"]
    if settings.method is not Method.raw:
        parts.append(settings.method.value)
    if settings.query != default_query:
        parts.append(query_tag(settings.query))
    if settings.target_class is not None:
        parts.append(f"class{settings.target_class}")
    if settings.precision is not Precision.fp32:
        parts.append(settings.precision.value)
    if settings.fuse is not HeadFusion.mean:
        parts.append(settings.fuse.value)
    if settings.method is Method.rollout and settings.discard_ratio:
        parts.append(f"discard{settings.discard_ratio:g}")
    if len(settings.heads) != all_heads:
        heads = "+".join(str(h) for h in settings.heads)
        parts.append(f"heads{heads}" if len(heads) <= 40 else "heads~" + _digest(heads))
    return "_".join(parts)


def model_tag(spec: str, weights: str) -> str:
    """A model (and its weights) as a folder name: ``test_vit``, ``test_vit@random``, ``hf-hub_timm_x``,
    ``shapes_vit`` (a ``local-dir:`` folder), ``vit_small@ckpt.pth`` (a weights file)."""
    name = Path(spec.removeprefix("local-dir:")).name if spec.startswith("local-dir:") else spec
    tag = _SAFE.sub("_", name) or "model"
    if weights == "random":
        tag += "@random"
    elif weights not in ("pretrained", "caller"):
        tag += "@" + (_SAFE.sub("_", Path(weights).name) or "weights")
    if len(tag) > 100:
        tag = tag[:90] + "~" + _digest(f"{spec}\0{weights}")
    return tag


_SAFE = re.compile(r"[^A-Za-z0-9._+@=-]+")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def result_files(
    settings: Settings,
    render: RenderOptions,
    fuse: HeadFusion,
    *,
    default_query: Query,
    all_heads: int,
    model_dir: str = "",
) -> list[BlockFiles]:
    """Every file of a result, per chosen block: what the writer writes and what resume checks.

    Args:
        fuse: the fused map drawn (a picture setting).
        default_query: the model's natural query (no query part in the names for it).
        all_heads: the model's number of heads (a subset is named).
        model_dir: the model's sub-folder (:func:`model_tag`), or ``""`` for the folder's first model.
    """
    ext = render.format.value
    prefix = f"{model_dir}/" if model_dir else ""
    files = []
    for b in settings.blocks:
        stem = prefix + result_stem(settings, b, default_query=default_query, all_heads=all_heads)
        if settings.method is Method.raw:
            # the fused map: block11_mean.png; with another fusion the stem says it: block11_max.png
            fused = f"{stem}.{ext}" if settings.fuse is not HeadFusion.mean else f"{stem}_{fuse.value}.{ext}"
            maps = [f"{stem}_head{h}.{ext}" for h in settings.heads] + [fused]
            npy = f"{stem}_attn.npy"
        else:
            maps = [f"{stem}.{ext}"]
            npy = f"{stem}.npy"
        masks = [mask_name(n) for n in maps] if render.threshold is not None else []
        files.append(BlockFiles(b, stem, tuple(maps), tuple(masks), f"{stem}_grid.{ext}", npy if render.npy else None))
    return files


def mask_name(name: str) -> str:
    """The mask picture that goes with an overlay: ``block3_head0.png`` -> ``block3_head0_mask.png``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_mask.{ext}" if dot else f"{name}_mask"


def identity_record(loaded: LoadedModel, settings: Settings, block: int) -> dict[str, Any]:
    """What decides a result's numbers: two results with the same identity hold the same maps."""
    record: dict[str, Any] = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "block": block,
        "query": str(settings.query),
        "heads": list(settings.heads),
        "precision": settings.precision.value,
        "method": settings.method.value,
        "fuse": settings.fuse.value,
    }
    if loaded.weights == "random":
        from vitattn.models import RANDOM_WEIGHTS_SEED

        record["seed"] = RANDOM_WEIGHTS_SEED  # random weights are seeded: the seed decides the maps
    if settings.method is Method.rollout:
        record["discard_ratio"] = settings.discard_ratio
    if settings.target_class is not None:
        record["target_class"] = settings.target_class
    return record


def picture_record(settings: Settings, render: RenderOptions, fuse: HeadFusion) -> dict[str, Any]:
    """What decides only how a result is drawn and reported: a change re-renders it in place."""
    record: dict[str, Any] = {
        "cmap": render.cmap,
        "alpha": render.alpha,
        "max_side": render.max_side,
        "shared_scale": render.shared_scale,
        "npy": render.npy,
        "format": render.format.value,
        "fused": fuse.value,
        "top_k": settings.top_k,
    }
    if render.threshold is not None:
        record["threshold"] = render.threshold
    return record


def base_record(item: InputItem, loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    """The JSON record's fields known before an input is processed."""
    return {
        "input": recorded_path(item.path),
        "status": "ok",
        "model": loaded.spec,
        "block": settings.blocks[0],
        "method": settings.method.value,
        "query": str(settings.query),
        "grid": list(settings.grid),
        "heads": list(settings.heads),
    }


def recorded_path(path: str) -> str:
    """A path as records and meta.json hold it (valid UTF-8: undecodable bytes become ``\\xNN`` escapes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return display_path(path)
    return path


def record_rest(folder: Path, files: list[BlockFiles], method: Method, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON record's files (first block), every block's files, predictions and statistics.

    Args:
        entries: the results' ``meta.json`` entries, one per block, in the order of ``files``.
    """
    blocks = [{"block": f.block, "files": _block_entry(folder, f, method)} for f in files]
    first = entries[0] if entries else {}
    rest: dict[str, Any] = {"files": blocks[0]["files"], "blocks": blocks, "top": first.get("top", [])}
    if "target" in first:
        rest["target"] = first["target"]
    rest["head_stats"] = {str(f.block): e.get("head_stats", []) for f, e in zip(files, entries, strict=False)}
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


def result_entry(
    *,
    identity: dict[str, Any],
    picture: dict[str, Any],
    model_info: dict[str, Any],
    att: ImageAttention,
    block: int,
    fuse: HeadFusion,
    input_stat: dict[str, int],
    image_size: tuple[int, int],
    crop_box: tuple[float, float, float, float],
    files: list[str],
    warnings: list[str],
    seconds: float,
) -> dict[str, Any]:
    """One result's entry in ``meta.json`` (complete; :mod:`vitattn.store` adds the file sizes)."""
    import datetime

    entry: dict[str, Any] = {
        "state": "complete",
        "settings": {**identity, **picture},
        "model": model_info,
        "block": block,
        "method": att.method.value,
        "fuse": fuse.value,
        "query": str(att.query),
        "grid": list(att.grid),
        "heads": list(identity["heads"]),
        "crop_box": [round(v, 3) for v in crop_box],
        "image_size": list(image_size),
        "input_stat": input_stat,
        "top": [prediction_record(p) for p in att.top],
        "head_stats": head_stats(att).get(str(block), []),
        "files": files,
        "warnings": warnings,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 4),
    }
    if "discard_ratio" in identity:
        entry["discard_ratio"] = identity["discard_ratio"]
    if att.target is not None:
        entry["target"] = prediction_record(att.target)
    if "threshold" in picture:
        entry["threshold"] = picture["threshold"]
    return entry


TIMINGS = ("written", "seconds")
"""The fields of a result entry that differ between two runs making the same result."""


def folder_meta(
    *,
    input_path: str,
    source: str,
    primary_model: dict[str, str],
    results: dict[str, dict[str, Any]],
    latest: list[str],
) -> dict[str, Any]:
    """The whole ``meta.json`` of a folder: every result, and the latest run's fields at the top level.

    Args:
        results: every result entry of the folder, by key.
        latest: the keys of the results the latest run made (their fields fill the top level, as the
            single-result meta.json of earlier versions had them).
    """
    complete = {k: e for k, e in results.items() if e.get("state") == "complete"}
    files = sorted({n for e in complete.values() for n in e.get("files", [])})
    meta: dict[str, Any] = {
        "vitattn": __version__,
        "format": 2,
        "input": input_path,
        "input_path": source,
        "primary_model": primary_model,
    }
    run = [complete[k] for k in latest if k in complete]
    if run:
        first = run[0]
        settings = {k: v for k, v in first["settings"].items() if k != "block"}
        meta.update(
            {
                "input_stat": first["input_stat"],
                "image_size": first["image_size"],
                "settings": {**settings, "blocks": [e["block"] for e in run]},
                "model": first["model"],
                "blocks": [e["block"] for e in run],
                "method": first["method"],
                "fuse": first["fuse"],
                "query": first["query"],
                "grid": first["grid"],
                "heads": first["heads"],
                "crop_box": first["crop_box"],
                "top": first["top"],
                "head_stats": {str(e["block"]): e["head_stats"] for e in run},
                "warnings": first["warnings"],
            }
        )
        for key in ("target", "discard_ratio", "threshold"):
            if key in first:
                meta[key] = first[key]
    meta["latest"] = [k for k in latest if k in complete]
    meta["results"] = results
    meta["files"] = [*files, META]
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
