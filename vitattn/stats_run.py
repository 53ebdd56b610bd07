"""The dataset-statistics run: many pictures streamed through the model, reduced inside the capture hook.

:func:`start_stats` (what ``vitattn stats`` calls) discovers inputs as the heatmap command does, decodes
them ahead of the model in a small thread pool, runs batches with a :class:`~vitattn.statistics.StatsReducer`
in the capture hook (peak memory: one block's attention for one batch), and adds each batch to running sums.
Every ``checkpoint_seconds``, and when the run ends or is interrupted, the sums since the last save go to
``REPORT/partial/`` with the inputs they count; a rerun skips those inputs. :func:`dataset_stats` is the
same computation for Python users, returning the :class:`~vitattn.stats_report.DatasetStats` object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, Union

from vitattn.attention import Settings, autocast, resolve_settings
from vitattn.capture import AttentionCapture
from vitattn.decoding import load_image
from vitattn.discovery import InputItem
from vitattn.errors import InputError, Reason, UsageError, VitattnError
from vitattn.heatmap import as_loaded
from vitattn.job import Outcome, exc_line
from vitattn.options import (
    DEFAULT_MAX_PIXELS,
    AttentionOptions,
    InputOptions,
    ModelOptions,
    Query,
    QueryKind,
    RunOptions,
    StatsOptions,
)
from vitattn.preprocess import peak_pixels, photo_tensor, tensor_transform
from vitattn.statistics import StatsReducer, StatsState, merge_states, stat_names
from vitattn.stats_report import (
    PARTIAL,
    DatasetStats,
    check_settings,
    compact,
    part_files,
    read_partial,
    remove_parts,
    report_lock,
    write_part,
    write_report,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from vitattn.models import LoadedModel

T = TypeVar("T")
One = Union["Image.Image", str, "os.PathLike[str]"]


def stats_attention(loaded: LoadedModel, attention: AttentionOptions | None) -> Settings:
    """The attention settings of a statistics run: every block by default, and top-1 predictions (for the
    per-class maps) when the model has a classifier, unless ``top_k`` is 0."""
    o = attention or AttentionOptions(blocks=None)
    if o.top_k is None:
        o = dataclasses.replace(o, top_k=1 if loaded.num_classes > 0 else 0)
    # the statistics read self-attention over the model's own patch grid (the distances are in its patches)
    eligible = [b for b, site in enumerate(loaded.sites) if site.kind == "self" and site.layout == loaded.layout]
    if o.blocks is None:
        if not eligible:
            raise UsageError(
                f"vitattn stats reads self-attention over the patch grid, and {loaded.spec} has no such block "
                f"(its blocks: {', '.join(sorted({s.kind for s in loaded.sites}))} attention)",
                option="blocks",
            )
        o = dataclasses.replace(o, blocks=tuple(eligible))
    else:
        for b in o.blocks:
            site = loaded.sites[loaded.resolve_block(b)]
            if loaded.resolve_block(b) not in eligible:
                raise UsageError(
                    f"block {b} is a {site.kind}-attention block over another grid: vitattn stats reads "
                    "self-attention over the model's patch grid",
                    option="blocks",
                )
    if o.query is None:  # the class token's row where there is one (not an attention-pool head's query)
        o = dataclasses.replace(o, query=Query(QueryKind.cls if loaded.layout.has_cls else QueryKind.patch_mean))
    return resolve_settings(loaded, o)


def stats_settings(loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    """Everything that decides the numbers; reports merge and runs resume only when these are equal."""
    from vitattn.models import RANDOM_WEIGHTS_SEED

    record: dict[str, Any] = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "blocks": list(settings.blocks),
        "heads": loaded.num_heads,
        "query": str(settings.query),
        "grid": list(settings.grid),
        "patch_size": list(loaded.layout.patch_size),
        "prefix_tokens": list(loaded.layout.roles),
        "input_size": list(loaded.input_size),
        "precision": settings.precision.value,
        "class_maps_block": settings.blocks[-1],
        "classes": settings.top_k > 0,
    }
    if loaded.weights == "random":
        record["seed"] = RANDOM_WEIGHTS_SEED
    return record


def empty_state(loaded: LoadedModel, settings: Settings) -> StatsState:
    return StatsState(settings.blocks, loaded.num_heads, settings.grid, stat_names(loaded.layout.roles))


def stats_capture(loaded: LoadedModel, settings: Settings) -> AttentionCapture:
    """A capture scope whose hook reduces each chosen block to per-image statistics."""
    reducer = StatsReducer(loaded.layout, settings.grid, settings.query, map_block=settings.blocks[-1])
    return AttentionCapture(
        loaded.model, settings.blocks, reduce=reducer, stop_early=settings.top_k == 0, family=loaded.family
    )


def infer(
    loaded: LoadedModel, cap: AttentionCapture, x: torch.Tensor, settings: Settings
) -> tuple[StatsState, list[int] | None, list[bool]]:
    """One batch (B, 3, H, W): its statistics as a state of its own, the top-1 classes, and which images had
    finite attention and scores (only those are in the state)."""
    import torch

    with torch.inference_mode(), autocast(loaded.device, settings.precision):
        logits, captured = cap.run(x.to(loaded.device, non_blocking=True))
    n = int(x.shape[0])
    finite = torch.ones(n, dtype=torch.bool)
    for values in captured.values():
        for v in values.values():
            if v.is_floating_point():
                finite &= torch.isfinite(v.reshape(n, -1)).all(dim=1)  # (B,)
    top1 = None
    if logits is not None and settings.top_k:
        scores = logits.float()
        finite &= torch.isfinite(scores).all(dim=1).cpu()
        top1 = scores.argmax(dim=-1).tolist()  # (B,)
    keep = finite.tolist()
    state = empty_state(loaded, settings)
    state.add(captured, top1, keep)
    return state, top1, keep


def input_key(path: str) -> str:
    """How an input is known in ``partial/``: its resolved absolute path (the same file under another name
    or from another folder is the same input)."""
    return os.path.realpath(path)


@dataclass
class _Prepared:
    item: InputItem
    key: str
    tensor: torch.Tensor  # (3, H, W)
    warnings: list[str]


class StatsJob:
    """Per-input and per-batch steps of a statistics run (thread-safe :meth:`prepare`)."""

    def __init__(self, loaded: LoadedModel, settings: Settings, run: RunOptions, done: set[str]) -> None:
        self.loaded, self.settings, self.run_options, self.done = loaded, settings, run, done
        self.transform = loaded.transform
        self.tensor_transform = tensor_transform(loaded.transform)
        h, w = loaded.input_size
        crop_pct = float(loaded.data_config.get("crop_pct") or 1.0)
        need = int(max(h, w) / crop_pct)
        self.draft_size = (need, need)

    def record(self, item: InputItem, status: str) -> dict[str, Any]:
        from vitattn.errors import display_path

        return {"input": display_path(item.path), "status": status, "model": self.loaded.spec}

    def error(self, item: InputItem, err: InputError) -> Outcome:
        return Outcome(item, "error", {**self.record(item, "error"), "error": err.message}, error=err)

    def prepare(self, item: InputItem) -> _Prepared | Outcome:
        if item.error is not None:
            return self.error(item, item.error)
        if item.duplicate_of is not None:  # the same file again: counted once
            from vitattn.errors import display_path

            record = {**self.record(item, "skipped"), "duplicate_of": display_path(item.duplicate_of)}
            note = f"the same file as {record['duplicate_of']}: counted once"
            return Outcome(item, "skipped", record, warnings=[note])
        key = input_key(item.path)
        if key in self.done:
            return Outcome(item, "skipped", self.record(item, "skipped"))
        try:
            loaded_img = load_image(item.path, max_pixels=self.run_options.max_pixels, min_size=self.draft_size)
            photo = loaded_img.image
            limit = self.run_options.max_pixels
            peak = peak_pixels(self.transform, photo.size)
            if limit is not None and peak > max(limit, DEFAULT_MAX_PIXELS):
                w, h = photo.size
                raise InputError(item.path, Reason.TOO_LARGE, f"{w}×{h} resized for the model is {peak} pixels")
            tensor = self.model_input(photo)
        except InputError as err:
            return self.error(item, err)
        except OSError as exc:
            return self.error(item, _caused(InputError(item.path, Reason.NO_SUCH_FILE, exc.strerror), exc))
        except (VitattnError, MemoryError):
            raise
        except Exception as exc:  # the model's transform failed on this one picture
            detail = f"preprocessing: {exc_line(exc)}"
            return self.error(item, _caused(InputError(item.path, Reason.INFERENCE, detail), exc))
        return _Prepared(item, key, tensor, loaded_img.warnings)

    def model_input(self, photo: Image.Image) -> torch.Tensor:
        """The model's (3, H, W) input for an upright RGB picture: its transform, on torch's resamplers where
        they stand in for it (:func:`~vitattn.preprocess.tensor_transform`)."""
        tensor = self.tensor_transform(photo_tensor(photo)) if self.tensor_transform is not None else None
        return tensor if tensor is not None else self.transform(photo)  # (3, H, W)

    def run_batch(self, cap: AttentionCapture, batch: Sequence[_Prepared]) -> tuple[StatsState | None, list[Outcome]]:
        """The batch's statistics (None when the whole batch failed) and one outcome per input."""
        import torch

        try:
            x = torch.stack([p.tensor for p in batch])  # (B, 3, H, W)
            state, top1, keep = infer(self.loaded, cap, x, self.settings)
        except VitattnError:
            raise
        except Exception as exc:
            return None, [self.error(p.item, _caused(InputError(p.item.path, Reason.INFERENCE, exc_line(exc)), exc))
                          for p in batch]
        labels = self.loaded.labels
        outcomes = []
        for i, p in enumerate(batch):
            if not keep[i]:
                bad = InputError(p.item.path, Reason.NON_FINITE, "NaN or infinite attention or scores")
                outcomes.append(self.error(p.item, bad))
                continue
            record = self.record(p.item, "ok")
            if top1 is not None:
                c = top1[i]
                record["top1"] = {"index": c, "label": labels[c] if labels else str(c)}
            outcomes.append(Outcome(p.item, "ok", record, warnings=p.warnings))
        return state, outcomes


