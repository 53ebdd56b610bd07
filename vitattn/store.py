"""The result store: one input's output folder, opened safely, locked while it is written, its ``meta.json``.

Guarantees (the README's Robustness section states them for users):

- **Nothing written outside the output folder.** A result folder is reached component by component from a
  descriptor of the output folder, each opened with ``O_NOFOLLOW``: a component that is a symlink is refused
  (:data:`~vitattn.errors.Reason.UNSAFE_OUTPUT`). Files are written to temporary names created exclusively
  (``O_CREAT | O_EXCL | O_NOFOLLOW``, random names) and renamed into place relative to the folder's
  descriptor, so a symlink planted under any name is replaced, never followed.
- **Concurrent writers.** Everything that changes a folder happens under an advisory lock on its
  ``.vitattn.lock`` (``flock``; NFS emulates it with POSIX locks). A second writer of the same input waits for
  the first, then reads the folder again: a result the first one completed counts as done. Temporary files
  found while holding the lock belong to a writer that is gone, and only those are removed.
- **Kills at any point.** Before any file of a result is written, ``meta.json`` records that result as
  ``writing``, with the files it had and the files it will have. A run that finds such an entry (its writer
  was killed) redoes that result or, if it is not asked for, removes its files; either way the folder ends
  with exactly one version of each result.

``meta.json`` (format 2)::

    {"vitattn": VERSION, "format": 2, "input": PATH, "input_path": SOURCE, "primary_model": {...},
     "results": {KEY: ENTRY, ...},           # every result in the folder, by key (see records.result_key)
     "files": [...],                         # every file of every complete result, and meta.json
     ...the latest complete result's fields: settings, top, head_stats, blocks, ... (as before format 2)}
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from vitattn.errors import InputError, OutputError, Reason, display_path

META = "meta.json"
LOCK = ".vitattn.lock"
TMP_MARK = ".vitattn-tmp-"
FORMAT = 2
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def raise_if_fatal(exc: OSError, path: Path | str) -> None:
    """Raise :class:`OutputError` when a write failure affects every input (disk full, quota, read-only)."""
    if exc.errno in _FATAL_ERRNOS:
        raise OutputError(f"cannot write {display_path(path)}: {os.strerror(exc.errno or 0)}") from exc


def temp_name(name: str) -> str:
    """A fresh temporary name for ``name`` in the same folder: hidden, marked, unguessable."""
    return f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(6)}"


def write_new_file(dir_fd: int, name: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``name`` in the folder ``dir_fd`` atomically: an exclusive temporary file, then a rename.

    Raises:
        OutputError: the disk is full or read-only (fatal for the run).
        OSError: any other failure; no temporary file is left behind.
    """
    for _ in range(8):
        tmp = temp_name(name)
        try:
            fd = os.open(tmp, _NEW_FILE_FLAGS, 0o666, dir_fd=dir_fd)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - eight random 48-bit names all taken
        raise FileExistsError(errno.EEXIST, "no free temporary name", name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise_if_fatal(exc, name)
        raise


def json_bytes(obj: Any) -> bytes:
    """Strict JSON (never NaN), indented, non-UTF-8 path bytes kept through surrogate escapes."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return text.encode("utf-8", "surrogateescape")


def _put(f: IO[bytes], data: bytes) -> None:
    f.write(data)


def _split(name: str) -> tuple[str, str]:
    """``sub/file`` -> (``sub``, ``file``); ``file`` -> (``""``, ``file``). Names hold at most one folder."""
    head, _, tail = name.rpartition("/")
    if tail in ("", ".", "..") or head in (".", "..") or "/" in head:
        raise ValueError(f"not a result file name: {name!r}")
    return head, tail


class ResultFolder:
    """One input's output folder, created and opened without following symlinks, and locked.

    Use as a context manager (:func:`open_locked`); every method needs the lock held.

    Attributes:
        path: the folder (``OUT/<rel>``), for messages and records.
    """

    def __init__(self, path: Path, fd: int, input_path: str) -> None:
        self.path = path
        self.fd = fd
        self.input_path = input_path
        self._subdirs: dict[str, int] = {"": fd}
        self._lock_fd: int | None = None

    # -- life cycle --------------------------------------------------------------------------------

    def _lock(self) -> None:
        try:
            lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                shown = display_path(self.path / LOCK)
                raise InputError(self.input_path, Reason.UNSAFE_OUTPUT, f"{shown} is a symlink") from exc
            raise self._error(exc, LOCK) from exc
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # waits while another writer (thread or process) holds it
        self._lock_fd = lock_fd

    def close(self) -> None:
        for sub, fd in self._subdirs.items():
            if sub:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._subdirs = {"": self.fd}
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def __enter__(self) -> ResultFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any] | None:
        """The folder's meta.json, or None when absent or unreadable."""
        try:
            fd = os.open(META, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        return _parse_meta(fd)

    def size(self, name: str) -> int | None:
        """The size of a regular file of the folder, or None when it is missing (or not a regular file)."""
        return file_size(self.fd, name)

    # -- writing -------------------------------------------------------------------------------------

    def subdir_fd(self, sub: str) -> int:
        """A descriptor of a folder inside this one (a model's results), created when missing."""
        fd = self._subdirs.get(sub)
        if fd is None:
            fd = _open_child(self.fd, sub, create=True, shown=self.path / sub, input_path=self.input_path)
            self._subdirs[sub] = fd
        return fd

    def write(self, name: str, write: Callable[[IO[bytes]], None]) -> int:
        """Write one file (``name`` or ``sub/name``) atomically; returns its size in bytes."""
        sub, leaf = _split(name)
        dir_fd = self.subdir_fd(sub)
        try:
            write_new_file(dir_fd, leaf, write)
            return os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False).st_size
        except OSError as exc:
            raise_if_fatal(exc, self.path / name)
            raise

    def write_meta(self, meta: dict[str, Any]) -> None:
        data = json_bytes(meta)
        self.write(META, lambda f: _put(f, data))

    def remove(self, names: Iterable[str]) -> None:
        """Remove files of this folder by name (missing ones are fine); never follows a symlink."""
        for name in names:
            try:
                sub, leaf = _split(name)
                dir_fd = self._subdirs.get(sub)
                if dir_fd is None:
                    dir_fd = _open_child(self.fd, sub, create=False, shown=self.path / sub, input_path="")
                    self._subdirs[sub] = dir_fd
                os.unlink(leaf, dir_fd=dir_fd)
            except (OSError, ValueError, InputError):
                continue

    def remove_stale_temps(self, subdirs: Iterable[str] = ()) -> None:
        """Remove temporary files left by writers that are gone: with the lock held, that is all of them."""
        for sub in {"", *subdirs}:
            try:
                dir_fd = self._subdirs.get(sub)
                if dir_fd is None:
                    dir_fd = _open_child(self.fd, sub, create=False, shown=self.path / sub, input_path="")
                    self._subdirs[sub] = dir_fd
                with os.scandir(dir_fd) as entries:
                    stale = [e.name for e in entries if TMP_MARK in e.name and e.is_file(follow_symlinks=False)]
            except (OSError, InputError):
                continue
            for name in stale:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)

    def _error(self, exc: OSError, name: str) -> InputError:
        raise_if_fatal(exc, self.path / name)
        return InputError(self.input_path, Reason.WRITE, f"{display_path(self.path / name)}: {exc.strerror or exc}")


