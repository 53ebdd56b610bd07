"""The heatmap job: the unit of work on a batch of inputs, with no scheduling of its own.

Three steps, each callable on its own: :meth:`HeatmapJob.prepare` (one input: resume check, decode,
preprocess), :meth:`HeatmapJob.infer` (one batch: capture, maps, predictions) and :meth:`HeatmapJob.write`
(one input: render and write atomically). :meth:`HeatmapJob.run_batch` runs the three in order over a batch,
for callers that bring their own scheduling (a cluster worker); :mod:`vitattn.scheduler` overlaps them
with threads. A failure of one input becomes its :class:`Outcome`; errors that concern every input
(:class:`~vitattn.errors.VitattnError` other than :class:`~vitattn.errors.InputError`) propagate.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn.attention import BlockMaps, ImageAttention, Settings, capturing, forward_batch
from vitattn.capture import AttentionCapture
from vitattn.decoding import load_image
from vitattn.discovery import InputItem
from vitattn.errors import CaptureError, InputError, Reason, VitattnError, display_path
from vitattn.maps import mass_mask
from vitattn.models import LoadedModel, describe
from vitattn.options import DEFAULT_MAX_PIXELS, Method, RenderOptions, RunOptions
from vitattn.preprocess import Box, crop_box, peak_pixels, photo_tensor, tensor_transform
from vitattn.records import (
    BlockFiles,
    base_record,
    folder_meta,
    identity_record,
    model_tag,
    picture_record,
    record_rest,
    recorded_path,
    result_entry,
    result_files,
)
from vitattn.store import META, ResultFolder, entry_complete, open_locked, peek, raise_if_fatal, results_of

if TYPE_CHECKING:
    import torch
    from PIL import Image


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
class Prepared:
    """One input, decoded and preprocessed, waiting for its batch."""

    item: InputItem
    folder: Path
    rel: str  # the folder below the output folder (the input's rel, or its suffixed form)
    photo: Image.Image  # upright RGB, already shrunk to the overlay size
    box: Box  # crop box in ``photo`` pixels
    tensor: torch.Tensor  # (3, H, W)
    image_size: tuple[int, int]  # (width, height) of the upright original, full resolution
    box_full: Box  # crop box in full-resolution photo pixels
    input_stat: dict[str, int]
    warnings: list[str]
    started: float = 0.0  # time.perf_counter() when preparing began


@dataclass
class Plan:
    """What a folder holds for this job's results, and what is left to do (see :meth:`HeatmapJob.plan`).

    Attributes:
        files: the result files per chosen block, named for this folder.
        todo: the blocks' results to write: missing, incomplete, drawn with other picture settings, or redone.
        entries: the folder's result entries (by key), as read.
        conflict: a result of the same name was made from another version of the input (or computed
            differently): not replaced without ``overwrite``.
    """

    files: list[BlockFiles]
    todo: list[BlockFiles]
    entries: dict[str, dict[str, Any]]
    conflict: bool = False


class HeatmapJob:
    """Everything needed to turn inputs into written results, for one model and one set of options."""

    def __init__(
        self, loaded: LoadedModel, settings: Settings, render: RenderOptions, run: RunOptions | None = None
    ) -> None:
        from vitattn.colors import colormap_lut

        self.loaded = loaded
        self.settings = settings
        self.render = render
        self.run_options = run or RunOptions()
        self.lut = colormap_lut(render.cmap)  # fails early on a bad name
        self.fuse = render.fuse or settings.fuse
        self.default_query = loaded.default_query
        self.model_key = {"model": loaded.spec, "weights": loaded.weights}
        self.model_tag = model_tag(loaded.spec, loaded.weights)
        self.identity = {b: identity_record(loaded, settings, b) for b in settings.blocks}
        self.picture = picture_record(settings, render, self.fuse)
        self.files = self.files_in("")
        self.transform = loaded.transform
        self.tensor_transform = tensor_transform(loaded.transform)  # None: run the transform on PIL pictures
        self.model_info = describe(loaded)
        _, h, w = loaded.data_config["input_size"]
        crop_pct = float(loaded.data_config.get("crop_pct") or 1.0)
        # JPEG draft decoding: the short side keeps what the model's resize needs, the long side the overlay
        # size; max_side 0 asks for the photo's own size, so nothing is reduced.
        need = int(max(h, w) / crop_pct)
        self.draft_size: tuple[int, int] | None = (need, need) if render.max_side > 0 else None

    # -- step 1: one input -> prepared, or its outcome -------------------------------------------
    def files_in(self, model_dir: str) -> list[BlockFiles]:
        """This job's result files, named for a folder where its model's sub-folder is ``model_dir``."""
        return result_files(
            self.settings,
            self.render,
            self.fuse,
            default_query=self.default_query,
            all_heads=self.loaded.num_heads,
            model_dir=model_dir,
        )

    def model_dir(self, meta: dict[str, Any] | None) -> str:
        """Where this model's results go in a folder: ``""`` when it is the folder's first model, else a
        sub-folder named after the model (with a suffix when another model has that name there)."""
        primary = (meta or {}).get("primary_model")
        if not primary or primary == self.model_key:
            return ""
        tag = self.model_tag
        for entry in results_of(meta).values():
            settings = entry.get("settings") or {}
            other = {"model": settings.get("model"), "weights": settings.get("weights")}
            if other != self.model_key and any(str(n).startswith(tag + "/") for n in entry.get("files", [])):
                import hashlib

                digest = hashlib.sha256(f"{self.loaded.spec}\0{self.loaded.weights}".encode()).hexdigest()[:8]
                return f"{tag}~{digest}"
        return tag

    def plan(self, meta: dict[str, Any] | None, size: Callable[[str], int | None], input_stat: dict[str, int]) -> Plan:
        """Compare a folder's results with this job's: which blocks are done, which need writing."""
        entries = results_of(meta)
        files = self.files_in(self.model_dir(meta))
        todo, conflict = [], False
        for f in files:
            entry = entries.get(f.key)
            if entry is None or entry.get("state") != "complete":
                todo.append(f)
                continue
            settings = entry.get("settings") or {}
            same_identity = all(settings.get(k) == v for k, v in self.identity[f.block].items())
            if entry.get("input_stat") != input_stat or not same_identity:
                conflict = conflict or not self.run_options.overwrite
                todo.append(f)
            elif (
                self.run_options.overwrite
                or any(settings.get(k) != v for k, v in self.picture.items())
                or not entry_complete(entry, size)
            ):
                todo.append(f)
        return Plan(files, todo, entries, conflict)

    def folder_for(self, item: InputItem, meta: dict[str, Any] | None) -> str | None:
        """Where ``item`` goes when its plain folder holds ``meta``: None for the plain folder, or the suffixed
        name when that folder belongs to another input (a name equal but for case, or an absolute and a
        relative path spelling one name)."""
        from vitattn.discovery import suffixed

        owner = (meta or {}).get("input_path")
        if meta is None or owner in (None, recorded_path(item.source)):
            return None
        return suffixed(item.rel, item.source)

    # -- step 1: one input -> prepared, or its outcome -------------------------------------------
    def prepare(self, item: InputItem) -> Prepared | Outcome:
        """Resume check, decode and preprocess one input (thread-safe)."""
        started = time.perf_counter()
        base = base_record(item, self.loaded, self.settings)
        if item.error is not None:
            return self._error(item, item.error, base)
        if item.duplicate_of is not None:
            note = f"the same file as {display_path(item.duplicate_of)}: processed once"
            record = {**base, "status": "skipped", "duplicate_of": display_path(item.duplicate_of)}
            return Outcome(item, "skipped", record, warnings=[note])
        rel = item.rel
        try:
            meta, sizes = peek(self.render.out / rel)
            other = self.folder_for(item, meta)
            if other is not None:
                rel = other
                meta, sizes = peek(self.render.out / rel)
            folder = self.render.out / rel
            st = os.stat(item.path)
            input_stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            plan = self.plan(meta, sizes, input_stat)
            if plan.conflict:
                raise InputError(item.path, Reason.OUTPUTS_EXIST, None)
            if not plan.todo:
                entries = [plan.entries[f.key] for f in plan.files]
                record = {**base, "status": "skipped", **record_rest(folder, plan.files, self.settings.method, entries)}
                return Outcome(item, "skipped", record, folder)
            loaded_img = load_image(
                item.path,
                max_pixels=self.run_options.max_pixels,
                min_size=self.draft_size,
                min_long_side=self.render.max_side,
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
            photo, box = shrink(photo, box, self.render.max_side, pixels)
        except InputError as err:
            return self._error(item, err, base)
        except OSError as exc:  # e.g. the file vanished between discovery and load
            return self._error(item, _caused(InputError(item.path, Reason.NO_SUCH_FILE, exc.strerror), exc), base)
        except (VitattnError, MemoryError):
            raise
        except Exception as exc:  # the model's transform failed on this one picture
            detail = f"preprocessing: {exc_line(exc)}"
            return self._error(item, _caused(InputError(item.path, Reason.INFERENCE, detail), exc), base)
        return Prepared(
            item=item,
            folder=folder,
            rel=rel,
            photo=photo,
            box=box,
            tensor=tensor,
            image_size=full,
            box_full=box_full,
            input_stat=input_stat,
            warnings=loaded_img.warnings,
            started=started,
        )

    def _check_preprocessing_size(self, path: str, size: tuple[int, int]) -> None:
        """Refuse a picture whose preprocessing would exceed the pixel limit (a 1×3000 strip, resized by its
        short side, becomes 168×504000 before the centre crop). A limit set below Pillow's default applies to
        the picture only: every picture is resized to about the model's input size."""
        limit = self.run_options.max_pixels
        if limit is not None:
            limit = max(limit, DEFAULT_MAX_PIXELS)
        peak = peak_pixels(self.transform, size)
        if limit is not None and peak > limit:
            w, h = size
            detail = f"{w}×{h} resized for the model is {peak} pixels, limit {limit}; raise the pixel limit"
            raise InputError(path, Reason.TOO_LARGE, detail)

    # -- step 2: a batch through the model -------------------------------------------------------
    def capture(self) -> contextlib.AbstractContextManager[AttentionCapture]:
        """The capture scope :meth:`infer` runs in; hold one open over many batches."""
        return capturing(self.loaded, self.settings)

    def infer(self, cap: AttentionCapture, batch: Sequence[Prepared]) -> list[ImageAttention] | list[Outcome]:
        """One forward pass over a batch: its maps, or (the batch failed, e.g. out of memory) one error
        outcome per input."""
        import torch

        try:
            x = torch.stack([p.tensor for p in batch])  # (B, 3, H, W)
            if self.loaded.device.type == "cuda":
                x = x.pin_memory()
            return forward_batch(self.loaded, cap, x, self.settings)
        except VitattnError:
            raise
        except Exception as exc:
            return [
                self._error(p.item, _caused(InputError(p.item.path, Reason.INFERENCE, exc_line(exc)), exc))
                for p in batch
            ]

    # -- step 3: one input's result -> files -----------------------------------------------------
    def write(self, prep: Prepared, att: ImageAttention) -> Outcome:
        """Render and write one input's results into its folder, under the folder's lock (thread-safe).

        The folder is read again once locked (another writer may have finished these results meanwhile),
        the results to write are recorded in meta.json as ``writing`` with the files they replace, the files
        are written, then meta.json records them complete and files no result lists any more are removed.
        """
        item = prep.item
        base = base_record(item, self.loaded, self.settings)
        bad = non_finite(att)
        if bad:  # strict JSON has no NaN, and a NaN map draws as nothing: the input fails, by name
            return self._error(item, InputError(item.path, Reason.NON_FINITE, bad), base)
        rel = prep.rel
        try:
            for _ in range(2):
                with open_locked(self.render.out, rel, item.path) as rf:
                    meta = rf.read_meta()
                    other = self.folder_for(item, meta) if rel == item.rel else None
                    if other is not None:  # the folder was taken by another input meanwhile
                        rel = other
                        continue
                    return self._write_locked(rf, meta, prep, att, base)
            raise InputError(item.path, Reason.WRITE, f"{display_path(self.render.out / rel)} belongs to another input")
        except InputError as err:
            return self._error(item, err, base)
        except OSError as exc:
            raise_if_fatal(exc, self.render.out / rel)
            return self._error(item, _caused(InputError(item.path, Reason.WRITE, exc.strerror or str(exc)), exc), base)

    def _write_locked(
        self, rf: ResultFolder, meta: dict[str, Any] | None, prep: Prepared, att: ImageAttention, base: dict[str, Any]
    ) -> Outcome:
        item = prep.item
        plan = self.plan(meta, rf.size, prep.input_stat)
        if plan.conflict:
            raise InputError(item.path, Reason.OUTPUTS_EXIST, None)
        results = dict(plan.entries)
        if not plan.todo:  # another writer made them while this one computed
            entries = [results[f.key] for f in plan.files]
            record = {**base, "status": "skipped", **record_rest(rf.path, plan.files, self.settings.method, entries)}
            return Outcome(item, "skipped", record, rf.path)
        primary = (meta or {}).get("primary_model") or self.model_key
        latest = list((meta or {}).get("latest") or [])
        todo = {f.key for f in plan.todo}
        # results whose writer died (state "writing") and that this run does not redo: drop them
        dead = [k for k, e in results.items() if e.get("state") != "complete" and k not in todo]
        leftovers = {n for k in dead for n in _names(results.pop(k))}
        if meta is not None and meta.get("format") is None:  # a result of vitattn 0.1 (one per folder): replaced whole
            leftovers |= {n for n in meta.get("files", []) if isinstance(n, str) and n != META}
        replaced = {f.key: _names(results[f.key]) if f.key in results else set() for f in plan.todo}
        for f in plan.todo:
            results[f.key] = {"state": "writing", "files": f.names(), "old_files": sorted(replaced[f.key])}

        def save(keys: list[str]) -> None:
            meta = folder_meta(
                input_path=base["input"],
                source=recorded_path(item.source),
                primary_model=primary,
                results=results,
                latest=keys,
            )
            rf.write_meta(meta)

        subdirs = {f.key.rpartition("/")[0] for f in plan.files}
        rf.remove_stale_temps(subdirs)
        written: list[str] = []
        try:
            save(latest)  # the durable record: these results are being written, and what they replace
            for f in plan.todo:
                old = plan.entries.get(f.key)
                keep_npy = bool(
                    f.npy
                    and old is not None
                    and old.get("state") == "complete"
                    and f.npy in old.get("files", [])
                    and old.get("input_stat") == prep.input_stat
                    and all((old.get("settings") or {}).get(k) == v for k, v in self.identity[f.block].items())
                    and rf.size(f.npy) == (old.get("sizes") or {}).get(f.npy)
                    and not self.run_options.overwrite
                )
                sizes = self._write_block(rf, prep, att, att.blocks[f.block], f, written, keep_npy=keep_npy)
                entry = result_entry(
                    identity=self.identity[f.block],
                    picture=self.picture,
                    model_info=self.model_info,
                    att=att,
                    block=f.block,
                    fuse=self.fuse,
                    input_stat=prep.input_stat,
                    image_size=prep.image_size,
                    crop_box=prep.box_full,
                    files=f.names(),
                    warnings=prep.warnings,
                    seconds=time.perf_counter() - prep.started,
                )
                entry["sizes"] = sizes
                results[f.key] = entry
            # the files no result has any more go before meta.json says complete: a kill in between leaves the
            # entries "writing", so the next run redoes them, never a complete result next to stray old files
            keep = {n for e in results.values() for n in _names(e)}
            rf.remove((leftovers | {n for f in plan.todo for n in replaced[f.key]}) - keep)
            save([f.key for f in plan.files])
        except BaseException as exc:
            # a failed input leaves nothing half-done: its files go, its entries go, the others stay
            for f in plan.todo:
                results.pop(f.key, None)
            keep = {n for e in results.values() for n in _names(e)}
            rf.remove((set(written) | leftovers | {n for f in plan.todo for n in replaced[f.key]}) - keep)
            with contextlib.suppress(Exception):
                if results:
                    save([k for k in latest if k in results])
                else:  # nothing else was there: no meta.json either
                    rf.remove([META])
            if isinstance(exc, OSError):
                raise_if_fatal(exc, rf.path)
            if isinstance(exc, (VitattnError, MemoryError)) or not isinstance(exc, Exception):
                raise
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc_line(exc)
            raise _caused(InputError(item.path, Reason.WRITE, detail), exc) from exc
        entries = [results[f.key] for f in plan.files]
        record = {**base, **record_rest(rf.path, plan.files, self.settings.method, entries)}
        return Outcome(item, "ok", record, rf.path, warnings=prep.warnings)

    def _write_block(
        self,
        rf: ResultFolder,
        prep: Prepared,
        att: ImageAttention,
        bm: BlockMaps,
        files: BlockFiles,
        written: list[str],
        *,
        keep_npy: bool = False,
    ) -> dict[str, int]:
        """Draw and write one block's files, adding each name to ``written`` as soon as it is in place;
        returns their sizes. ``keep_npy``: the array file in place holds these very numbers (a re-render).

        raw: one overlay per head and the fused map. rollout / grad-rollout: the method's map instead;
        the grid picture shows the method's map next to the block's raw heads and fused map.
        """
        import numpy as np

        from vitattn.colors import map_ranges, scale_maps
        from vitattn.grids import GRID_TILE_SIDE, labelled_grid, scale_labels
        from vitattn.options import QueryKind
        from vitattn.overlays import mark_patch, mask_overlay, overlay_many

        r = self.render
        ext, b = r.format.value, bm.block
        sizes: dict[str, int] = {}

        def save(name: str, picture: Image.Image) -> None:
            from vitattn.imagefiles import save_image

            sizes[name] = rf.write(name, lambda f: save_image(picture, f, format=ext))
            written.append(name)

        box, side = prep.box, r.max_side
        fused = bm.fused(self.fuse)  # (gh, gw)
        raw = np.concatenate([bm.heads, fused[None]], axis=0)  # (H' + 1, gh, gw)
        labels = [f"head {h}" for h in bm.head_ids] + [self.fuse.value]
        scaled = scale_maps(raw, shared=r.shared_scale)  # (H' + 1, gh, gw)
        ranges = map_ranges(raw, shared=False)  # each tile's own values
        method = att.method
        if method is Method.raw:
            maps = raw  # what gets its own files
        else:
            if bm.method_map is None:
                raise CaptureError(f"block {b}: no {method.value} map was computed")
            maps = bm.method_map[None]  # (1, gh, gw)
            scaled = np.concatenate([scale_maps(maps, shared=False), scaled], axis=0)  # (1 + H' + 1, gh, gw)
            ranges = map_ranges(maps, shared=False) + ranges
            labels = [method.value] + [f"raw {label}" for label in labels]
        q = att.query
        cell = (q.row, q.col) if q.kind is QueryKind.patch else None

        def marked(pics: list[Image.Image], photo: Image.Image, crop: Box) -> list[Image.Image]:
            """The query patch outlined on every picture (``patch:R,C`` queries)."""
            if cell is not None:
                for pic in pics:
                    mark_patch(pic, photo_size=photo.size, crop_box=crop, grid=fused.shape, cell=cell)
            return pics

        names = files.maps
        pictures = overlay_many(
            prep.photo, scaled[: len(names)], crop_box=box, lut=self.lut, alpha=r.alpha, max_side=side
        )
        for name, picture in zip(names, marked(pictures, prep.photo, box), strict=True):
            save(name, picture)
        tile = GRID_TILE_SIDE
        tile_photo, tile_box = shrink(prep.photo, box, tile)
        mask_tiles: list[tuple[str, Image.Image]] = []
        if files.masks:
            assert r.threshold is not None  # masks are listed only with a threshold
            top_color = self.lut[-1]  # the colormap's brightest colour outlines the masks
            color = (int(top_color[0]), int(top_color[1]), int(top_color[2]))
            mask_labels = labels[: len(files.masks)]
            for name, heat, label in zip(files.masks, maps, mask_labels, strict=True):
                mask = mass_mask(heat, r.threshold)  # (gh, gw) bool
                picture = mask_overlay(prep.photo, mask, crop_box=box, color=color, max_side=side)
                save(name, marked([picture], prep.photo, box)[0])
                small_mask = mask_overlay(tile_photo, mask, crop_box=tile_box, color=color, max_side=tile)
                small_mask = marked([small_mask], tile_photo, tile_box)[0]
                mask_tiles.append((f"{label}: {r.threshold:.0%} of mass", small_mask))
        title = grid_title(self.loaded.spec, self.loaded.weights, b, att)
        # Grid tiles: the written overlays halved (or quartered...) by pixel averaging when their long side is
        # a multiple of the tile size (the default: 512 = 2 x 256), cheaper than drawing them again; otherwise
        # (a smaller photo keeps its size: max_side never enlarges), and for maps without files of their own,
        # drawn at tile size from a small copy of the photo.
        long_side = max(pictures[0].size) if pictures else 0
        factor = long_side // tile if long_side >= tile and long_side % tile == 0 else 0
        small = [p.reduce(factor) if factor > 1 else p for p in pictures] if factor else []
        if len(small) < len(scaled):
            small += marked(
                overlay_many(
                    tile_photo, scaled[len(small) :], crop_box=tile_box, lut=self.lut, alpha=r.alpha, max_side=tile
                ),
                tile_photo,
                tile_box,
            )
        blank = np.zeros((1, *fused.shape), np.float32)  # alpha 0: just the dimmed photo
        plain = overlay_many(tile_photo, blank, crop_box=tile_box, lut=self.lut, alpha=0.0, max_side=tile)
        shared_from = len(scaled) - len(raw) if r.shared_scale else None  # the raw tiles share one scale
        which = "raw heads" if method is not Method.raw else "heads"
        tile_labels, scale = scale_labels(labels, ranges, self.lut, shared_from=shared_from, shared_what=which)
        tiles = [("photo", marked(plain, tile_photo, tile_box)[0]), *zip(tile_labels, small, strict=True), *mask_tiles]
        save(files.grid, labelled_grid(tiles, title=title, scale=scale))
        if files.npy and keep_npy:
            size = rf.size(files.npy)
            assert size is not None  # checked by the caller
            sizes[files.npy] = size
        elif files.npy:
            array = (bm.heads if method is Method.raw else maps[0]).astype(np.float32)  # (H', gh, gw) or (gh, gw)
            sizes[files.npy] = rf.write(files.npy, lambda f: np.save(f, array))
            written.append(files.npy)
        return sizes

    # -- the three steps over one batch ------------------------------------------------------------
    def run_batch(self, items: Sequence[InputItem], cap: AttentionCapture | None = None) -> list[Outcome]:
        """Prepare, infer and write a batch in the calling thread; one outcome per input, in order.

        Args:
            cap: an open capture scope (:meth:`capture`) to reuse; None opens one for this batch.
        """
        if cap is None:
            with self.capture() as scope:
                return self.run_batch(items, scope)
        steps = [self.prepare(item) for item in items]
        batch = [p for p in steps if isinstance(p, Prepared)]
        results: Iterator[ImageAttention | Outcome] = iter(self.infer(cap, batch) if batch else [])
        outcomes = []
        for step in steps:
            if isinstance(step, Outcome):
                outcomes.append(step)
                continue
            result = next(results)
            outcomes.append(result if isinstance(result, Outcome) else self.write(step, result))
        return outcomes

    def _error(self, item: InputItem, err: InputError, base: dict[str, Any] | None = None) -> Outcome:
        base = base if base is not None else base_record(item, self.loaded, self.settings)
        return Outcome(item=item, status="error", record={**base, "status": "error", "error": err.message}, error=err)


