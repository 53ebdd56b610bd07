"""The streaming run: inputs -> load + preprocess (workers) -> model batches -> render + write (workers).

Stages overlap: pictures are decoded and preprocessed ahead of the model by a small thread pool, the model
runs batches in the calling thread, and overlays are rendered and written behind it by another pool.
Every queue is bounded, so memory does not grow with the number of inputs. Outcomes come back in input
order, one per discovered input; a failure of one input never stops the others (unless ``fail_fast``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn._version import __version__
from vitattn.attention import ImageAttention, Settings, capturing, forward_batch
from vitattn.errors import InputError, OutputError, Reason, VitattnError, display_path
from vitattn.inputs import DEFAULT_MAX_PIXELS, InputItem, load_image
from vitattn.maps import HeadFusion
from vitattn.models import LoadedModel, describe
from vitattn.outputs import (
    META,
    grid_name,
    head_name,
    mean_name,
    npy_name,
    read_meta,
    remove_files,
    remove_stale_temps,
    resume_state,
    write_json,
    write_npy,
)
from vitattn.preprocess import Box, crop_box

if TYPE_CHECKING:
    import torch
    from PIL import Image

FORMATS = ("png", "jpg", "webp")
DRAFT_MARGIN = 2  # JPEG draft decoding keeps at least 2x the resolution that preprocessing and overlays use


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
        fuse: how heads are combined for the fused map.
    """

    out: Path
    cmap: str = "inferno"
    alpha: float = 0.6
    max_side: int = 512
    shared_scale: bool = False
    npy: bool = False
    format: str = "png"
    fuse: HeadFusion = HeadFusion.mean


@dataclass(frozen=True)
class RunOptions:
    """How the batch run behaves."""

    batch_size: int = 16
    overwrite: bool = False
    fail_fast: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_workers: int = 1
    render_workers: int = 2


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
    image_size: tuple[int, int]  # (width, height) of the upright original
    input_stat: dict[str, int]
    warnings: list[str]


def settings_record(loaded: LoadedModel, settings: Settings, render: RenderOptions) -> dict[str, Any]:
    """Everything that decides an input's outputs; a rerun with the same record skips the input."""
    return {
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
        "fuse": render.fuse.value,
    }


