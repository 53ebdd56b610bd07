"""Atomic writes by path, for files outside result folders (reports, pages), and JSON lines.

Result folders are written through :mod:`vitattn.store` (locked, opened without following symlinks); the
functions here give the same atomicity for a single file anywhere: the data goes to a temporary name
created exclusively next to the target (``O_CREAT | O_EXCL | O_NOFOLLOW``, unguessable), then is renamed
into place, so a reader never sees a half-written file and a planted symlink is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vitattn.store import META, TMP_MARK, _put, json_bytes, prepare_out_root, raise_if_fatal, write_new_file

__all__ = [
    "META",
    "TMP_MARK",
    "atomic_write",
    "atomic_write_file",
    "json_line",
    "prepare_out_root",
    "raise_if_fatal",
    "write_json",
    "write_npy",
]


def atomic_write_file(path: Path | str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a new temporary file next to ``path``, then rename it into place.

    Raises:
        OutputError: the disk is full or read-only (fatal for the run).
        OSError: any other write failure (the caller decides whether it is per input).
    """
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_new_file(dir_fd, path.name, write)
    except OSError as exc:
        raise_if_fatal(exc, path)
        raise
    finally:
        os.close(dir_fd)


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary *name* next to ``path``, then rename it into place.

    For writers that need a file name (a library that opens the file itself). The temporary file is created
    exclusively first, so the name cannot be taken over before ``write`` opens it; prefer
    :func:`atomic_write_file` when the writer accepts an open file.
    """
    from vitattn.store import temp_name

    path = Path(path)
    for _ in range(8):
        tmp = path.with_name(temp_name(path.name))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover
        raise FileExistsError(f"no free temporary name next to {path}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise_if_fatal(exc, path)
        raise


def write_json(path: Path | str, obj: Any) -> None:
    data = json_bytes(obj)
    atomic_write_file(path, lambda f: _put(f, data))


def write_npy(path: Path | str, array: Any) -> None:
    import numpy as np

    atomic_write_file(path, lambda f: np.save(f, array))


def json_line(record: dict[str, Any]) -> str:
    """One JSON record per line (non-UTF-8 path bytes survive as \\udcXX escapes); strict JSON, never NaN."""
    return json.dumps(record, ensure_ascii=True, separators=(", ", ": "), allow_nan=False)