def non_finite(att: ImageAttention) -> str | None:
    """What holds NaN or infinite values (attention maps, predictions), or None when everything is finite."""
    import numpy as np

    for b, bm in att.blocks.items():
        arrays = [bm.heads, bm.prefix] + ([bm.method_map] if bm.method_map is not None else [])
        if not all(np.isfinite(a).all() for a in arrays):
            return f"NaN or infinite attention in block {b}"
    scores = [p.prob for p in att.top] + ([att.target.prob] if att.target is not None else [])
    if not all(np.isfinite(scores)):
        return "NaN or infinite class probabilities"
    return None


def grid_title(spec: str, weights: str, block: int, att: ImageAttention) -> str:
    """A grid picture's title: model (stamped when its weights are random), block, method, query, top-1."""
    random = weights == "random"
    title = f"{short_spec(spec)}{' (RANDOM WEIGHTS)' if random else ''} · block {block} · {_method_title(att)}"
    title += f"query {att.query}"
    if att.top and not random:  # a random model's prediction says nothing and would crowd the facts out
        title += f" · top: {att.top[0].label} ({att.top[0].prob:.1%})"
    return title


def short_spec(spec: str) -> str:
    """A spec short enough for a picture title: ``local-dir:/a/long/path/shapes_vit`` -> ``local-dir:shapes_vit``."""
    if spec.startswith("local-dir:"):
        return "local-dir:" + (Path(spec.removeprefix("local-dir:")).name or spec.removeprefix("local-dir:"))
    return spec


def shrink(photo: Image.Image, box: Box, max_side: int, pixels: torch.Tensor | None = None) -> tuple[Image.Image, Box]:
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


def _names(entry: dict[str, Any]) -> set[str]:
    """Every file a result entry may have left in its folder: its files, and those it was replacing."""
    names = [*entry.get("files", []), *entry.get("old_files", [])]
    return {n for n in names if isinstance(n, str)}


def _caused(err: InputError, exc: BaseException) -> InputError:
    """The input's error with the exception behind it attached (``--debug`` shows its traceback)."""
    err.__cause__ = exc
    return err


def exc_line(exc: BaseException) -> str:
    """An unexpected exception as a short detail: its first line, or its type when it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _method_title(att: ImageAttention) -> str:
    if att.method is Method.raw:
        return ""
    target = f" of {att.target.label}" if att.target is not None else ""
    return f"{att.method.value}{target} · "