def _base_record(item: InputItem, loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    return {
        "input": display_path(item.path) if _undecodable(item.path) else item.path,
        "status": "ok",
        "model": loaded.spec,
        "block": settings.blocks[0],
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
        from vitattn.render import colormap_lut

        self.loaded = loaded
        self.settings = settings
        self.render_opts = render
        self.opts = run
        self.lut = colormap_lut(render.cmap)  # fails early on a bad name
        self.settings_record = settings_record(loaded, settings, render)
        self.transform = loaded.transform
        self.model_info = describe(loaded)
        _, h, w = loaded.data_config["input_size"]
        crop_pct = float(loaded.data_config.get("crop_pct") or 1.0)
        need = max(int(max(h, w) / crop_pct), render.max_side) * DRAFT_MARGIN
        self.draft_size = (need, need)
        self._stop = False

    # -- stage 1: load + preprocess (worker threads) -------------------------------------------
    def _prepare(self, item: InputItem) -> _Prepared | Outcome:
        base = _base_record(item, self.loaded, self.settings)
        if item.error is not None:
            return _error_outcome(item, item.error, base)
        folder = self.render_opts.out / item.rel
        try:
            state = resume_state(folder, self.settings_record, overwrite=self.opts.overwrite, path=item.path)
            if state == "skip":
                files = _record_files(folder, self.settings, self.render_opts)
                meta = read_meta(folder) or {}
                record = {**base, "status": "skipped", "files": files, "top": meta.get("top", [])}
                return Outcome(item, "skipped", record, folder)
            st = os.stat(item.path)
            loaded_img = load_image(item.path, max_pixels=self.opts.max_pixels, min_size=self.draft_size)
            photo = loaded_img.image
            size = photo.size
            box = crop_box(self.transform, size)
            tensor = self.transform(photo)  # (3, H, W)
            photo, box = _shrink(photo, box, self.render_opts.max_side)
        except InputError as err:
            return _error_outcome(item, err, base)
        except OSError as exc:  # e.g. the file vanished between discovery and load
            return _error_outcome(item, InputError(item.path, Reason.NO_SUCH_FILE, exc.strerror), base)
        return _Prepared(
            item=item,
            folder=folder,
            photo=photo,
            box=box,
            tensor=tensor,
            image_size=size,
            input_stat={"size": st.st_size, "mtime_ns": st.st_mtime_ns},
            warnings=loaded_img.warnings,
        )

    # -- stage 3: render + write (worker threads) -----------------------------------------------
    def _write(self, prep: _Prepared, att: ImageAttention) -> Outcome:
        import numpy as np

        from vitattn.render import labelled_grid, overlay_many, scale_maps

        r = self.render_opts
        ext = r.format
        folder = prep.folder
        base = _base_record(prep.item, self.loaded, self.settings)
        old = _read_old_files(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder)
            written: list[str] = []
            for b, bm in att.blocks.items():
                fused = bm.fused(r.fuse)  # (gh, gw)
                stack = np.concatenate([bm.heads, fused[None]], axis=0)  # (H' + 1, gh, gw)
                scaled = scale_maps(stack, shared=r.shared_scale)
                photo_only = np.zeros((1, *fused.shape), dtype=np.float32)  # alpha 0: just the dimmed photo
                pictures = overlay_many(
                    prep.photo, scaled, crop_box=prep.box, lut=self.lut, alpha=r.alpha, max_side=r.max_side
                )
                plain = overlay_many(
                    prep.photo, photo_only, crop_box=prep.box, lut=self.lut, alpha=0.0, max_side=r.max_side
                )
                names = [head_name(b, head, ext) for head in bm.head_ids] + [mean_name(b, ext)]
                labels = [f"head {head}" for head in bm.head_ids] + [r.fuse.value]
                for name, picture in zip(names, pictures, strict=True):
                    _save(picture, folder / name, ext)
                    written.append(name)
                best = f" · top: {att.top[0].label} ({att.top[0].prob:.1%})" if att.top else ""
                title = f"{self.loaded.spec} · block {b} · query {att.query}{best}"
                tiles = [("photo", plain[0]), *zip(labels, pictures, strict=True)]
                name = grid_name(b, ext)
                _save(labelled_grid(tiles, title=title), folder / name, ext)
                written.append(name)
                if r.npy:
                    name = npy_name(b)
                    write_npy(folder / name, bm.heads.astype(np.float32))
                    written.append(name)
            top = [{"index": p.index, "label": p.label, "prob": p.prob} for p in att.top]
            meta = {
                "vitattn": __version__,
                "input": base["input"],
                "input_stat": prep.input_stat,
                "image_size": list(prep.image_size),
                "settings": self.settings_record,
                "model": self.model_info,
                "blocks": list(self.settings.blocks),
                "query": str(att.query),
                "grid": list(att.grid),
                "heads": list(self.settings.heads),
                "crop_box": [round(v, 3) for v in crop_box(self.transform, prep.image_size)],
                "top": top,
                "head_stats": _head_stats(att),
                "files": [*written, META],
                "warnings": prep.warnings,
            }
            write_json(folder / META, meta)
            if old:
                remove_files(folder, set(old) - set(written) - {META})
        except OutputError:
            raise
        except OSError as exc:
            err = InputError(prep.item.path, Reason.WRITE, f"{exc.strerror or exc}")
            return _error_outcome(prep.item, err, base)
        record = {**base, "files": _record_files(folder, self.settings, r), "top": top}
        return Outcome(prep.item, "ok", record, folder, warnings=prep.warnings)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, items: Iterable[InputItem]) -> Iterator[Outcome]:
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
                    else:
                        slot = _Slot()
                        pending.append(slot)
                        batch.append((p, slot))
                        if len(batch) >= opts.batch_size:
                            self._submit(cap, batch, writers)
                            batch = []
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
    ) -> None:
        import torch

        x = torch.stack([p.tensor for p, _ in batch])  # (B, 3, H, W)
        if self.loaded.device.type == "cuda":
            x = x.pin_memory()
        try:
            results = forward_batch(self.loaded, cap, x, self.settings)
        except VitattnError:
            raise
        except RuntimeError as exc:  # e.g. out of memory on one batch: fail its inputs, go on
            for p, slot in batch:
                base = _base_record(p.item, self.loaded, self.settings)
                err = InputError(p.item.path, Reason.INFERENCE, str(exc).splitlines()[0][:200])
                slot.value = _error_outcome(p.item, err, base)
            return
        for (p, slot), att in zip(batch, results, strict=True):
            slot.value = writers.submit(self._write, p, att)

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


def _shrink(photo: Image.Image, box: Box, max_side: int) -> tuple[Image.Image, Box]:
    """Shrink the photo to the overlay size early (less to carry and blend); scale the box with it."""
    from PIL import Image

    w, h = photo.size
    if max_side <= 0 or max(w, h) <= max_side:
        return photo, box
    s = max_side / max(w, h)
    small = photo.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR, reducing_gap=2.0)
    sx, sy = small.width / w, small.height / h
    return small, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _save(image: Image.Image, path: Path, ext: str) -> None:
    from vitattn.outputs import atomic_write
    from vitattn.render import save_image

    atomic_write(path, lambda tmp: save_image(image, tmp, format=ext))


def _record_files(folder: Path, settings: Settings, r: RenderOptions) -> dict[str, Any]:
    """The ``files`` entry of a JSON record, for the first chosen block."""
    b = settings.blocks[0]
    files: dict[str, Any] = {
        "heads": [str(folder / head_name(b, h, r.format)) for h in settings.heads],
        "mean": str(folder / mean_name(b, r.format)),
        "grid": str(folder / grid_name(b, r.format)),
    }
    if r.npy:
        files["npy"] = str(folder / npy_name(b))
    files["meta"] = str(folder / META)
    return files


def _read_old_files(folder: Path) -> list[str]:
    meta = read_meta(folder)
    files = meta.get("files") if meta else None
    return [str(f) for f in files] if isinstance(files, list) else []


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