def open_locked(out: Path, rel: str, input_path: str) -> ResultFolder:
    """Create (when missing) and open ``OUT/<rel>`` without following symlinks, and take its lock.

    Raises:
        InputError: a component of ``rel`` is a symlink or not a folder (``unsafe output folder``), or the
            folder cannot be created.
        OutputError: the output folder itself is unusable, or the disk is full.
    """
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the output folder itself may be a link
    except OSError as exc:
        raise OutputError(f"cannot open output folder {display_path(out)}: {exc.strerror or exc}") from exc
    shown = out
    try:
        for part in rel.split("/"):
            shown = shown / part
            child = _open_child(fd, part, create=True, shown=shown, input_path=input_path)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    folder = ResultFolder(out / rel, fd, input_path)
    try:
        folder._lock()
    except BaseException:
        folder.close()
        raise
    return folder


def _open_child(parent: int, name: str, *, create: bool, shown: Path, input_path: str) -> int:
    """Open (and create) one folder below ``parent``; a symlink or a non-folder there is refused."""
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=parent)
        except FileExistsError:
            pass
        except OSError as exc:
            raise_if_fatal(exc, shown)
            raise InputError(input_path, Reason.WRITE, f"cannot create {display_path(shown)}: {exc.strerror}") from exc
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
            except OSError:
                what = "not a folder"
            raise InputError(input_path, Reason.UNSAFE_OUTPUT, f"{display_path(shown)} is {what}") from exc
        raise InputError(input_path, Reason.WRITE, f"cannot open {display_path(shown)}: {exc.strerror}") from exc


def file_size(dir_fd: int, name: str) -> int | None:
    """Size of the regular file ``name`` (or ``sub/name``) below ``dir_fd``; None when missing or not regular."""
    try:
        sub, leaf = _split(name)
        st = os.stat(f"{sub}/{leaf}" if sub else leaf, dir_fd=dir_fd, follow_symlinks=False)
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def peek(folder: Path) -> tuple[dict[str, Any] | None, Callable[[str], int | None]]:
    """Read a result folder without the lock (the resume check before any work): its meta.json and a
    function giving the size of one of its files. The folder is not opened through a symlink."""
    try:
        fd = os.open(folder, _DIR_FLAGS)
    except OSError:
        return None, lambda name: None
    try:
        try:
            meta_fd = os.open(META, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError:
            return None, lambda name: None
        meta = _parse_meta(meta_fd)
        sizes = {}
        if meta is not None:
            for entry in results_of(meta).values():
                for name in entry.get("files", []):
                    if isinstance(name, str):
                        sizes[name] = file_size(fd, name)
        return meta, sizes.get
    finally:
        os.close(fd)


def _parse_meta(fd: int) -> dict[str, Any] | None:
    try:
        with os.fdopen(fd, "rb") as f:
            meta = json.loads(f.read().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def results_of(meta: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The result entries of a meta.json (format 2); an older format has none that can be trusted."""
    if not meta or meta.get("format") != FORMAT:
        return {}
    results = meta.get("results")
    if not isinstance(results, dict):
        return {}
    return {str(k): v for k, v in results.items() if isinstance(v, dict)}


def entry_complete(entry: dict[str, Any], size: Callable[[str], int | None]) -> bool:
    """A result is complete when meta.json says so and each of its files is there with its recorded size."""
    if entry.get("state") != "complete":
        return False
    sizes = entry.get("sizes")
    files = entry.get("files")
    if not isinstance(sizes, dict) or not isinstance(files, list):
        return False
    return all(isinstance(n, str) and sizes.get(n) is not None and size(n) == sizes.get(n) for n in files)


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
