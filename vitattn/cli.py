"""The ``vitattn`` command: parse options, call the library, report. No logic of its own.

Stdout carries only data (output folders, or JSON lines with ``--json``); progress, warnings and errors go
to stderr. Errors become one line and an exit code here, in :func:`main`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from vitattn._version import __version__
from vitattn.errors import ExitCode, OutputError, UsageError, VitattnError, display_path
from vitattn.options import (
    DEFAULT_EXPLORE_BUDGET,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    AttentionOptions,
    Engine,
    HeadFusion,
    ImageFormat,
    InputOptions,
    Method,
    ModelOptions,
    Precision,
    Query,
    RenderOptions,
    RunOptions,
    StatsOptions,
    parse_ray_workers,
)

if TYPE_CHECKING:
    from vitattn.job import Outcome

#: The flag of each library option, to name it in error lines (the library names values, not flags).
FLAGS = {
    "alpha": "--alpha",
    "batch_size": "--batch-size",
    "blocks": "--block",
    "classes": "--classes",
    "cmap": "--cmap",
    "device": "--device",
    "discard_ratio": "--discard-ratio",
    "engine": "--engine",
    "format": "--format",
    "fuse": "--fuse",
    "heads": "--heads",
    "inputs": "INPUTS",
    "max_pixels": "--max-pixels",
    "max_side": "--max-side",
    "method": "--method",
    "model": "--model",
    "out": "--out",
    "precision": "--precision",
    "query": "--query",
    "ray_gpus_per_worker": "--ray-gpus-per-worker",
    "ray_workers": "--ray-workers",
    "target_class": "--target-class",
    "threshold": "--threshold",
    "top_k": "--top-k",
    "weights": "--weights",
}

@dataclass(frozen=True)
class _Explore:
    """What ``--html`` and ``vitattn explore`` add to a heatmap run."""

    html: bool = False
    gallery: bool = False
    budget: int = DEFAULT_EXPLORE_BUDGET
    pages_only: bool = False  # stdout: the page's path (explore) instead of the folder (heatmap)
    open: bool = False
    every_block: bool = False  # the pages capture every block (the PNGs: the run's blocks)


class _Group(TyperGroup):
    """The app's command group: every usage error the parser finds becomes one ``vitattn: error:`` line."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _as_flags(super().get_params(ctx))

    def main(  # type: ignore[override]
        self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `vitattn`: its help, as Typer shows it
                show: Any = getattr(exc, "show", None)
                if show is not None:
                    show()
            else:
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                _err(exc.format_message().replace("Value error, ", "") + hint)
            rv = exc.exit_code
        except typer.Abort:
            _err("interrupted")
            rv = ExitCode.INTERRUPTED
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _as_flags(params: list[Any]) -> list[Any]:
    """On/off options shown as flags in ``--help`` (``--json``, not ``--json <bool>``): Typer's help shows
    the metavar in the type column, and a flag takes no value."""
    for param in params:
        if getattr(param, "param_type_name", "") == "option" and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose on/off options show as flags in ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _as_flags(super().get_params(ctx))


def _escape(text: str) -> str:
    """One printable line: control characters (newlines, terminal escapes) shown as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


app = typer.Typer(
    name="vitattn",
    cls=_Group,
    help="See where a Vision Transformer looks: exact per-head attention heatmaps for timm ViTs.",
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that clean-up code runs."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vitattn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """See where a Vision Transformer looks."""


def _err(message: str, kind: str = "error") -> None:
    _to_stderr(f"vitattn: {kind}: {_escape(message)}\n")


def _to_stderr(text: str) -> None:
    """Write to stderr; when its reader went away (``2>&1 | head -1``) go quiet instead of failing."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except BrokenPipeError:
        _silence(sys.stderr)


def _silence(stream: Any) -> None:
    """Point a closed pipe's file descriptor at /dev/null, so that later writes and the flush at exit succeed."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _parse_ints(text: str | None, option: str) -> tuple[int, ...] | None:
    """``0,3,5`` -> (0, 3, 5); None or ``all`` -> None."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        values = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise UsageError(f"{text!r}: expected comma-separated integers, e.g. 0,3,5", option=option) from None
    if not values:
        raise UsageError(f"{text!r}: no index given", option=option)
    return values


def _parse_blocks(values: list[str] | None) -> tuple[int, ...] | None:
    """Repeated ``-b`` values, each an index, a comma list or ``all`` -> indices (None: every block)."""
    if not values:
        return AttentionOptions.blocks
    blocks: list[int] = []
    for value in values:
        parsed = _parse_ints(value, "blocks")
        if parsed is None:
            return None
        blocks.extend(parsed)
    return tuple(blocks)


def _parse_query(text: str) -> Query:
    try:
        return Query.parse(text)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


def _parse_target(text: str | None) -> int | None:
    if text is None or text.strip().lower() == "top1":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{text!r}: a class index or top1", option="target_class") from None


class _Progress:
    """Counts outcomes for the summary line and, when enabled, shows progress on stderr.

    Enabled when stderr is a terminal, or with ``--progress``. On a terminal one line is redrawn in place
    (at most ten times a second) and cleared before any other stderr line; otherwise a plain line is
    written at most once a second. It shows done/total (total known for files and folders, not for stdin),
    the failures, and once the first batch is done (model warm-up excluded) the rate and the time left.
    """

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.tty = _is_terminal(sys.stderr)
        self.enabled = self.tty if enabled is None else enabled
        self.counts = {"ok": 0, "skipped": 0, "error": 0}
        self.total: int | None = None
        self.started = False  # inputs are being processed: the summary line is due, whatever happens
        self._first: tuple[float, int] | None = None  # (time, done) when the first outcome arrived
        self._shown = 0.0  # when the line was last drawn
        self._drawn = False  # a line is on the terminal, to clear before other output
        self._last_done = -1  # the count last shown

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def starting(self, message: str) -> None:
        """A start-up line (e.g. while the model loads), replaced by the counter once inputs flow."""
        if self.enabled:
            self._draw(message)

    def count(self, status: str) -> None:
        self.counts[status] += 1
        if self._first is None:
            self._first = (time.monotonic(), self.done)

    def show(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if now - self._shown < (0.1 if self.tty else 1.0) and not finished:
            return
        self._draw(self.line(now))
        self._last_done = self.done

    def finish(self) -> None:
        """Off a terminal: the last count, when the throttle held it back (the summary follows)."""
        if self.enabled and not self.tty and self.started and self._last_done != self.done:
            self._draw(self.line(time.monotonic()))
            self._last_done = self.done

    def line(self, now: float) -> str:
        done, failed = self.done, self.counts["error"]
        text = f"{done}/{self.total}" if self.total is not None else f"{done}"
        text += f" done, {failed} failed"
        if self._first is not None:
            t0, n0 = self._first
            if done > n0 and now > t0:
                rate = (done - n0) / (now - t0)
                text += f", {rate:.1f} img/s"
                if self.total is not None and self.total > done:
                    text += f", ETA {_duration((self.total - done) / rate)}"
        return text

    def _draw(self, text: str) -> None:
        self._shown = time.monotonic()
        if self.tty:
            _to_stderr(f"\r\033[K{text}")
            self._drawn = True
        else:
            _to_stderr(f"vitattn: progress: {text}\n")

    def clear(self) -> None:
        if self._drawn:
            _to_stderr("\r\033[K")
            self._drawn = False

    def summary(self) -> str:
        c = self.counts
        return f"processed {c['ok']}, skipped {c['skipped']}, failed {c['error']} (of {sum(c.values())})"


def _duration(seconds: float) -> str:
    """``0:07``, ``12:30``, ``2:05:00``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _is_terminal(stream: Any) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _emit(line: str) -> None:
    """Write one data line to stdout, keeping undecodable path bytes as they were.

    Raises:
        OutputError: stdout cannot be written (``>/dev/full``): fatal, every later line would fail too.
    """
    try:
        sys.stdout.buffer.write(os.fsencode(line) + b"\n")
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write to stdout: {exc.strerror or type(exc).__name__}") from exc


def _check_stdout() -> None:
    """Stdout carries the data: a closed stdout (``>&-``) is fatal before anything is done."""
    if sys.stdout is None or getattr(sys.stdout, "closed", False):
        raise OutputError("stdout is closed, so results could not be reported (redirect it: >/dev/null)")


def _report(
    outcome: Outcome, *, as_json: bool, progress: _Progress, debug: bool = False, line: str | None = None
) -> None:
    from vitattn.outputs import json_line

    progress.clear()
    progress.count(outcome.status)  # counted first: a result on disk is in the summary even if stdout fails
    for warning in outcome.warnings:
        _err(f"{display_path(outcome.item.path)}: {warning}", "warning")
    if outcome.error is not None:
        _err(str(outcome.error))
        if debug:  # the traceback behind a per-input failure, when there is one
            import traceback

            cause = outcome.error.__cause__ or outcome.error
            if cause.__traceback__ is not None:
                _to_stderr("".join(traceback.format_exception(cause)))
    if as_json:
        _emit(json_line(outcome.record))
    elif outcome.folder is not None and outcome.status in ("ok", "skipped"):
        _emit(line or os.fspath(outcome.folder))
    progress.show()


def _stdin_is_terminal() -> bool:
    return _is_terminal(sys.stdin)


@app.command(no_args_is_help=False, cls=_Command)
def heatmap(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders, or - to read paths from stdin (also when none are given and stdin is a pipe).",
            show_default=False,
        ),
    ] = None,
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Descend into sub-folders.")] = False,
    null: Annotated[
        bool, typer.Option("-0", "--null", help="Paths on stdin are NUL-separated (find -print0).")
    ] = False,
    model: Annotated[
        str,
        typer.Option("-m", "--model", help="timm model name, hf-hub:ORG/NAME, local-dir:PATH, or demo (bundled)."),
    ] = DEFAULT_MODEL,
    weights: Annotated[
        str | None,  # a plain string: the loader, not the parser, reports a missing or unreadable file
        typer.Option(
            "--weights", metavar="FILE", help="Local checkpoint (.safetensors, .pth, .pt, .bin).", show_default=False
        ),
    ] = None,
    no_pretrained: Annotated[
        bool, typer.Option("--no-pretrained", help="Random weights, seeded (the maps are meaningless; for testing).")
    ] = False,
    block: Annotated[
        list[str] | None,
        typer.Option(
            "-b",
            "--block",
            help="Block index; negatives count from the end. Repeat or use 3,11 or all.",
            show_default="-1",
        ),
    ] = None,
    heads: Annotated[str | None, typer.Option("--heads", help="Heads to draw, e.g. 0,3,5.", show_default="all")] = None,
    query: Annotated[
        Query | None,
        typer.Option(
            "--query",
            parser=_parse_query,
            metavar="QUERY",
            help="Whose attention: cls, dist, pool (an attention-pool head), patch-mean, or patch:R,C.",
            show_default="cls, or patch-mean without a class token",
        ),
    ] = AttentionOptions.query,
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            case_sensitive=False,
            help="raw: each block's own attention, per head; rollout: attention rollout from block 0 up to the "
            "block; grad-rollout: class-specific relevance (gradient-weighted attention) up to the block.",
        ),
    ] = AttentionOptions.method,
    fuse: Annotated[
        HeadFusion,
        typer.Option("--fuse", case_sensitive=False, help="How heads are combined (the fused map, and rollout)."),
    ] = AttentionOptions.fuse,
    discard_ratio: Annotated[
        float | None,
        typer.Option(
            "--discard-ratio",
            help="rollout: drop this fraction of each row's lowest attention (never a token's own), in [0, 1).",
            show_default="0",
        ),
    ] = AttentionOptions.discard_ratio,
    target_class: Annotated[
        str | None,
        typer.Option(
            "--target-class", help="grad-rollout: the class to explain, an index or top1.", show_default="top1"
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Also draw, per map, the smallest set of patches holding this fraction of its mass (e.g. 0.6).",
            show_default=False,
        ),
    ] = RenderOptions.threshold,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = RenderOptions.out,
    npy: Annotated[
        bool,
        typer.Option(
            "--npy", help="Also write block{B}_attn.npy (heads, grid_h, grid_w), or block{B}_{method}.npy."
        ),
    ] = RenderOptions.npy,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per input on stdout.")] = False,
    cmap: Annotated[str, typer.Option("--cmap", help="Any matplotlib colormap.")] = RenderOptions.cmap,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity.")] = RenderOptions.alpha,
    max_side: Annotated[
        int, typer.Option("--max-side", min=0, help="Long side of written overlays in pixels (0: original size).")
    ] = RenderOptions.max_side,
    shared_scale: Annotated[
        bool, typer.Option("--shared-scale", help="One colour scale across heads (default: each head its own).")
    ] = RenderOptions.shared_scale,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda[:N], mps.")
    ] = ModelOptions.device,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images per forward pass.")
    ] = RunOptions.batch_size,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=0,
            help="Predictions to report (0: none; the forward pass then stops early).",
            show_default="5 for an ImageNet head",
        ),
    ] = AttentionOptions.top_k,
    fmt: Annotated[
        ImageFormat, typer.Option("--format", case_sensitive=False, help="Overlay format.")
    ] = RenderOptions.format,
    precision: Annotated[
        Precision, typer.Option("--precision", case_sensitive=False, help="Forward-pass precision (autocast).")
    ] = AttentionOptions.precision,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo inputs whose outputs exist.")
    ] = RunOptions.overwrite,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first failed input.")
    ] = RunOptions.fail_fast,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels",
            min=0,
            help="Largest picture accepted, in pixels (0: no limit).",
            show_default="Pillow's limit, about 89.5 M",
        ),
    ] = None,
    progress_flag: Annotated[
        bool,
        typer.Option(
            "--progress", help="Show progress on stderr even when it is not a terminal (on a terminal: always)."
        ),
    ] = False,
    engine: Annotated[
        Engine,
        typer.Option(
            "--engine",
            case_sensitive=False,
            help="local: this machine; ray: a Ray cluster (pip install 'vitattn[ray]'), where --out and the "
            "inputs must be paths every node sees. JSON records then come in finishing order.",
        ),
    ] = RunOptions.engine,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDR",
            help="--engine ray: the cluster (host:port, or auto for the one `ray start` runs here).",
            show_default="$RAY_ADDRESS, else a local Ray started for the run",
        ),
    ] = RunOptions.ray_address,
    ray_workers: Annotated[
        str | None,
        typer.Option(
            "--ray-workers",
            metavar="N|MIN-MAX",
            help="--engine ray: model replicas, fixed or autoscaled between MIN and MAX.",
            show_default="as many as the cluster's CPUs (or GPUs) allow",
        ),
    ] = None,
    ray_gpus_per_worker: Annotated[
        float,
        typer.Option(
            "--ray-gpus-per-worker", min=0.0, help="--engine ray: GPUs each replica reserves (0.5: two share one)."
        ),
    ] = RunOptions.ray_gpus_per_worker,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    html: Annotated[
        bool,
        typer.Option("--html", help="Also write each input's explorer page (explore.html) and OUT/index.html."),
    ] = False,
    explore_budget: Annotated[
        float, typer.Option("--explore-budget", min=0.1, metavar="MB", help="Largest explorer page, in MB.")
    ] = DEFAULT_EXPLORE_BUDGET / 1e6,
) -> None:
    """Draw the attention of chosen blocks' heads, or a rollout of them, over each picture."""
    if not inputs:
        if _stdin_is_terminal():
            name = ctx.command_path
            sys.stderr.write(
                f"Usage: {name} [OPTIONS] INPUTS...\nTry '{name} --help' for help.\n\n"
                "vitattn: error: no inputs: name image files or folders, or pipe paths in (- reads stdin)\n"
            )
            raise typer.Exit(ExitCode.USAGE)
        inputs = ["-"]
    progress = _Progress(enabled=True if progress_flag else None)

    def call() -> int:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: exists and is not a folder", option="out")
        stdin = None
        if "-" in inputs:
            if sys.stdin is None:
                raise UsageError("- reads paths from stdin, but stdin is closed", option="inputs")
            stdin = sys.stdin.buffer
        return _heatmap(
            progress,
            stdin=stdin,
            as_json=as_json,
            debug=debug,
            explore=_Explore(html=html, gallery=html, budget=int(explore_budget * 1e6)),
            inputs=InputOptions(tuple(inputs), recursive=recursive, null_separated=null),
            model=ModelOptions(model, weights=weights, pretrained=not no_pretrained, device=device),
            attention=AttentionOptions(
                blocks=_parse_blocks(block),
                query=query,
                heads=_parse_ints(heads, "heads"),
                method=method,
                fuse=fuse,
                discard_ratio=discard_ratio,
                target_class=_parse_target(target_class),
                top_k=top_k,
                precision=precision,
            ),
            render=RenderOptions(
                out=out,
                cmap=cmap,
                alpha=alpha,
                max_side=max_side,
                shared_scale=shared_scale,
                npy=npy,
                format=fmt,
                threshold=threshold,
            ),
            run=RunOptions(
                batch_size=batch_size,
                overwrite=overwrite,
                fail_fast=fail_fast,
                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None),
                engine=engine,
                ray_address=ray_address,
                ray_workers=parse_ray_workers(ray_workers),
                ray_gpus_per_worker=ray_gpus_per_worker,
            ),
        )

    _run_guarded(debug, call, progress)


def _heatmap(
    progress: _Progress,
    *,
    inputs: InputOptions,
    model: ModelOptions,
    attention: AttentionOptions,
    render: RenderOptions,
    run: RunOptions,
    stdin: BinaryIO | None,
    as_json: bool,
    debug: bool,
    explore: _Explore | None = None,
) -> int:
    from vitattn.discovery import folder_hints
    from vitattn.heatmap import count_inputs, start_heatmap

    for hint in folder_hints(inputs.paths, recursive=inputs.recursive):
        _err(hint.replace("with recursive", "with -r"), "hint")
    progress.total = count_inputs(inputs, out=render.out)
    if progress.total == 0:  # said before the model loads (which can take long), and nothing else is done
        _err(f"no inputs: {', '.join(map(display_path, inputs.paths))} holds no pictures to process", "warning")
        progress.started = True
        return ExitCode.OK
    progress.starting(f"loading {model.spec}...")
    started = start_heatmap(inputs=inputs, model=model, attention=attention, render=render, run=run, stdin=stdin)
    progress.clear()
    if started.loaded.weights == "random":
        _err("--no-pretrained: random weights, so the maps are meaningless (useful for testing only)", "warning")
    progress.started = True
    progress.starting(f"{progress.line(time.monotonic())} (first batch)")
    stream: Any = started.outcomes()
    if explore is not None and explore.html:
        from vitattn.explorer import add_pages

        stream = add_pages(
            started, budget=explore.budget, gallery=explore.gallery, blocks=None if explore.every_block else ()
        )
    first_page: str | None = None

    def report(outcome: Outcome) -> None:
        nonlocal first_page
        files = outcome.record.get("files")
        page = files.get("explore") if isinstance(files, dict) else None
        line = page if explore is not None and explore.pages_only else None
        _report(outcome, as_json=as_json, progress=progress, debug=debug, line=line)
        first_page = first_page or page

    try:
        with contextlib.closing(stream) as outcomes:  # closing drains the write workers, also on errors
            for outcome in outcomes:
                report(outcome)
    except BaseException:  # stopped early (Ctrl-C, SIGTERM, a fatal error): results finished by then are reported
        with contextlib.suppress(Exception):  # the stop is what gets reported, not a failure to report
            for outcome in started.unreported:
                report(outcome)
        raise
    for outcome in started.unreported:
        report(outcome)
    if progress.total is None and progress.done == 0:
        _err("no inputs: stdin held no paths", "warning")
    if explore is not None and explore.open and first_page:
        import webbrowser

        webbrowser.open(Path(first_page).resolve().as_uri())
    return ExitCode.INPUT_FAILED if progress.counts["error"] else ExitCode.OK


def _message(exc: VitattnError) -> str:
    """The error's line, led by the flag of the option at fault when there is one."""
    option = getattr(exc, "option", None)
    flag = FLAGS.get(option) if option else None
    return f"{flag}: {exc}" if flag else str(exc)


def _run_guarded(debug: bool, call: Any, progress: _Progress | None = None) -> NoReturn:
    """Run ``call``; turn every error into one stderr line and the exit code (the one place this happens).

    Once inputs are being processed (``progress.started``), the summary line is always the last line on
    stderr: after success, a failed input, a fatal error, Ctrl-C, SIGTERM or a closed stdout.
    """

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            _check_stdout()
            code = call()
        except BaseException:
            if progress is not None:  # the error line starts on a clean line, not after "loading ..."
                progress.clear()
            raise
    except VitattnError as exc:
        if debug:
            raise
        _err(_message(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted", "error")
        code = ExitCode.INTERRUPTED
    except Terminated:
        _err("terminated", "error")
        code = ExitCode.TERMINATED
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head -1`): stop quietly
        _silence(sys.stdout)
        code = 128 + signal.SIGPIPE
    except Exception as exc:  # a bug: still one line, and the summary of what was done
        if debug:
            raise
        _err(f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)")
        code = ExitCode.FATAL
    finally:
        if progress is not None and progress.started:
            progress.finish()
            progress.clear()
            _to_stderr(progress.summary() + "\n")
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


@app.command(cls=_Command, no_args_is_help=False)
def stats(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders, or - to read paths from stdin; with --merge, report folders.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Report folder.")] = StatsOptions.out,
    merge: Annotated[
        bool, typer.Option("--merge", help="Merge the report folders given as INPUTS into the report -o.")
    ] = False,
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Descend into sub-folders.")] = False,
    null: Annotated[
        bool, typer.Option("-0", "--null", help="Paths on stdin are NUL-separated (find -print0).")
    ] = False,
    model: Annotated[
        str,
        typer.Option("-m", "--model", help="timm model name, hf-hub:ORG/NAME, local-dir:PATH, or demo (bundled)."),
    ] = DEFAULT_MODEL,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", metavar="FILE", help="Local checkpoint (.safetensors, .pth, .pt, .bin).", show_default=False
        ),
    ] = None,
    no_pretrained: Annotated[
        bool, typer.Option("--no-pretrained", help="Random weights, seeded (the statistics are meaningless).")
    ] = False,
    block: Annotated[
        list[str] | None,
        typer.Option("-b", "--block", help="Block index; negatives count from the end. Repeat or use 3,11 or all.",
                     show_default="all"),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=0,
            help="0: no predictions and no per-class maps (the forward pass stops after the last block); "
            "otherwise the top-1 class is used.",
            show_default="1 with a classifier",
        ),
    ] = None,
    classes: Annotated[
        int, typer.Option("--classes", min=0, help="Most frequent predicted classes given a mean map of their own.")
    ] = StatsOptions.classes,
    no_plots: Annotated[
        bool, typer.Option("--no-plots", help="Write heads.csv and stats.json only (no matplotlib plots).")
    ] = not StatsOptions.plots,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON record per input on stdout, then one for the report.")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda[:N], mps.")
    ] = ModelOptions.device,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images per forward pass.")
    ] = RunOptions.batch_size,
    precision: Annotated[
        Precision, typer.Option("--precision", case_sensitive=False, help="Forward-pass precision (autocast).")
    ] = AttentionOptions.precision,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh; otherwise a rerun adds only inputs not counted yet.")
    ] = StatsOptions.overwrite,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop at the first failed input.")
    ] = RunOptions.fail_fast,
    max_pixels: Annotated[
        int | None,
        typer.Option("--max-pixels", min=0, help="Largest picture accepted, in pixels (0: no limit).",
                     show_default="Pillow's limit, about 89.5 M"),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Attention statistics over a dataset: distance, entropy, prefix mass, sinks per head; maps per class."""
    if not inputs:
        if merge or _stdin_is_terminal():
            name = ctx.command_path
            what = "report folders to merge" if merge else "image files or folders, or pipe paths in (- reads stdin)"
            sys.stderr.write(
                f"Usage: {name} [OPTIONS] INPUTS...\nTry '{name} --help' for help.\n\n"
                f"vitattn: error: no inputs: name {what}\n"
            )
            raise typer.Exit(ExitCode.USAGE)
        inputs = ["-"]
    progress = _Progress()
    options = StatsOptions(out=out, classes=classes, overwrite=overwrite, plots=not no_plots)

    def call() -> int:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: exists and is not a folder", option="out")
        if merge:
            from vitattn.stats_report import merge_reports

            report, files = merge_reports(
                [Path(p) for p in inputs], out, overwrite=overwrite, classes=classes, plots=not no_plots
            )
            _stats_summary(out, files, report.images, as_json=as_json)
            return ExitCode.OK
        stdin = None
        if "-" in inputs:
            if sys.stdin is None:
                raise UsageError("- reads paths from stdin, but stdin is closed", option="inputs")
            stdin = sys.stdin.buffer
        return _stats(
            progress,
            stdin=stdin,
            as_json=as_json,
            debug=debug,
            inputs=InputOptions(tuple(inputs), recursive=recursive, null_separated=null),
            model=ModelOptions(model, weights=weights, pretrained=not no_pretrained, device=device),
            attention=AttentionOptions(
                blocks=_parse_blocks(block) if block else None, top_k=top_k, precision=precision
            ),
            options=options,
            run=RunOptions(
                batch_size=batch_size,
                fail_fast=fail_fast,
                max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None),
            ),
        )

    _run_guarded(debug, call, progress)


def _stats(
    progress: _Progress,
    *,
    inputs: InputOptions,
    model: ModelOptions,
    attention: AttentionOptions,
    options: StatsOptions,
    run: RunOptions,
    stdin: BinaryIO | None,
    as_json: bool,
    debug: bool,
) -> int:
    from vitattn.discovery import folder_hints
    from vitattn.stats_run import start_stats

    for hint in folder_hints(inputs.paths, recursive=inputs.recursive):
        _err(hint.replace("with recursive", "with -r"), "hint")
    started = start_stats(inputs=inputs, model=model, attention=attention, stats=options, run=run, stdin=stdin)
    if started.loaded.weights == "random":
        _err("--no-pretrained: random weights, so the statistics are meaningless (useful for testing only)", "warning")
    progress.started = True
    with contextlib.closing(started.outcomes()) as outcomes:  # closing saves the sums so far, also on errors
        for outcome in outcomes:
            _report(outcome, as_json=as_json, progress=progress, debug=debug)
    progress.clear()
    if started.report is not None:
        _stats_summary(options.out, started.files, started.report.images, as_json=as_json)
    return ExitCode.INPUT_FAILED if progress.counts["error"] else ExitCode.OK


def _stats_summary(out: Path, files: dict[str, str], images: int, *, as_json: bool) -> None:
    """The report's line on stdout: its folder, or a JSON record with its files."""
    from vitattn.outputs import json_line

    if as_json:
        _emit(json_line({"report": os.fspath(out), "images": images, "files": files}))
    else:
        _emit(os.fspath(out))


@app.command(cls=_Command)
def info(
    model: Annotated[str, typer.Argument(help="timm model name, hf-hub:ORG/NAME or local-dir:PATH.")] = DEFAULT_MODEL,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Show a model's depth, heads, token layout, patch grid and preprocessing (no weights needed)."""

    def call() -> int:
        import json

        from vitattn.models import describe, load_model

        d = describe(load_model(model, pretrained=False, device="cpu"))
        if as_json:
            _emit(json.dumps(d))
            return ExitCode.OK
        roles = ", ".join(f"{p['index']}:{p['role']}" for p in d["prefix_tokens"]) or "none"
        lines = [
            f"model          {d['model']} ({d['architecture']})",
            f"depth          {d['depth']} blocks, {d['heads']} heads, width {d['embed_dim']}",
            f"prefix tokens  {len(d['prefix_tokens'])} ({roles}), then {d['grid'][0]}×{d['grid'][1]} patches",
            f"patch size     {d['patch_size'][0]}×{d['patch_size'][1]}",
            f"input size     {d['input_size'][1]}×{d['input_size'][2]}",
            f"mean / std     {d['mean']} / {d['std']}",
            f"interpolation  {d['interpolation']}, crop_pct {d['crop_pct']}, crop_mode {d['crop_mode']}",
            f"classes        {d['num_classes']}",
            f"default query  {d['default_query']}",
            f"adapter        {d['adapter']}",
            *_site_lines(d["sites"]),
        ]
        _emit("\n".join(lines))
        return ExitCode.OK

    _run_guarded(debug, call)


def _site_key(site: dict[str, Any]) -> tuple[Any, ...]:
    return site["kind"], site["prefix_tokens"], site["queries"], site["heads"], site["grid"]


def _site_lines(sites: list[dict[str, Any]]) -> list[str]:
    """``info``'s blocks: runs of blocks with the same kind, prefix, queries, heads and grid shown once."""
    lines: list[str] = []
    i = 0
    while i < len(sites):
        j = i
        key = _site_key(sites[i])
        while j + 1 < len(sites) and _site_key(sites[j + 1]) == key:
            j += 1
        span = str(i) if i == j else f"{i}..{j}"
        module = sites[i]["module"] if i == j else f"{sites[i]['module']} .. {sites[j]['module']}"
        lines.append(
            f"blocks {span:<7} {module}: {key[0]} attention, {key[3]} heads, {key[4][0]}×{key[4][1]} grid, "
            f"queries {', '.join(key[2])}"
        )
        i = j + 1
    return lines


@app.command(cls=_Command)
def models(
    pattern: Annotated[str, typer.Argument(help="Wildcard filter in any case, e.g. '*dinov2*'.")] = "",
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="Only models with pretrained weights on the hub.")
    ] = False,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="Every timm architecture: name, supported or refused, adapter or reason (TSV)."),
    ] = False,
    summary: Annotated[
        bool, typer.Option("--summary", help="Coverage counts by family (pretrained tags and architectures).")
    ] = False,
) -> None:
    """List the timm models vitattn supports."""

    def call() -> int:
        from vitattn.models import supported_models

        if show_all or summary:
            return _coverage_report(pattern, pretrained=pretrained, summary=summary)
        names = supported_models(pattern, pretrained=pretrained)
        for name in names:
            _emit(name)
        if not names:
            _err(f"no supported model matches {pattern!r}", "warning")
        return ExitCode.OK

    _run_guarded(False, call)


@app.command(no_args_is_help=True)
def explore(
    inputs: Annotated[list[str], typer.Argument(help="Image files or folders (- reads paths from stdin).")],
    recursive: Annotated[bool, typer.Option("-r", "--recursive", help="Descend into sub-folders.")] = False,
    model: Annotated[
        str,
        typer.Option("-m", "--model", help="timm model name, hf-hub:ORG/NAME, local-dir:PATH, or demo (bundled)."),
    ] = DEFAULT_MODEL,
    weights: Annotated[
        str | None,
        typer.Option("--weights", metavar="FILE", help="Local checkpoint (.safetensors, .pth, .pt, .bin).",
                     show_default=False),
    ] = None,
    no_pretrained: Annotated[
        bool, typer.Option("--no-pretrained", help="Random weights, seeded (the maps are meaningless; for testing).")
    ] = False,
    block: Annotated[
        list[str] | None,
        typer.Option("-b", "--block", help="Blocks of the page and the PNGs: indices (negatives from the end), "
                     "3,11, or all.", show_default="every block in the page, the last in the PNGs"),
    ] = None,
    heads: Annotated[str | None, typer.Option("--heads", help="Heads kept, e.g. 0,3,5.", show_default="all")] = None,
    query: Annotated[
        Query | None,
        typer.Option("--query", parser=_parse_query, metavar="QUERY",
                     help="The query the page opens with (and rollout's): cls, dist, patch-mean, or patch:R,C.",
                     show_default="cls, or patch-mean without a class token"),
    ] = AttentionOptions.query,
    method: Annotated[
        Method, typer.Option("--method", case_sensitive=False, help="Also compute rollout or grad-rollout.")
    ] = AttentionOptions.method,
    fuse: Annotated[HeadFusion, typer.Option("--fuse", case_sensitive=False, help="How heads are combined.")] = (
        AttentionOptions.fuse
    ),
    discard_ratio: Annotated[
        float | None, typer.Option("--discard-ratio", help="rollout: drop this fraction of each row.", show_default="0")
    ] = AttentionOptions.discard_ratio,
    target_class: Annotated[
        str | None, typer.Option("--target-class", help="grad-rollout: class index or top1.", show_default="top1")
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = RenderOptions.out,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per input on stdout.")] = False,
    cmap: Annotated[str, typer.Option("--cmap", help="The colormap the page opens with.")] = RenderOptions.cmap,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Heatmap opacity.")] = RenderOptions.alpha,
    max_side: Annotated[
        int, typer.Option("--max-side", min=0, help="Long side of the photo and overlays in pixels (0: original).")
    ] = RenderOptions.max_side,
    shared_scale: Annotated[
        bool, typer.Option("--shared-scale", help="Open with one colour scale across heads.")
    ] = RenderOptions.shared_scale,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda[:N], mps.")] = ModelOptions.device,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=0, help="Predictions shown.", show_default="5 for an ImageNet head")
    ] = AttentionOptions.top_k,
    precision: Annotated[
        Precision, typer.Option("--precision", case_sensitive=False, help="Forward-pass precision (autocast).")
    ] = AttentionOptions.precision,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo inputs whose outputs exist.")] = False,
    explore_budget: Annotated[
        float, typer.Option("--explore-budget", min=0.1, metavar="MB", help="Largest page, in MB.")
    ] = DEFAULT_EXPLORE_BUDGET / 1e6,
    open_page: Annotated[bool, typer.Option("--open", help="Open the first page in the default browser.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Write an interactive explorer page (explore.html) per picture: any block, head, query patch."""
    progress = _Progress()

    def call() -> int:
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: exists and is not a folder", option="out")
        return _heatmap(
            progress,
            stdin=sys.stdin.buffer if "-" in inputs and sys.stdin is not None else None,
            as_json=as_json,
            debug=debug,
            explore=_Explore(
                html=True, budget=int(explore_budget * 1e6), pages_only=True, open=open_page, every_block=not block
            ),
            inputs=InputOptions(tuple(inputs), recursive=recursive),
            model=ModelOptions(model, weights=weights, pretrained=not no_pretrained, device=device),
            attention=AttentionOptions(
                blocks=_parse_blocks(block),  # the PNGs' blocks (default -1); the page: every block unless -b
                query=query,
                heads=_parse_ints(heads, "heads"),
                method=method,
                fuse=fuse,
                discard_ratio=discard_ratio,
                target_class=_parse_target(target_class),
                top_k=top_k,
                precision=precision,
            ),
            render=RenderOptions(out=out, cmap=cmap, alpha=alpha, max_side=max_side, shared_scale=shared_scale),
            run=RunOptions(overwrite=overwrite),
        )

    _run_guarded(debug, call, progress)


def _coverage_report(pattern: str, *, pretrained: bool, summary: bool) -> int:
    """``models --all`` (one TSV line per architecture) or ``models --summary`` (counts by family)."""
    from vitattn.coverage import census, coverage, pretrained_tags

    rows = census(pattern)
    if pretrained:
        tags = pretrained_tags()
        rows = [r for r in rows if tags[r.name]]
    if not summary:
        for r in rows:
            _emit(f"{r.name}\t{'supported' if r.supported else 'refused'}\t{r.adapter or r.reason}")
        return ExitCode.OK
    c = coverage(rows)
    _emit("family\tsupported_tags\ttags\tsupported_archs\tarchs")
    for module, (sa, a, st, t) in sorted(c.by_family.items(), key=lambda kv: (-kv[1][3], kv[0])):
        _emit(f"{module}\t{st}\t{t}\t{sa}\t{a}")
    _emit(f"total\t{c.supported_tags}\t{c.attention_tags}\t{c.supported_archs}\t{c.attention_archs}")
    _err(
        f"{c.supported_tags} of {c.attention_tags} pretrained tags of attention-bearing architectures are "
        f"supported ({100 * c.fraction:.1f}%)",
        "coverage",
    )
    return ExitCode.OK


def main() -> None:
    """Console-script entry point (also ``python -m vitattn``: the same program name, so completion works)."""
    if sys.stderr is not None and hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(errors="backslashreplace")
    app(prog_name="vitattn")