@dataclass
class StatsRun:
    """A statistics run whose model is loaded and whose report folder is checked; iterate :meth:`outcomes`.

    Attributes:
        report: after :meth:`outcomes` is exhausted, the statistics of every input counted in the folder.
        files: the report's files (name -> path), after :meth:`outcomes` is exhausted.
    """

    loaded: LoadedModel
    settings: Settings
    job: StatsJob
    record: dict[str, Any]
    inputs: InputOptions
    stats: StatsOptions
    run: RunOptions
    stdin: BinaryIO | None = field(default=None, repr=False)
    report: DatasetStats | None = None
    files: dict[str, str] = field(default_factory=dict)
    failed: int = 0
    _pending: list[tuple[StatsState, list[str]]] = field(default_factory=list, repr=False)

    def outcomes(self) -> Generator[Outcome, None, None]:
        """One outcome per input, in input order; the report is written when every input is done.

        Interrupted (Ctrl-C, SIGTERM, the generator closed), the sums so far are saved to ``partial/``.
        """
        from vitattn.discovery import iter_inputs

        out = self.stats.out
        items = iter_inputs(
            list(self.inputs.paths),
            recursive=self.inputs.recursive,
            null_separated=self.inputs.null_separated,
            stdin=self.stdin,
            exclude=[out],
        )
        with report_lock(out):
            self._open()
            yield from self._outcomes(items)
            self._finish()

    def _open(self) -> None:
        """Under the report's lock: start afresh (overwrite), or read what the report counts already."""
        out = self.stats.out
        if self.stats.overwrite:
            remove_parts(p for _, p in part_files(out / PARTIAL))
            self.job.done = set()
            return
        partial = read_partial(out)
        check_settings(out, partial.settings, self.record)
        self.job.done = partial.inputs

    def _outcomes(self, items: Iterable[InputItem]) -> Generator[Outcome, None, None]:
        opts = self.run
        window = max(2, opts.batch_size * 2)
        last_save = time.monotonic()
        queue: list[_Prepared | Outcome] = []  # this batch's inputs, and the outcomes among them, in input order
        try:
            with ThreadPoolExecutor(opts.decode_workers, thread_name_prefix="vitattn-load") as pool, \
                    self.job_capture() as cap:
                stop = False
                for p in _ordered_map(pool, self.job.prepare, items, window):
                    queue.append(p)
                    if isinstance(p, Outcome):
                        stop = opts.fail_fast and p.status == "error"
                        if stop:
                            break
                        if len(queue) == 1:
                            yield from self._flush(queue, {})
                        continue
                    if sum(isinstance(q, _Prepared) for q in queue) >= opts.batch_size:
                        stop = yield from self._run(cap, queue)
                        if stop:
                            break
                        if time.monotonic() - last_save >= self.stats.checkpoint_seconds:
                            self._save()
                            last_save = time.monotonic()
                if queue:
                    yield from self._run(cap, queue)
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self._save()

    def job_capture(self) -> contextlib.AbstractContextManager[AttentionCapture]:
        return stats_capture(self.loaded, self.settings)

    def _run(self, cap: AttentionCapture, queue: list[_Prepared | Outcome]) -> Generator[Outcome, None, bool]:
        batch = [q for q in queue if isinstance(q, _Prepared)]
        results: dict[int, Outcome] = {}
        if batch:
            state, outcomes = self.job.run_batch(cap, batch)
            if state is not None:
                keys = [p.key for p, o in zip(batch, outcomes, strict=True) if o.status == "ok"]
                self._pending.append((state, keys))  # one step: the sums and the inputs they count go together
            results = {id(p): o for p, o in zip(batch, outcomes, strict=True)}
        failed = yield from self._flush(queue, results)
        return self.run.fail_fast and failed

    def _flush(self, queue: list[_Prepared | Outcome], results: dict[int, Outcome]) -> Generator[Outcome, None, bool]:
        failed = False
        entries = list(queue)
        queue.clear()
        for q in entries:
            o = q if isinstance(q, Outcome) else results[id(q)]
            if o.status == "error":
                self.failed += 1
                failed = True
            yield o
        return failed

    def _save(self) -> None:
        """The sums since the last save, with the inputs they count, as one new ``partial/`` file."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        state = merge_states(s for s, _ in pending)
        keys = [k for _, ks in pending for k in ks]
        write_part(
            self.stats.out,
            settings=self.record,
            model=_model_info(self.loaded),
            labels=_labels(self.loaded, state),
            state=state,
            inputs=keys,
        )

    def _finish(self) -> None:
        out = self.stats.out
        partial = compact(out, read_partial(out))
        state = partial.state or empty_state(self.loaded, self.settings)
        self.report = DatasetStats(
            state,
            partial.model or _model_info(self.loaded),
            self.record,
            partial.labels,
            failed=self.failed,
            classes_shown=self.stats.classes,
        )
        self.files = write_report(self.report, out, plots=self.stats.plots)


def _model_info(loaded: LoadedModel) -> dict[str, Any]:
    from vitattn.models import describe

    return {**describe(loaded), "weights": loaded.weights}


def _labels(loaded: LoadedModel, state: StatsState) -> dict[int, str]:
    labels = loaded.labels
    return {c: labels[c] if labels else str(c) for c in state.class_count}


def start_stats(
    *,
    inputs: InputOptions,
    model: ModelOptions | LoadedModel | nn.Module | None = None,
    attention: AttentionOptions | None = None,
    stats: StatsOptions | None = None,
    run: RunOptions | None = None,
    stdin: BinaryIO | None = None,
) -> StatsRun:
    """Load the model, check the options and the report folder; :meth:`StatsRun.outcomes` does the work.

    Args:
        inputs: files, folders, or ``-`` for paths on ``stdin``.
        model: options to load a model with, a loaded model, or a timm ``nn.Module``.
        attention: ``blocks`` (None: every block), ``top_k`` (0: no predictions, no per-class maps) and
            ``precision``; other fields are not used. None: every block, top-1 predictions.
        stats: the report folder and its keeping.
        run: batch size, decode threads, pixel limit, fail fast.

    Raises:
        UsageError: an option does not fit the model, or the folder holds statistics of other settings.
        ModelError: the model cannot be loaded.
        OutputError: the report folder cannot be used.
    """
    from vitattn.outputs import prepare_out_root

    loaded = as_loaded(model)
    settings = stats_attention(loaded, attention)
    stats = stats or StatsOptions()
    run = run or RunOptions()
    record = stats_settings(loaded, settings)
    prepare_out_root(stats.out)
    if not stats.overwrite:  # fail early; the run checks again under the report's lock
        check_settings(stats.out, read_partial(stats.out).settings, record)
    job = StatsJob(loaded, settings, run, set())
    return StatsRun(loaded=loaded, settings=settings, job=job, record=record, inputs=inputs, stats=stats, run=run,
                    stdin=stdin)


def dataset_stats(
    model: LoadedModel | nn.Module,
    images: Iterable[One] | torch.Tensor,
    *,
    blocks: int | Sequence[int] | None = None,
    top_k: int | None = None,
    precision: str = "fp32",
    batch_size: int = RunOptions.batch_size,
    classes: int = StatsOptions.classes,
) -> DatasetStats:
    """Attention statistics of ``model`` over pictures (PIL images or paths, consumed lazily in batches), or a
    preprocessed (B, 3, H, W) tensor: the object ``vitattn stats`` writes.

    Args:
        blocks: block indices, negatives from the end; None: every block.
        top_k: 0: no predictions (and no per-class maps); None: top-1 when the model has a classifier.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        batch_size: pictures per forward pass.
        classes: the most frequent classes given a map of their own.
    """
    import torch
    from PIL import Image

    from vitattn.explainer import _eval_mode

    blocks_t = (blocks,) if isinstance(blocks, int) else (tuple(blocks) if blocks is not None else None)
    loaded = as_loaded(model)
    settings = stats_attention(loaded, AttentionOptions(blocks=blocks_t, top_k=top_k, precision=precision))  # type: ignore[arg-type]
    job = StatsJob(loaded, settings, RunOptions(batch_size=batch_size), set())
    total = empty_state(loaded, settings)

    def model_input(picture: One) -> torch.Tensor:  # what the CLI feeds the model for the same picture
        if isinstance(picture, Image.Image):
            return job.model_input(picture.convert("RGB") if picture.mode != "RGB" else picture)
        path = os.fspath(picture)
        prepared = job.prepare(InputItem(path, os.path.basename(path) or path))
        if isinstance(prepared, Outcome):
            raise prepared.error or InputError(path, Reason.CORRUPT)
        return prepared.tensor

    batches: Iterator[torch.Tensor]
    if isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images  # (B, 3, H, W)
        batches = iter(torch.split(x, batch_size))
    else:
        batches = (torch.stack([model_input(p) for p in chunk]) for chunk in _chunks(images, batch_size))
    with _eval_mode(loaded.model), stats_capture(loaded, settings) as cap:
        for x in batches:
            state, _, _ = infer(loaded, cap, x, settings)
            total.merge(state)
    return DatasetStats(total, _model_info(loaded), stats_settings(loaded, settings), _labels(loaded, total),
                        classes_shown=classes)


def _chunks(items: Iterable[T], n: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[InputItem], T], items: Iterable[InputItem], window: int
) -> Iterator[T]:
    """``pool.map`` that is lazy over ``items``, with at most ``window`` tasks in flight."""
    inflight: deque[Future[T]] = deque()
    for item in items:
        inflight.append(pool.submit(fn, item))
        if len(inflight) >= window:
            yield inflight.popleft().result()
    while inflight:
        yield inflight.popleft().result()


def _caused(err: InputError, exc: BaseException) -> InputError:
    err.__cause__ = exc
    return err
