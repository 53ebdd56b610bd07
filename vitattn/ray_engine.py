"""The Ray engine: runs a job's batches on a Ray cluster, one model replica per actor (Ray Data).

The driver discovers the inputs (the same rules and order as the local engine) and sends them as a dataset of
pickled :class:`~vitattn.discovery.InputItem` rows through ``map_batches`` to a pool of actors. Each actor
builds its own job once from picklable options (a :class:`JobSpec`: it loads the model, on its GPU when it
reserved one) and runs the job's own per-batch code, ``job.run_batch(items)``, so the files it writes are the
local engine's files. Outcomes come back pickled, in the order the cluster finishes them.

The output folder must be one path that every node sees (a shared filesystem). The driver writes a marker
file there for the run; an actor that does not see it stops the run with one :class:`EngineError`. The
marker is also the run's heartbeat: when the driver stops (Ctrl-C, ``fail_fast``) it removes the marker,
actors take no new batch, and the driver waits for the batches in flight, so nothing is left half-written.

Ray retries the batch of an actor that died; an input of that batch which the dead actor had completed is
then found done (its meta.json is newer than the run's marker) and reported once, as processed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vitattn.errors import EngineError, UsageError, VitattnError, display_path
from vitattn.options import RunOptions

if TYPE_CHECKING:
    from vitattn.discovery import InputItem
    from vitattn.job import Outcome

INSTALL_HINT = "the ray engine needs Ray: pip install 'vitattn[ray]'"
MARKER_PREFIX = ".vitattn-ray-"
_COLUMN = "v"  # the one column of every row, in and out: a pickled item, outcome or error


class BatchJob(Protocol):
    """What an actor runs: the same per-batch code as the local engine."""

    def run_batch(self, items: Sequence[InputItem]) -> list[Outcome]: ...


class JobSpec(Protocol):
    """What builds a job on a worker, from picklable options (:class:`vitattn.heatmap.HeatmapSpec`)."""

    @property
    def run(self) -> RunOptions: ...

    def build(self) -> BatchJob: ...


def require_ray() -> None:
    """Raise UsageError, saying how to install it, when Ray (with Ray Data) is not installed."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT, option="engine") from None


