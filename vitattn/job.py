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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn.attention import BlockMaps, ImageAttention, Settings, capturing, forward_batch
from vitattn.capture import AttentionCapture
from vitattn.decoding import load_image
from vitattn.discovery import InputItem
from vitattn.errors import CaptureError, InputError, Reason, VitattnError
from vitattn.maps import mass_mask
from vitattn.models import LoadedModel, describe
from vitattn.options import DEFAULT_MAX_PIXELS, Method, RenderOptions, RunOptions
from vitattn.outputs import (
    META,
    abandon_result,
    atomic_write,
    raise_if_fatal,
    read_meta,
    remove_files,
    resume_state,
    start_result,
    write_json,
    write_npy,
)
from vitattn.preprocess import Box, crop_box, peak_pixels, photo_tensor, tensor_transform
from vitattn.records import (
    BlockFiles,
    all_names,
    base_record,
    meta_record,
    record_rest,
    result_files,
    settings_record,
)

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
    photo: Image.Image  # upright RGB, already shrunk to the overlay size
    box: Box  # crop box in ``photo`` pixels
    tensor: torch.Tensor  # (3, H, W)
    image_size: tuple[int, int]  # (width, height) of the upright original, full resolution
    box_full: Box  # crop box in full-resolution photo pixels
    input_stat: dict[str, int]
    warnings: list[str]


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
        self.files = result_files(settings, render, self.fuse)
        self.settings_record = settings_record(loaded, settings, render)
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
    def prepare(self, item: InputItem) -> Prepared | Outcome:
        """Resume check, decode and preprocess one input (thread-safe)."""
        base = base_record(item, self.loaded, self.settings)
        if item.error is not None:
            return self._error(item, item.error, base)
        folder = self.render.out / item.rel
        try:
            st = os.stat(item.path)
            input_stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            state = resume_state(
                folder,
                self.settings_record,
                overwrite=self.run_options.overwrite,
                path=item.path,
                input_stat=input_stat,
                files=all_names(self.files),
            )
            if state == "skip":
                meta = read_meta(folder) or {}
                record = {**base, "status": "skipped", **record_rest(folder, self.files, self.settings.method, meta)}
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
        """Render and write one input's files atomically, meta.json last (thread-safe)."""
        folder = prep.folder
        base = base_record(prep.item, self.loaded, self.settings)
        bad = non_finite(att)
        if bad:  # strict JSON has no NaN, and a NaN map draws as nothing: the input fails, by name
            return self._error(prep.item, InputError(prep.item.path, Reason.NON_FINITE, bad), base)
        written: list[str] = []
        old: list[str] = []
        try:
            old = start_result(folder)
            for files in self.files:
                self._write_block(prep, att, att.blocks[files.block], files, written)
            meta = meta_record(
                base=base,
                settings=self.settings,
                settings_rec=self.settings_record,
                model_info=self.model_info,
                fuse=self.fuse,
                att=att,
                input_stat=prep.input_stat,
                image_size=prep.image_size,
                crop_box=prep.box_full,
                files=[*written, META],
                warnings=prep.warnings,
                threshold=self.render.threshold,
            )
            write_json(folder / META, meta)
        except BaseException as exc:
            abandon_result(folder, [*written, *old])  # a failed input leaves nothing half-done behind
            if isinstance(exc, OSError):
                raise_if_fatal(exc, folder)
            if isinstance(exc, (VitattnError, MemoryError)) or not isinstance(exc, Exception):
                raise
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc_line(exc)
            return self._error(prep.item, _caused(InputError(prep.item.path, Reason.WRITE, detail), exc), base)
        if old:
            remove_files(folder, set(old) - set(written) - {META})
        record = {**base, **record_rest(folder, self.files, self.settings.method, meta)}
        return Outcome(prep.item, "ok", record, folder, warnings=prep.warnings)

    def _write_block(
        self, prep: Prepared, att: ImageAttention, bm: BlockMaps, files: BlockFiles, written: list[str]
    ) -> None:
        """Draw and write one block's files, adding each name to ``written`` as soon as it is in place.

        raw: one overlay per head and the fused map. rollout / grad-rollout: the method's map instead;
        the grid picture shows the method's map next to the block's raw heads and fused map.
        """
        import numpy as np

        from vitattn.colors import map_ranges, scale_maps
        from vitattn.grids import GRID_TILE_SIDE, labelled_grid, scale_labels
        from vitattn.options import QueryKind
        from vitattn.overlays import mark_patch, mask_overlay, overlay_many

        r = self.render
        ext, folder, b = r.format.value, prep.folder, bm.block
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
            save_picture(picture, folder / name, ext)
            written.append(name)
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
                save_picture(marked([picture], prep.photo, box)[0], folder / name, ext)
                written.append(name)
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
        save_picture(labelled_grid(tiles, title=title, scale=scale), folder / files.grid, ext)
        written.append(files.grid)
        if files.npy:
            array = bm.heads if method is Method.raw else maps[0]  # (H', gh, gw) or (gh, gw)
            write_npy(folder / files.npy, array.astype(np.float32))
            written.append(files.npy)

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


def save_picture(image: Image.Image, path: Path, ext: str) -> None:
    from vitattn.imagefiles import save_image

    atomic_write(path, lambda tmp: save_image(image, tmp, format=ext))


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
