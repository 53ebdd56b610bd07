"""The local engine: runs a :class:`~vitattn.job.HeatmapJob` over a stream of inputs with threads.

Stages overlap: pictures are decoded and preprocessed ahead of the model by a small thread pool
(:meth:`HeatmapJob.prepare`), the model runs batches in the calling thread (:meth:`HeatmapJob.infer`), and
results are rendered and written behind it by another pool (:meth:`HeatmapJob.write`). Every queue is
bounded, so memory does not grow with the number of inputs. Outcomes come back in input order, one per
discovered input; a failure of one input never stops the others (unless ``fail_fast``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from vitattn.attention import ImageAttention
from vitattn.capture import AttentionCapture
from vitattn.discovery import InputItem
from vitattn.job import HeatmapJob, Outcome, Prepared
from vitattn.options import RunOptions

T = TypeVar("T")


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
        self.unreported: list[Outcome] = []  # finished but not yielded when the run was stopped

    def run(self, items: Iterable[InputItem]) -> Generator[Outcome, None, None]:
        """Process every input; yields one :class:`Outcome` per input, in input order.

        Closing the generator (or an exception in the caller, or Ctrl-C) drains the write workers: no file is
        left half-written, and the results already written stay. The outcomes that were finished by then but
        not yielded (behind an unfinished one, or written while draining) are in :attr:`unreported`, in input
        order, so that every completed result can still be reported.

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
            try:
                batch: list[tuple[Prepared, _Slot]] = []
                for p in _ordered_map(loaders, self.job.prepare, items, window):
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
                loaders.shutdown(wait=True, cancel_futures=True)
                writers.shutdown(wait=True, cancel_futures=True)  # writes already started finish
                self.unreported = _finished(pending)

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


def _finished(pending: Iterable[_Slot]) -> list[Outcome]:
    """The outcomes among ``pending`` that are complete (written, skipped or failed), in input order."""
    done = []
    for slot in pending:
        value = slot.value
        if isinstance(value, Future):
            if not value.done() or value.cancelled() or value.exception() is not None:
                continue
            value = value.result()
        if isinstance(value, Outcome):
            done.append(value)
    return done


def _ordered_map(
    pool: ThreadPoolExecutor, fn: Callable[[InputItem], T], items: Iterable[InputItem], window: int
) -> Iterator[T]:
    """Like ``pool.map`` but lazy over ``items`` with at most ``window`` tasks in flight."""
    inflight: deque[Future[T]] = deque()
    for item in items:
        inflight.append(pool.submit(fn, item))
        if len(inflight) >= window:
            yield inflight.popleft().result()
    while inflight:
        yield inflight.popleft().result()
