"""Write stage: output names, atomic writes, JSON records and resume.

Layout (B is the non-negative block index; EXT the overlay format)::

    OUT/<rel>/block{B}_head{H}.EXT       --method raw: one overlay per head
    OUT/<rel>/block{B}_mean.EXT          --method raw: the fused heads (block{B}_max / _min with --fuse)
    OUT/<rel>/block{B}_{METHOD}.EXT      --method rollout / grad-rollout: the method's map
    OUT/<rel>/block{B}_grid.EXT          photo (+ the method's map) + every head + fused, labelled
    OUT/<rel>/block{B}_attn.npy          --npy, raw: float32 (heads, grid_h, grid_w)
    OUT/<rel>/block{B}_{METHOD}.npy      --npy, other methods: float32 (grid_h, grid_w)
    OUT/<rel>/<overlay>_mask.EXT         --threshold: the smallest set of patches holding that mass
    OUT/<rel>/meta.json                  written last: an input is done when it is in place

Every file goes to a temporary name in its folder and is renamed into place, so a folder never holds a
half-written file. A rerun skips inputs whose meta.json records the same settings.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vitattn.errors import InputError, OutputError, Reason, display_path

META = "meta.json"
TMP_MARK = ".vitattn-tmp-"
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_counter = itertools.count()
_counter_lock = threading.Lock()


def head_name(block: int, head: int, ext: str) -> str:
    return f"block{block}_head{head}.{ext}"


def fused_name(block: int, fuse: str, ext: str) -> str:
    """The fused map's overlay: ``block{B}_mean``, ``block{B}_max`` or ``block{B}_min``."""
    return f"block{block}_{fuse}.{ext}"


def method_name(block: int, method: str, ext: str) -> str:
    """A method's map overlay (``ext``) or array (``npy``): ``block{B}_rollout.png``..."""
    return f"block{block}_{method}.{ext}"


def mask_name(name: str) -> str:
    """The mask picture that goes with an overlay: ``block3_head0.png`` -> ``block3_head0_mask.png``."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_mask.{ext}" if dot else f"{name}_mask"


def grid_name(block: int, ext: str) -> str:
    return f"block{block}_grid.{ext}"


def npy_name(block: int) -> str:
    return f"block{block}_attn.npy"


def _tmp_path(path: Path) -> Path:
    with _counter_lock:
        n = next(_counter)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{n}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary name next to ``path``, then rename it into place.

    Raises:
        OutputError: the disk is full or read-only (fatal for the run).
        OSError: any other write failure (the caller decides whether it is per input).
    """
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise_if_fatal(exc, path)
        raise


def raise_if_fatal(exc: OSError, path: Path) -> None:
    """Raise :class:`OutputError` when a write failure affects every input (disk full, quota, read-only)."""
    if exc.errno in _FATAL_ERRNOS:
        raise OutputError(f"cannot write {display_path(path)}: {os.strerror(exc.errno or 0)}") from exc


def write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8", "surrogateescape")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_npy(path: Path, array: Any) -> None:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # an open file: np.save would append .npy to a bare name
            np.save(f, array)

    atomic_write(path, write)


def remove_stale_temps(folder: Path) -> None:
    """Remove temporary files a killed run left in ``folder``."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if TMP_MARK in entry.name and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def prepare_out_root(out: Path) -> None:
    """Create the output folder, or fail the whole run clearly if it is unusable."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out} is not writable")


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's meta.json, or None when absent or unreadable (an incomplete result)."""
    try:
        with open(folder / META, "rb") as f:
            meta = json.loads(f.read().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def resume_state(
    folder: Path,
    settings: dict[str, Any],
    *,
    overwrite: bool,
    path: str,
    input_stat: dict[str, int] | None = None,
    files: Iterable[str] = (),
) -> str:
    """Decide what to do with an input whose outputs go to ``folder``.

    Args:
        input_stat: the input's ``{"size", "mtime_ns"}`` now; when given, a result recorded for a file
            of another size or time (another file of the same name, or an edited one) is not skipped.
        files: the names the result must have (:func:`vitattn.records.result_files`); a result missing
            any of them is redone.

    Returns:
        ``skip`` (done before with the same settings, for the same input) or ``run``.

    Raises:
        InputError: complete results with other settings (or of another input) exist and ``overwrite`` is off.
    """
    meta = read_meta(folder)
    if meta is None:
        return "run"
    same_input = input_stat is None or meta.get("input_stat") == input_stat
    if meta.get("settings") == settings and same_input and not overwrite:
        complete = all(os.path.isfile(folder / name) for name in files)
        return "skip" if complete else "run"
    if overwrite:
        return "run"
    raise InputError(path, Reason.OUTPUTS_EXIST, None)


def start_result(folder: Path) -> list[str]:
    """Make ``folder`` ready for a new result: create it, remove stale temporary files, and remove an older
    result's meta.json first, so that a run stopped half-way leaves a folder that reads as incomplete
    (redone by the next run) rather than old settings over a mix of old and new files.

    Returns:
        The files the older result listed (to remove those the new one does not write).
    """
    meta = read_meta(folder)
    files = meta.get("files") if meta else None
    old = [str(f) for f in files] if isinstance(files, list) else []
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    with contextlib.suppress(FileNotFoundError):
        (folder / META).unlink()
    return old


def abandon_result(folder: Path, written: Iterable[str]) -> None:
    """After a failed write: remove the files this attempt wrote, and the folder when that empties it."""
    remove_files(folder, written)
    with contextlib.suppress(OSError):
        folder.rmdir()


def remove_files(folder: Path, names: Iterable[str]) -> None:
    """Remove files listed by an older result that the new one does not have."""
    for name in names:
        if "/" in name or name in ("", ".", ".."):
            continue
        with contextlib.suppress(OSError):
            (folder / name).unlink()


def json_line(record: dict[str, Any]) -> str:
    """One JSON record per line (non-UTF-8 path bytes survive as \\udcXX escapes); strict JSON, never NaN."""
    return json.dumps(record, ensure_ascii=True, separators=(", ", ": "), allow_nan=False)