class RayEngine:
    """Runs a job over many inputs on a Ray cluster. Iterate :meth:`run`.

    Args:
        spec: builds the job on each actor.
        out: the output folder, which every node must see at the same path.
    """

    def __init__(self, spec: JobSpec, *, out: Path) -> None:
        self.spec = spec
        self.options = spec.run
        self.out = out

    def run(self, items: Iterable[InputItem]) -> Generator[Outcome, None, None]:
        """Process every input on the cluster; yields one :class:`Outcome` per input, in finishing order.

        Ctrl-C (in the main thread) stops the cluster taking new batches; the batches in flight finish and
        are reported, then KeyboardInterrupt is raised; a second Ctrl-C stops at once. Closing the generator
        (or an exception in the caller) also stops new batches and waits for those in flight.

        Raises:
            EngineError: the cluster cannot be reached, or an actor cannot see the output folder.
            OutputError, ModelError, UsageError: as for the local engine, raised on an actor.
        """
        # discovered on the driver, in input order; the index tells inputs apart (a duplicate shares its name)
        rows = [{_COLUMN: pickle.dumps((i, item))} for i, item in enumerate(items)]
        if not rows:
            return
        with (
            _ray_session(self.options.ray_address),
            _Marker(self.out) as marker,
            _first_interrupt(marker.remove) as interrupted,
        ):
            stream = self._stream(rows, marker)
            done: set[int] = set()
            try:
                for index, value in stream:
                    if isinstance(value, BaseException):
                        if interrupted():  # e.g. an actor that started after the marker was removed
                            continue
                        raise value
                    if index in done:  # a retried batch reports an input again: count it once
                        continue
                    done.add(index)
                    yield value
                    if self.options.fail_fast and value.status == "error":
                        return
                if interrupted():  # Ctrl-C: the batches in flight are done, and reported
                    raise KeyboardInterrupt
            finally:
                marker.remove()  # actors take no new batch
                for _ in stream:  # the batches in flight finish their writes
                    pass

    def _stream(self, rows: list[dict[str, bytes]], marker: _Marker) -> Iterator[tuple[int, Outcome | BaseException]]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # progress is the CLI's, from the outcomes
        ctx.print_on_execution_start = False
        opts = self.options
        n = len(rows)
        blocks = max(1, min(n // opts.batch_size + 1, 256))
        low, high = _replicas(opts)
        strategy = ray.data.ActorPoolStrategy
        pool = strategy(size=low) if low == high else strategy(min_size=low, max_size=high)
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            _Replica,
            fn_constructor_args=(self.spec, _WorkerContext(cwd=os.getcwd(), marker=str(marker.path))),
            batch_size=opts.batch_size,
            batch_format="numpy",
            compute=pool,
            num_gpus=opts.ray_gpus_per_worker or None,
        )
        for row in ds.iter_rows():
            yield pickle.loads(row[_COLUMN])


def _replicas(opts: RunOptions) -> tuple[int, int]:
    """(MIN, MAX) model replicas: as asked, or as many as the cluster's CPUs or GPUs allow."""
    import ray

    if opts.ray_workers is not None:
        return opts.ray_workers
    resources = ray.cluster_resources()
    if opts.ray_gpus_per_worker > 0:
        n = int(resources.get("GPU", 0) // opts.ray_gpus_per_worker)
        if n < 1:
            gpus = resources.get("GPU", 0)
            raise EngineError(f"the Ray cluster has {gpus:g} GPUs, fewer than {opts.ray_gpus_per_worker:g} per worker")
    else:
        n = max(1, int(resources.get("CPU", 1)))
    return (n, n)


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Connect to the cluster at ``address`` (None: ``RAY_ADDRESS``, else start a local Ray for the run), and
    disconnect after; a Ray session the caller opened is used as it is."""
    import ray

    if ray.is_initialized():
        with _notices_to_stderr():
            yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # stdout carries data only and stderr our lines: no worker logs forwarded, Ray's own notices muted
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address == "local":
        kwargs["include_dashboard"] = False
    with _notices_to_stderr():
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            lines = str(exc).strip().splitlines()
            detail = lines[0] if lines else type(exc).__name__
            raise EngineError(f"cannot connect to the Ray cluster at {address}: {detail}") from exc
        logging.getLogger("ray").setLevel(logging.ERROR)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def _first_interrupt(stop: Callable[[], None]) -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C (SIGINT) calls ``stop`` and lets the run drain its batches in flight (a
    KeyboardInterrupt raised inside Ray's iterator would cut it short, and the actors with it); a second one
    interrupts at once. Yields whether it came. Only the main thread receives signals: elsewhere, nothing."""
    came = False
    if threading.current_thread() is not threading.main_thread():
        yield lambda: came
        return

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal came
        came = True
        stop()
        signal.signal(signal.SIGINT, previous)

    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler not set from Python
        previous = signal.default_int_handler
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: came
    finally:
        signal.signal(signal.SIGINT, previous)


class _TextToStderr:
    """Stands in for ``sys.stdout``: text goes to stderr, the binary ``buffer`` (where data lines go) to stdout."""

    def __init__(self, stdout: Any) -> None:
        self._stdout = stdout

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
        self._stdout.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stdout, name)


@contextlib.contextmanager
def _notices_to_stderr() -> Iterator[None]:
    """Ray prints its notices (``(raylet) A worker died...``) on ``sys.stdout``, where vitattn writes only data:
    while the run lasts, text printed there goes to stderr."""
    stdout = sys.stdout
    sys.stdout = _TextToStderr(stdout)
    try:
        yield
    finally:
        sys.stdout = stdout


class _Marker:
    """The run's marker file in the output folder: actors check they see it; removed when the run stops."""

    def __init__(self, out: Path) -> None:
        self.path = Path(os.path.abspath(out)) / f"{MARKER_PREFIX}{uuid.uuid4().hex}"

    def __enter__(self) -> _Marker:
        from vitattn.outputs import atomic_write

        def write(tmp: Path) -> None:
            tmp.write_bytes(socket.gethostname().encode() + b"\n")  # who started the run

        atomic_write(self.path, write)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass(frozen=True)
class _WorkerContext:
    """The driver's view that an actor takes on: its working folder (relative paths) and the run's marker."""

    cwd: str
    marker: str


class _Replica:
    """One model replica on a Ray actor: builds the job once, then runs the batches Ray Data hands it.

    Errors that concern every input (the model cannot load, the output folder is unusable) come back as a row
    holding the error, which the driver raises: one clear line, rather than Ray's wrapped traceback.
    """

    def __init__(self, spec: JobSpec, context: _WorkerContext) -> None:
        self.context = context
        self.fatal: BaseException | None = None
        self.started_ns = 0
        try:
            os.chdir(context.cwd)  # relative inputs and output paths mean what they mean on the driver
            self.cwd_ok = True
        except OSError:
            self.cwd_ok = False
        try:
            self.started_ns = os.stat(context.marker).st_mtime_ns
        except OSError:
            self.fatal = EngineError(
                f"worker node {socket.gethostname()} does not see the output folder "
                f"{display_path(os.path.dirname(context.marker))}: it must be a path every node sees (a shared "
                "filesystem mounted at the same place)"
            )
            return
        try:
            self.job = spec.build()
        except Exception as exc:
            self.fatal = _fatal(exc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        indexed: list[tuple[int, InputItem]] = [pickle.loads(v) for v in batch[_COLUMN]]
        indices, items = [i for i, _ in indexed], [item for _, item in indexed]
        if self.fatal is None and not self.cwd_ok and any(not os.path.isabs(i.path) for i in items):
            self.fatal = EngineError(
                f"inputs are named relative to {display_path(self.context.cwd)}, which worker node "
                f"{socket.gethostname()} does not have: give absolute paths, or run from a shared folder"
            )
        if self.fatal is not None:
            values: list[tuple[int, Any]] = [(-1, self.fatal)]
        elif not os.path.exists(self.context.marker):
            values = []  # the driver stopped the run: take no new batch
        else:
            try:
                values = list(zip(indices, [self._counted(o) for o in self.job.run_batch(items)], strict=True))
            except Exception as exc:
                values = [(-1, _fatal(exc))]
        return {_COLUMN: np.array([pickle.dumps(v) for v in values], dtype=object)}

    def _counted(self, outcome: Outcome) -> Outcome:
        """A skipped input whose result was written during this run (by an attempt at this batch that died
        before reporting) counts as processed."""
        from vitattn.outputs import META

        if outcome.status != "skipped" or outcome.folder is None:
            return outcome
        try:
            written_ns = os.stat(outcome.folder / META).st_mtime_ns
        except OSError:
            return outcome
        if written_ns > self.started_ns:
            outcome.status = "ok"
            outcome.record = {**outcome.record, "status": "ok"}
        return outcome


def _fatal(exc: Exception) -> BaseException:
    """An error on an actor as the driver raises it: ours as they are, anything else as an EngineError."""
    if isinstance(exc, VitattnError):
        return exc
    from vitattn.job import exc_line

    return EngineError(f"a Ray worker failed: {type(exc).__name__}: {exc_line(exc)}")
