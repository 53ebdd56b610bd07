"""The streaming run: inputs -> load + preprocess (workers) -> model batches -> render + write (workers).

Stages overlap: pictures are decoded and preprocessed ahead of the model by a small thread pool, the model
runs batches in the calling thread, and overlays are rendered and written behind it by another pool.
Every queue is bounded, so memory does not grow with the number of inputs. Outcomes come back in input
order, one per discovered input; a failure of one input never stops the others (unless ``fail_fast``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn._version import __version__
from vitattn.attention import BlockMaps, ImageAttention, Prediction, Settings, capturing, forward_batch
from vitattn.errors import CaptureError, InputError, Reason, VitattnError, display_path
from vitattn.inputs import DEFAULT_MAX_PIXELS, InputItem, load_image
from vitattn.maps import HeadFusion, mass_mask
from vitattn.methods import Method
from vitattn.models import LoadedModel, describe
from vitattn.outputs import (
    META,
    abandon_result,
    fused_name,
    grid_name,
    head_name,
    mask_name,
    method_name,
    npy_name,
    raise_if_fatal,
    read_meta,
    remove_files,
    resume_state,
    start_result,
    write_json,
    write_npy,
)
from vitattn.preprocess import Box, crop_box, peak_pixels, photo_tensor, tensor_transform

if TYPE_CHECKING:
    import torch
    from PIL import Image

FORMATS = ("png", "jpg", "webp")


@dataclass(frozen=True)
class RenderOptions:
    """How maps are drawn and which files are written.

    Attributes:
        out: output root folder.
        cmap: matplotlib colormap name.
        alpha: heat opacity over the photo, 0..1.
        max_side: long side of written overlays in pixels (0: the photo's own size).
        shared_scale: one colour scale across heads (else each head spans its own range).
        npy: also write the raw arrays.
        format: overlay file format: png, jpg or webp.
        fuse: how heads are combined for the drawn fused map; None: the settings' ``fuse``.
        threshold: also draw, for each head and the fused map (or the method's map), the smallest set of
            patches holding this fraction of the map's mass over the patches, in (0, 1]; None: no masks.
    """

    out: Path
    cmap: str = "inferno"
    alpha: float = 0.6
    max_side: int = 512
    shared_scale: bool = False
    npy: bool = False
    format: str = "png"
    fuse: HeadFusion | None = None
    threshold: float | None = None


def _default_workers() -> int:
    """Threads per side stage (load, write): 2 on a small machine, up to 8 where cores allow (GPU hosts)."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class RunOptions:
    """How the batch run behaves."""

    batch_size: int = 16
    overwrite: bool = False
    fail_fast: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_workers: int = field(default_factory=_default_workers)
    render_workers: int = field(default_factory=_default_workers)


@dataclass
class Outcome:
    """What happened to one input: ``ok``, ``skipped`` or ``error``, with its JSON record."""

    item: InputItem
    status: str
    record: dict[str, Any]
    folder: Path | None = None
    error: InputError | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Prepared:
    item: InputItem
    folder: Path
    photo: Image.Image  # upright RGB, already shrunk to the overlay size
    box: Box  # crop box in ``photo`` pixels
    tensor: torch.Tensor  # (3, H, W)
    image_size: tuple[int, int]  # (width, height) of the upright original, full resolution
    box_full: Box  # crop box in full-resolution photo pixels
    input_stat: dict[str, int]
    warnings: list[str]


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
        "precision": settings.precision,
        "cmap": render.cmap,
        "alpha": render.alpha,
        "max_side": render.max_side,
        "shared_scale": render.shared_scale,
        "npy": render.npy,
        "format": render.format,
        "fuse": settings.fuse.value,
    }
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


def _base_record(item: InputItem, loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
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


def _error_outcome(item: InputItem, err: InputError, base: dict[str, Any]) -> Outcome:
    record = {**base, "status": "error", "error": err.message}
    return Outcome(item=item, status="error", record=record, error=err)


class Runner:
    """Runs the heatmap job over a stream of inputs. Use :meth:`run`; iterate its outcomes."""

    def __init__(self, loaded: LoadedModel, settings: Settings, render: RenderOptions, run: RunOptions) -> None:
        import numpy as np

        from vitattn.render import colormap_lut

        self.loaded = loaded
        self.settings = settings
        self.render_opts = render
        self.opts = run
        self.lut = colormap_lut(render.cmap)  # fails early on a bad name
        if render.threshold is not None:
            mass_mask(np.ones((1, 1)), render.threshold)  # fails early on a bad fraction
        self.fuse = render.fuse or settings.fuse
        self.settings_record = settings_record(loaded, settings, render)
        self.transform = loaded.transform
        self.tensor_transform = tensor_transform(loaded.transform)  # None: run the transform on PIL pictures
        self.model_info = describe(loaded)
        _, h, w = loaded.data_config["input_size"]
        crop_pct = float(loaded.data_config.get("crop_pct") or 1.0)
        # JPEG draft decoding: the short side keeps what the model's resize needs, the long side the overlay
        # size; --max-side 0 asks for the photo's own size, so nothing is reduced.
        need = int(max(h, w) / crop_pct)
        self.draft_size: tuple[int, int] | None = (need, need) if render.max_side > 0 else None
        self.draft_long_side = render.max_side
        self._stop = False
        self._write_failed = False  # set by a write worker; with fail_fast, no more inputs are taken

    # -- stage 1: load + preprocess (worker threads) -------------------------------------------
    def _prepare(self, item: InputItem) -> _Prepared | Outcome:
        base = _base_record(item, self.loaded, self.settings)
        if item.error is not None:
            return _error_outcome(item, item.error, base)
        folder = self.render_opts.out / item.rel
        try:
            st = os.stat(item.path)
            input_stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            state = resume_state(
                folder, self.settings_record, overwrite=self.opts.overwrite, path=item.path, input_stat=input_stat
            )
            if state == "skip":
                meta = read_meta(folder) or {}
                record = {**base, "status": "skipped", **self._record_rest(folder, meta)}
                return Outcome(item, "skipped", record, folder)
            loaded_img = load_image(
                item.path, max_pixels=self.opts.max_pixels, min_size=self.draft_size, min_long_side=self.draft_long_side
            )
            photo = loaded_img.image
            size = photo.size
            self._check_preprocessing_size(item.path, size)
            box = crop_box(self.transform, size)
            full = loaded_img.size if min(loaded_img.size) > 0 else size  # before JPEG draft reduction
            fx, fy = full[0] / size[0], full[1] / size[1]
            box_full = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            pixels = tensor = None
            if self.tensor_transform is not None:  # the model's transform with torch's resamplers
                pixels = photo_tensor(photo)  # (3, h, w) uint8
                tensor = self.tensor_transform(pixels)  # (3, H, W), or None when its crop would pad
            if tensor is None:
                tensor = self.transform(photo)  # (3, H, W)
            photo, box = _shrink(photo, box, self.render_opts.max_side, pixels)
        except InputError as err:
            return _error_outcome(item, err, base)
        except OSError as exc:  # e.g. the file vanished between discovery and load
            return _error_outcome(item, InputError(item.path, Reason.NO_SUCH_FILE, exc.strerror), base)
        except (VitattnError, MemoryError):
            raise
        except Exception as exc:  # the model's transform failed on this one picture
            detail = f"preprocessing: {_exc_line(exc)}"
            return _error_outcome(item, InputError(item.path, Reason.INFERENCE, detail), base)
        return _Prepared(
            item=item,
            folder=folder,
            photo=photo,
            box=box,
            tensor=tensor,
            image_size=full,
            box_full=box_full,
            input_stat=input_stat,
            warnings=loaded_img.warnings,
        )

    def _check_preprocessing_size(self, path: str, size: tuple[int, int]) -> None:
        """Refuse a picture whose preprocessing would exceed the pixel limit (a 1×3000 strip, resized by its
        short side, becomes 168×504000 before the centre crop). A limit set below Pillow's default applies to
        the picture only: every picture is resized to about the model's input size."""
        limit = self.opts.max_pixels
        if limit is not None:
            limit = max(limit, DEFAULT_MAX_PIXELS)
        peak = peak_pixels(self.transform, size)
        if limit is not None and peak > limit:
            w, h = size
            detail = f"{w}×{h} resized for the model is {peak} pixels, limit {limit}; raise it with --max-pixels"
            raise InputError(path, Reason.TOO_LARGE, detail)

    # -- stage 3: render + write (worker threads) -----------------------------------------------
    def _write(self, prep: _Prepared, att: ImageAttention) -> Outcome:
        folder = prep.folder
        base = _base_record(prep.item, self.loaded, self.settings)
        written: list[str] = []
        old: list[str] = []
        try:
            old = start_result(folder)
            for bm in att.blocks.values():
                self._write_block(prep, att, bm, written)
            top = [_prediction(p) for p in att.top]
            meta = {
                "vitattn": __version__,
                "input": base["input"],
                "input_stat": prep.input_stat,
                "image_size": list(prep.image_size),
                "settings": self.settings_record,
                "model": self.model_info,
                "blocks": list(self.settings.blocks),
                "method": att.method.value,
                "fuse": self.fuse.value,
                "query": str(att.query),
                "grid": list(att.grid),
                "heads": list(self.settings.heads),
                "crop_box": [round(v, 3) for v in prep.box_full],
                "top": top,
                "head_stats": _head_stats(att),
                "files": [*written, META],
                "warnings": prep.warnings,
            }
            if att.method is Method.rollout:
                meta["discard_ratio"] = self.settings.discard_ratio
            if att.target is not None:
                meta["target"] = _prediction(att.target)
            if self.render_opts.threshold is not None:
                meta["threshold"] = self.render_opts.threshold
            write_json(folder / META, meta)
        except BaseException as exc:
            abandon_result(folder, [*written, *old])  # a failed input leaves nothing half-done behind
            if isinstance(exc, OSError):
                raise_if_fatal(exc, folder)
            if isinstance(exc, (VitattnError, MemoryError)) or not isinstance(exc, Exception):
                raise
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else _exc_line(exc)
            if self.opts.fail_fast:
                self._write_failed = True
            return _error_outcome(prep.item, InputError(prep.item.path, Reason.WRITE, detail), base)
        if old:
            remove_files(folder, set(old) - set(written) - {META})
        record = {**base, **self._record_rest(folder, meta)}
        return Outcome(prep.item, "ok", record, folder, warnings=prep.warnings)

    def _write_block(self, prep: _Prepared, att: ImageAttention, bm: BlockMaps, written: list[str]) -> None:
        """Draw and write one block's files, adding each name to ``written`` as soon as it is in place.

        raw: one overlay per head and the fused map. rollout / grad-rollout: the method's map instead;
        the grid picture shows the method's map next to the block's raw heads and fused map.
        """
        import numpy as np

        from vitattn.render import GRID_TILE_SIDE, labelled_grid, mask_overlay, overlay_many, scale_maps

        r = self.render_opts
        ext, folder, b = r.format, prep.folder, bm.block
        box, side = prep.box, r.max_side
        fused = bm.fused(self.fuse)  # (gh, gw)
        raw = np.concatenate([bm.heads, fused[None]], axis=0)  # (H' + 1, gh, gw)
        labels = [f"head {h}" for h in bm.head_ids] + [self.fuse.value]
        raw_names = [head_name(b, h, ext) for h in bm.head_ids] + [fused_name(b, self.fuse.value, ext)]
        scaled = scale_maps(raw, shared=r.shared_scale)  # (H' + 1, gh, gw)
        method = att.method
        if method is Method.raw:
            maps, names = raw, raw_names  # what gets its own files
        else:
            if bm.method_map is None:
                raise CaptureError(f"block {b}: no {method.value} map was computed")
            maps, names = bm.method_map[None], [method_name(b, method.value, ext)]  # (1, gh, gw)
            scaled = np.concatenate([scale_maps(maps, shared=False), scaled], axis=0)  # (1 + H' + 1, gh, gw)
            labels = [method.value] + [f"raw {label}" for label in labels]
        pictures = overlay_many(prep.photo, scaled[: len(names)], crop_box=box, lut=self.lut, alpha=r.alpha,
                                max_side=side)
        for name, picture in zip(names, pictures, strict=True):
            _save(picture, folder / name, ext)
            written.append(name)
        if r.threshold is not None:
            top_color = self.lut[-1]  # the colormap's brightest colour outlines the masks
            color = (int(top_color[0]), int(top_color[1]), int(top_color[2]))
            for name, heat in zip(names, maps, strict=True):
                mask = mass_mask(heat, r.threshold)  # (gh, gw) bool
                picture = mask_overlay(prep.photo, mask, crop_box=box, color=color, max_side=side)
                _save(picture, folder / mask_name(name), ext)
                written.append(mask_name(name))
        title = f"{_short_spec(self.loaded.spec)} · block {b} · {_method_title(att)}query {att.query}"
        if att.top:
            title += f" · top: {att.top[0].label} ({att.top[0].prob:.1%})"
        # Grid tiles: the written overlays halved (or quartered...) by pixel averaging when --max-side is a
        # multiple of the tile size (the default: 512 = 2 x 256), cheaper than drawing them again; otherwise,
        # and for maps without files of their own, drawn at tile size from a small copy of the photo.
        tile = GRID_TILE_SIDE
        factor = side // tile if side > 0 and side % tile == 0 else 0
        small = [p.reduce(factor) if factor > 1 else p for p in pictures] if factor else []
        tile_photo, tile_box = _shrink(prep.photo, box, tile)
        if len(small) < len(scaled):
            small += overlay_many(tile_photo, scaled[len(small) :], crop_box=tile_box, lut=self.lut, alpha=r.alpha,
                                  max_side=tile)
        blank = np.zeros((1, *fused.shape), np.float32)  # alpha 0: just the dimmed photo
        plain = overlay_many(tile_photo, blank, crop_box=tile_box, lut=self.lut, alpha=0.0, max_side=tile)
        tiles = [("photo", plain[0]), *zip(labels, small, strict=True)]
        _save(labelled_grid(tiles, title=title), folder / grid_name(b, ext), ext)
        written.append(grid_name(b, ext))
        if r.npy:
            array = bm.heads if method is Method.raw else maps[0]  # (H', gh, gw) or (gh, gw)
            name = npy_name(b) if method is Method.raw else method_name(b, method.value, "npy")
            write_npy(folder / name, array.astype(np.float32))
            written.append(name)

    def _record_rest(self, folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The JSON record's files (first block), every block's files, predictions and statistics."""
        blocks = [{"block": b, "files": _block_files(folder, b, self.settings, self.render_opts, self.fuse)}
                  for b in self.settings.blocks]
        rest: dict[str, Any] = {"files": blocks[0]["files"], "blocks": blocks, "top": meta.get("top", [])}
        if "target" in meta:
            rest["target"] = meta["target"]
        rest["head_stats"] = meta.get("head_stats", {})
        return rest

    # -- the run ---------------------------------------------------------------------------------
    def run(self, items: Iterable[InputItem]) -> Generator[Outcome, None, None]:
        """Process every input; yields one :class:`Outcome` per input, in input order.

        Raises:
            OutputError: the output tree cannot be written (disk full, read-only): fatal for the run.
        """
        opts = self.opts
        window = max(2, opts.batch_size * 2)
        pending: deque[_Slot] = deque()  # one slot per input, in input order
        with (
            ThreadPoolExecutor(max(1, opts.decode_workers), thread_name_prefix="vitattn-load") as loaders,
            ThreadPoolExecutor(max(1, opts.render_workers), thread_name_prefix="vitattn-write") as writers,
            capturing(self.loaded, self.settings) as cap,
        ):
            try:
                prepared = _ordered_map(loaders, self._prepare, items, window)
                batch: list[tuple[_Prepared, _Slot]] = []
                for p in prepared:
                    if isinstance(p, Outcome):
                        pending.append(_Slot(p))
                        if opts.fail_fast and p.status == "error":
                            break  # finish the inputs before it, report it, take no more
                    else:
                        slot = _Slot()
                        pending.append(slot)
                        batch.append((p, slot))
                        if len(batch) >= opts.batch_size:
                            failed = self._submit(cap, batch, writers)
                            batch = []
                            if opts.fail_fast and failed:
                                break
                    if self._write_failed:  # fail_fast: an earlier input failed to write
                        batch = []
                        break
                    yield from self._drain(pending, limit=window)
                    if self._stop:
                        return
                if batch:
                    self._submit(cap, batch, writers)
                yield from self._drain(pending, limit=0)
                if self._stop:
                    return
            finally:
                for slot in pending:
                    if isinstance(slot.value, Future):
                        slot.value.cancel()
                loaders.shutdown(wait=True, cancel_futures=True)
                writers.shutdown(wait=True, cancel_futures=True)

    def _submit(
        self,
        cap: Any,
        batch: list[tuple[_Prepared, _Slot]],
        writers: ThreadPoolExecutor,
    ) -> bool:
        """Run one batch and hand its results to the write workers; True when the batch failed."""
        import torch

        try:
            x = torch.stack([p.tensor for p, _ in batch])  # (B, 3, H, W)
            if self.loaded.device.type == "cuda":
                x = x.pin_memory()
            results = forward_batch(self.loaded, cap, x, self.settings)
        except VitattnError:
            raise
        except Exception as exc:  # e.g. out of memory on one batch: fail its inputs, go on
            for p, slot in batch:
                base = _base_record(p.item, self.loaded, self.settings)
                err = InputError(p.item.path, Reason.INFERENCE, _exc_line(exc))
                slot.value = _error_outcome(p.item, err, base)
            return True
        for (p, slot), att in zip(batch, results, strict=True):
            slot.value = writers.submit(self._write, p, att)
        return False

    def _drain(self, pending: deque[_Slot], *, limit: int) -> Iterator[Outcome]:
        """Yield finished outcomes from the front; block on the front while more than ``limit`` wait."""
        while pending:
            head = pending[0].value
            if head is None:  # still waiting for its batch
                return
            if isinstance(head, Future):
                if not head.done() and len(pending) <= limit:
                    return
                outcome = head.result()
            else:
                outcome = head
            pending.popleft()
            yield outcome
            if self.opts.fail_fast and outcome.status == "error":
                self._stop = True
                return


@dataclass
class _Slot:
    """An input's place in the output order: empty until its batch ran, then a write task or an outcome."""

    value: Future[Outcome] | Outcome | None = None


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Any, items: Iterable[InputItem], window: int
) -> Iterator[_Prepared | Outcome]:
    """Like ``pool.map`` but lazy over ``items`` with at most ``window`` tasks in flight."""
    inflight: deque[Future[_Prepared | Outcome]] = deque()
    for item in items:
        inflight.append(pool.submit(fn, item))
        if len(inflight) >= window:
            yield inflight.popleft().result()
    while inflight:
        yield inflight.popleft().result()


def _short_spec(spec: str) -> str:
    """A spec short enough for a picture title: ``local-dir:/a/long/path/shapes_vit`` -> ``local-dir:shapes_vit``."""
    if spec.startswith("local-dir:"):
        return "local-dir:" + (Path(spec.removeprefix("local-dir:")).name or spec.removeprefix("local-dir:"))
    return spec


def _shrink(
    photo: Image.Image, box: Box, max_side: int, pixels: torch.Tensor | None = None
) -> tuple[Image.Image, Box]:
    """Shrink the photo to the overlay size early (less to carry and blend); scale the box with it.

    An exact factor averages k x k blocks (Pillow's ``reduce``, about five times faster than resampling);
    otherwise, with ``pixels`` (the photo as a uint8 (3, H, W) tensor), torch's antialiased bilinear resampler
    does it, about twice as fast as Pillow's here; Pillow's otherwise.
    """
    from PIL import Image

    w, h = photo.size
    if max_side <= 0 or max(w, h) <= max_side:
        return photo, box
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if max(w, h) % max_side == 0:
        small = photo.reduce(max(w, h) // max_side)
    elif pixels is not None:
        import torch

        out = torch.nn.functional.interpolate(pixels[None], size=size[::-1], mode="bilinear", antialias=True)
        # (1, 3, h', w') in planar memory: merging three "L" planes costs ~0.1 ms, where handing Pillow the
        # interleaved (h', w', 3) view made it gather a strided copy (~1.9 ms per photo in the pipeline).
        planes = out[0].contiguous().numpy()  # (3, h', w')
        small = Image.merge("RGB", [Image.fromarray(plane) for plane in planes])
    else:
        small = photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    sx, sy = small.width / w, small.height / h
    return small, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _save(image: Image.Image, path: Path, ext: str) -> None:
    from vitattn.outputs import atomic_write
    from vitattn.render import save_image

    atomic_write(path, lambda tmp: save_image(image, tmp, format=ext))


def _block_files(folder: Path, b: int, settings: Settings, r: RenderOptions, fuse: HeadFusion) -> dict[str, Any]:
    """One block's ``files`` entry of a JSON record.

    raw: ``heads`` (one per head), ``mean`` (the fused map, whatever ``fuse`` is), ``grid``, ``npy``, ``masks``
    (``heads`` and ``mean``). Other methods: ``heads`` (empty), ``map`` (the method's map), ``grid``, ``npy``,
    ``masks`` (``map``). ``npy`` and ``masks`` only when written; ``meta`` always.
    """
    ext = r.format
    files: dict[str, Any]
    if settings.method is Method.raw:
        heads = [head_name(b, h, ext) for h in settings.heads]
        mean = fused_name(b, fuse.value, ext)
        files = {"heads": [str(folder / n) for n in heads], "mean": str(folder / mean)}
        masks: dict[str, Any] = {
            "heads": [str(folder / mask_name(n)) for n in heads],
            "mean": str(folder / mask_name(mean)),
        }
        npy = npy_name(b)
    else:
        name = method_name(b, settings.method.value, ext)
        files = {"heads": [], "map": str(folder / name)}
        masks = {"map": str(folder / mask_name(name))}
        npy = method_name(b, settings.method.value, "npy")
    files["grid"] = str(folder / grid_name(b, ext))
    if r.npy:
        files["npy"] = str(folder / npy)
    if r.threshold is not None:
        files["masks"] = masks
    files["meta"] = str(folder / META)
    return files


def _exc_line(exc: BaseException) -> str:
    """An unexpected exception as a short detail: its first line, or its type when it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _prediction(p: Prediction) -> dict[str, Any]:
    return {"index": p.index, "label": p.label, "prob": p.prob}


def _method_title(att: ImageAttention) -> str:
    if att.method is Method.raw:
        return ""
    target = f" of {att.target.label}" if att.target is not None else ""
    return f"{att.method.value}{target} · "


def _head_stats(att: ImageAttention) -> dict[str, Any]:
    """Per block and head: entropy over patches, mass on prefix tokens, grid position of the peak."""
    import numpy as np

    stats: dict[str, Any] = {}
    for b, bm in att.blocks.items():
        rows = []
        for k, head in enumerate(bm.head_ids):
            m = bm.heads[k]  # (gh, gw)
            total = float(m.sum())
            p = m / total if total > 0 else m
            entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
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
