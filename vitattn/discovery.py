"""Find the inputs of a run: command-line sources -> a lazy stream of :class:`InputItem`.

:func:`iter_inputs` turns files, folders and ``-`` (a list of paths on stdin) into items, each with a unique
relative output name. Problems found here (a missing file, a symlink loop, a FIFO, an unreadable folder)
become items that carry an :class:`~vitattn.errors.InputError`; the generator never raises for one bad
path and never blocks on a special file. Nothing here decodes a picture (:mod:`vitattn.decoding` does).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from vitattn.errors import InputError, Reason, not_regular, nul_error, os_reason

IMAGE_EXTENSIONS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"})
"""File extensions (lower case, no dot) that a folder scan picks up, matched case-insensitively."""


_STDIN_CHUNK = 64 * 1024


@dataclass(frozen=True)
class InputItem:
    """One input of a run.

    Attributes:
        path: Filesystem path as given or as found by a scan (may hold surrogate escapes for
            file names that are not valid UTF-8; ``os.fsencode`` restores the bytes).
        rel: POSIX relative output name, unique within the run (``cats/tom.jpg``); the outputs
            of this input go to ``OUT/<rel>/``. Never empty, ``.``, ``..`` or absolute.
        error: A failure already known at discovery time, or None.
    """

    path: str
    rel: str
    error: InputError | None = None


def iter_inputs(
    sources: Sequence[str],
    *,
    recursive: bool = False,
    null_separated: bool = False,
    stdin: BinaryIO | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
) -> Iterator[InputItem]:
    """Yield the inputs named by ``sources``, lazily and in a deterministic order.

    A source is an image file (taken whatever its extension), a folder (its files with an
    extension in :data:`IMAGE_EXTENSIONS`, sorted by name, descending into sub-folders when
    ``recursive``; hidden entries, whose name starts with ``.``, are skipped), or ``-`` for a
    list of paths read incrementally from ``stdin`` (newline- or NUL-separated; a path in
    that list is never expanded as a folder).

    Nothing here raises for a bad path: a missing file, a dangling symlink, a symlink loop,
    a folder listed on stdin, a FIFO/socket/device or an unreadable folder becomes an item
    whose ``error`` says why. Directory symlinks met during a recursive scan are followed,
    but one leading back to an enclosing folder is reported once as a symlink loop.

    Args:
        sources: Command-line sources, in order.
        recursive: Descend into sub-folders of folder sources.
        null_separated: The stdin list is NUL-separated (``find -print0``) instead of
            newline-separated.
        stdin: Binary stream for ``-``; defaults to ``sys.stdin.buffer``.
        exclude: Folders (typically the run's output folder) whose contents are never
            yielded, whether found by a scan or named.

    Yields:
        One :class:`InputItem` per distinct input. A file reached twice (same resolved path)
        is yielded once; ``rel`` names are made unique by appending ``~2``, ``~3``... to the
        clashing component, in input order.
    """
    finder = _Finder(recursive=recursive, exclude=exclude)
    for source in sources:
        if source == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            separator = b"\0" if null_separated else b"\n"
            for entry in _read_entries(stream, separator):
                yield from finder.listed(entry)
        else:
            yield from finder.named(source)


def _read_entries(stream: BinaryIO, separator: bytes) -> Iterator[str]:
    """Split a binary stream into paths, reading only as much as each path needs.

    Uses ``read1`` when the stream has it, so a pipe is consumed as data arrives rather
    than in full buffers. Empty entries are ignored; in newline mode a trailing ``\\r`` is
    dropped (lists written on Windows).
    """
    read = getattr(stream, "read1", None) or stream.read
    pending: list[bytes] = []
    while True:
        chunk: bytes = read(_STDIN_CHUNK)
        if not chunk:
            break
        pieces = chunk.split(separator)
        for piece in pieces[:-1]:
            pending.append(piece)
            entry = _finish_entry(b"".join(pending), separator)
            pending.clear()
            if entry is not None:
                yield entry
        pending.append(pieces[-1])
    entry = _finish_entry(b"".join(pending), separator)
    if entry is not None:
        yield entry


def _finish_entry(raw: bytes, separator: bytes) -> str | None:
    if separator == b"\n" and raw.endswith(b"\r"):
        raw = raw[:-1]
    return os.fsdecode(raw) if raw else None


@dataclass
class _Frame:
    """A folder being scanned: where it is and what is left to look at."""

    path: str
    rel: str
    real: str
    ident: tuple[int, int]
    entries: Iterator[os.DirEntry[str]]


class _Finder:
    """The state of one :func:`iter_inputs` call: what was seen, which names are taken."""

    def __init__(self, *, recursive: bool, exclude: Sequence[str | os.PathLike[str]]) -> None:
        self.recursive = recursive
        reals = [os.path.realpath(os.fspath(folder)) for folder in exclude]
        self.excluded = tuple((real, real.rstrip(os.sep) + os.sep) for real in reals)
        self.seen: set[str] = set()
        self.scanned_dirs: set[tuple[int, int]] = set()
        self.names = _RelNames()

    # -- the three kinds of source ------------------------------------------------------------

    def named(self, path: str) -> Iterator[InputItem]:
        """A path given on the command line: a file, a folder to scan, or an error."""
        rel = _sanitize_rel(os.path.basename(path.rstrip("/" + (os.altsep or ""))))
        yield from self._source(path, rel, folders_allowed=True)

    def listed(self, path: str) -> Iterator[InputItem]:
        """A path read from stdin: a file or an error (a folder is an error here)."""
        yield from self._source(path, _sanitize_rel(path), folders_allowed=False)

    def _source(self, path: str, rel: str, *, folders_allowed: bool) -> Iterator[InputItem]:
        """One named or listed path: a file, a folder to scan (when allowed), or an error; never raises."""
        if "\0" in path:
            yield from self._emit("nul:" + path, path, rel, nul_error(path))
            return
        real = os.path.realpath(path)
        if self._is_excluded(real):
            return
        try:
            st = os.stat(path)
        except OSError as exc:
            yield from self._emit(real, path, rel, _discovery_error(path, exc))
            return
        if stat.S_ISDIR(st.st_mode) and folders_allowed:
            yield from self._scan(path, real, st)
            return
        if stat.S_ISDIR(st.st_mode):
            error: InputError | None = InputError(path, Reason.IS_DIRECTORY)
        elif stat.S_ISREG(st.st_mode):
            error = None
        else:
            error = not_regular(path, st.st_mode)
        yield from self._emit(real, path, rel, error)

    def _scan(self, root: str, root_real: str, root_st: os.stat_result) -> Iterator[InputItem]:
        """Scan a folder source, one directory listing at a time (depth first, sorted)."""
        ident = (root_st.st_dev, root_st.st_ino)
        if ident in self.scanned_dirs:
            return
        self.scanned_dirs.add(ident)
        root_rel = _sanitize_rel(os.path.basename(root.rstrip("/" + (os.altsep or ""))))
        listing = _list_dir(root)
        if isinstance(listing, OSError):
            yield from self._emit("dir:" + root_real, root, root_rel, _discovery_error(root, listing))
            return
        stack = [_Frame(root, "", root_real, ident, iter(listing))]
        ancestors = {ident}
        while stack:
            frame = stack[-1]
            entry = next(frame.entries, None)
            if entry is None:
                stack.pop()
                ancestors.discard(frame.ident)
                continue
            name = entry.name
            if name.startswith("."):
                continue
            rel = f"{frame.rel}/{name}" if frame.rel else name
            is_link = _is_symlink(entry)
            real = os.path.realpath(entry.path) if is_link else os.path.join(frame.real, name)
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not self.recursive or self._is_excluded(real):
                    continue
                try:
                    st = entry.stat()
                except OSError as exc:
                    yield from self._emit("dir:" + real, entry.path, rel, _discovery_error(entry.path, exc))
                    continue
                child = (st.st_dev, st.st_ino)
                if child in ancestors:
                    error = InputError(entry.path, Reason.SYMLINK_LOOP, "leads back to an enclosing folder")
                    loop_key = "loop:" + os.path.join(frame.real, name)
                    yield from self._emit(loop_key, entry.path, rel, error)
                    continue
                if child in self.scanned_dirs:
                    continue  # already scanned through another path: its files are all seen
                self.scanned_dirs.add(child)
                listing = _list_dir(entry.path)
                if isinstance(listing, OSError):
                    error = _discovery_error(entry.path, listing)
                    yield from self._emit("dir:" + real, entry.path, rel, error)
                    continue
                stack.append(_Frame(entry.path, rel, real, child, iter(listing)))
                ancestors.add(child)
                continue
            if not _has_image_extension(name) or self._is_excluded(real):
                continue
            try:
                is_file = entry.is_file()
            except OSError:
                is_file = False
            if is_file:
                yield from self._emit(real, entry.path, rel, None)
                continue
            try:  # not a folder, not a regular file: find out why
                st = os.stat(entry.path)
            except OSError as exc:
                yield from self._emit(real, entry.path, rel, _discovery_error(entry.path, exc))
            else:
                yield from self._emit(real, entry.path, rel, not_regular(entry.path, st.st_mode))

    # -- helpers -------------------------------------------------------------------------------

    def _emit(self, key: str, path: str, rel: str, error: InputError | None) -> Iterator[InputItem]:
        if key in self.seen:
            return
        self.seen.add(key)
        yield InputItem(path, self.names.claim(rel), error)

    def _is_excluded(self, real: str) -> bool:
        return any(real == folder or real.startswith(prefix) for folder, prefix in self.excluded)


def _list_dir(path: str) -> list[os.DirEntry[str]] | OSError:
    """One folder's entries sorted by their bytes (``LC_ALL=C ls`` order), or the error."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda entry: os.fsencode(entry.name))
    except OSError as exc:
        return exc


def _is_symlink(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_symlink()
    except OSError:
        return False


def _has_image_extension(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and ext.lower() in IMAGE_EXTENSIONS


def _sanitize_rel(path: str) -> str:
    """A path as a safe relative POSIX name: no root, no ``.``, ``..`` becomes ``__``, NUL ``_``."""
    path = path.replace("\0", "_")
    if os.sep != "/":
        path = path.replace(os.sep, "/")
    if os.altsep and os.altsep != "/":
        path = path.replace(os.altsep, "/")
    parts = ["__" if part == ".." else part for part in path.split("/") if part not in ("", ".")]
    return "/".join(parts) or "_"


class _RelNames:
    """Hands out unique output names.

    Two names clash when they are equal ignoring case (the output may live on a
    case-insensitive filesystem), or when one would be a folder *inside* the other's output
    folder (``tom.jpg`` and ``tom.jpg/a.png``). The later one gets ``~2``, ``~3``... on the
    clashing component.
    """

    def __init__(self) -> None:
        self._leaves: set[str] = set()
        self._dirs: set[str] = set()

    def claim(self, rel: str) -> str:
        parts = rel.split("/")
        done: list[str] = []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            candidate, counter = part, 1
            while True:
                key = "/".join([*done, candidate]).lower()
                clash = key in self._leaves or (last and key in self._dirs)
                if not clash:
                    break
                counter += 1
                candidate = f"{part}~{counter}"
            done.append(candidate)
        for index in range(1, len(done)):
            self._dirs.add("/".join(done[:index]).lower())
        result = "/".join(done)
        self._leaves.add(result.lower())
        return result


def _discovery_error(path: str, exc: OSError) -> InputError:
    return InputError(path, *os_reason(exc, Reason.NO_SUCH_FILE))


def folder_hints(sources: Sequence[str], *, recursive: bool) -> list[str]:
    """One line per named folder whose sub-folders a run without ``recursive`` would leave out."""
    if recursive:
        return []
    hints = []
    for source in sources:
        if source == "-" or not os.path.isdir(source):
            continue
        try:
            with os.scandir(source) as entries:
                subfolders = sum(1 for e in entries if not e.name.startswith(".") and e.is_dir())
        except OSError:
            continue
        if subfolders:
            word = "sub-folder" if subfolders == 1 else "sub-folders"
            hints.append(f"{source}: {subfolders} {word} not searched (descend into them with recursive)")
    return hints
