"""The local engine: runs a :class:`~vitattn.job.HeatmapJob` over a stream of inputs with threads.

Stages overlap: pictures are decoded and preprocessed ahead of the model by a small thread pool
(:meth:`HeatmapJob.prepare`), the model runs batches in the calling thread (:meth:`HeatmapJob.infer`), and
results are rendered and written behind it by another pool (:meth:`HeatmapJob.write`). Every queue is
bounded, so memory does not grow with the number of inputs. Outcomes come back in input order, one per
discovered input; a failure of one input never stops the others (unless ``fail_fast``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from vitattn.attention import ImageAttention
from vitattn.capture import AttentionCapture
from vitattn.discovery import InputItem
from vitattn.job import HeatmapJob, Outcome, Prepared
from vitattn.options import RunOptions

IDLE_FLUSH_S = 0.05
"""A partial batch goes to the model when no input arrived for this long (a slow producer on stdin)."""


@dataclass
class _Slot:
    """An input's place in the output order: empty until its batch ran, then a write task or an outcome."""

    value: Future[Outcome] | Outcome | None = None


class Scheduler:
    """Runs a job over many inputs: ordering, bounded queues, interruption. Iterate :meth:`run`."""

    def __init__(self, job: HeatmapJob, options: RunOptions | None = None) -> None:
        self.job = job
        self.options = options or job.run_options
        self._stop = False
        self._write_failed = False  # fail_fast: a write failed, so no more inputs are taken

    def run(self, items: Iterable[InputItem]) -> Generator[Outcome, None, None]:
        """Process every input; yields one :class:`Outcome` per input, in input order.

        Closing the generator (or an exception in the caller) drains the write workers: no file is left
        half-written, and the results already written stay.

        Raises:
            OutputError: the output tree cannot be written (disk full, read-only): fatal for the run.
        """
        opts = self.options
        window = max(2, opts.batch_size * 2)
        pending: deque[_Slot] = deque()  # one slot per input, in input order
        with (
            ThreadPoolExecutor(opts.decode_workers, thread_name_prefix="vitattn-load") as loaders,
            ThreadPoolExecutor(opts.render_workers, thread_name_prefix="vitattn-write") as writers,
            self.job.capture() as cap,
        ):
            feed = _Feeder(loaders, self.job, items, window)
            try:
                batch: list[tuple[Prepared, _Slot]] = []
                while True:
                    # wait for the next input; with a partial batch, only briefly: a slow producer (stdin)
                    # gets its results per line, and a stream of non-batch inputs (duplicates, errors, skips)
                    # does not hold back the batch in front of it
                    # (with results being written, wake up as well, to hand them over as they finish)
                    if batch and len(pending) > window:
                        got = _IDLE
                    else:
                        got = feed.next(IDLE_FLUSH_S if batch or pending else None)
                    if got is _IDLE:
                        if batch:
                            self._submit(cap, batch, writers)
                            batch = []
                        yield from self._drain(pending, limit=window)
                        if self._stop:
                            return
                        continue
                    if got is _END:
                        break
                    assert isinstance(got, Future)
                    p = got.result()
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
                    if self._write_failed:
                        batch = []
                        break
                    yield from self._drain(pending, limit=window)
                    if self._stop:
                        return
                if batch:
                    self._submit(cap, batch, writers)
                yield from self._drain(pending, limit=0)
            finally:
                feed.close()
                for slot in pending:
                    if isinstance(slot.value, Future):
                        slot.value.cancel()
                loaders.shutdown(wait=True, cancel_futures=True)
                writers.shutdown(wait=True, cancel_futures=True)

    def _submit(self, cap: AttentionCapture, batch: list[tuple[Prepared, _Slot]], writers: ThreadPoolExecutor) -> bool:
        """Run one batch and hand its results to the write workers; True when the batch failed."""
        results: Sequence[ImageAttention | Outcome] = self.job.infer(cap, [p for p, _ in batch])
        failed = False
        for (p, slot), result in zip(batch, results, strict=True):
            if isinstance(result, Outcome):
                slot.value, failed = result, True
            else:
                slot.value = writers.submit(self._write, p, result)
        return failed

    def _write(self, prep: Prepared, att: ImageAttention) -> Outcome:
        outcome = self.job.write(prep, att)
        if outcome.status == "error" and self.options.fail_fast:
            self._write_failed = True
        return outcome

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
            if self.options.fail_fast and outcome.status == "error":
                self._stop = True
                return


_IDLE = object()
_END = object()


class _Feeder:
    """Reads the inputs in a thread of its own and hands their prepare tasks over in input order.

    Reading the inputs may block (a pipe on stdin); in its own thread it does not keep the batches that are
    ready from the model. At most ``window`` tasks wait, so memory stays bounded for an endless stream.
    """

    def __init__(self, pool: ThreadPoolExecutor, job: HeatmapJob, items: Iterable[InputItem], window: int) -> None:
        self._tasks: queue.Queue[object] = queue.Queue(maxsize=window)
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(pool, job, items), name="vitattn-inputs", daemon=True
        )
        self._thread.start()

    def _run(self, pool: ThreadPoolExecutor, job: HeatmapJob, items: Iterable[InputItem]) -> None:
        try:
            for item in items:
                task = pool.submit(job.prepare, item)
                while not self._closed.is_set():
                    try:
                        self._tasks.put(task, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._closed.is_set():
                    return
        except RuntimeError:  # the pool shut down: the run is over
            return
        except BaseException as exc:  # a bug in discovery: raised in the caller's thread
            self._error = exc
        self._put_end()

    def _put_end(self) -> None:
        while not self._closed.is_set():
            try:
                self._tasks.put(_END, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, timeout: float | None) -> object:
        """The next prepare task, ``_END`` after the last, or ``_IDLE`` when none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                got = self._tasks.get(timeout=wait) if wait > 0 else self._tasks.get_nowait()
            except queue.Empty:
                if deadline is not None:
                    return _IDLE
                continue
            if got is _END and self._error is not None:
                raise self._error
            return got

    def close(self) -> None:
        self._closed.set()
        while True:  # unblock the reader and drop the tasks not taken (their results are not wanted)
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if isinstance(task, Future):
                task.cancel()
