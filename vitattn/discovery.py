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
_SEEN_LIMIT = 1_000_000  # identities remembered for duplicates: bounded, for endless stdin lists


@dataclass(frozen=True)
class InputItem:
    """One input of a run.

    Attributes:
        path: Filesystem path as given or as found by a scan (may hold surrogate escapes for
            file names that are not valid UTF-8; ``os.fsencode`` restores the bytes).
        rel: POSIX relative output name (:func:`output_rel`): the outputs of this input go to
            ``OUT/<rel>/``. Never empty, ``.``, ``..`` or absolute.
        error: A failure already known at discovery time, or None.
        source: The input's identity, recorded in ``meta.json`` and checked on resume: its path
            relative to the current folder, or absolute when it lies outside (:func:`output_rel`).
        duplicate_of: For a file named or found a second time (the same file, by device and inode),
            the path it was first met as; such an item is reported, never processed twice.
    """

    path: str
    rel: str
    error: InputError | None = None
    source: str = ""
    duplicate_of: str | None = None

    def __post_init__(self) -> None:
        if not self.source:
            object.__setattr__(self, "source", output_rel(self.path)[0])


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
        One :class:`InputItem` per input met: a file met again (the same device and inode: a
        repeated name, ``./x`` and ``x``, a symlink or a hard link) comes back with
        ``duplicate_of`` set; a file or folder inside an excluded folder comes back with an
        error (:data:`Reason.INSIDE_OUTPUT`); an excluded folder met during a scan is passed over.
        ``rel`` is :func:`output_rel` of the path, whatever the source kind.
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
    real: str
    ident: tuple[int, int]
    entries: Iterator[os.DirEntry[str]]


class _Finder:
    """The state of one :func:`iter_inputs` call: what was seen, which names are taken."""

    def __init__(self, *, recursive: bool, exclude: Sequence[str | os.PathLike[str]]) -> None:
        self.recursive = recursive
        self.excluded: set[tuple[int, int]] = set()  # (device, inode): the folder however it is reached
        for folder in exclude:
            try:
                st = os.stat(folder)
            except OSError:
                continue
            self.excluded.add((st.st_dev, st.st_ino))
        self._inside: dict[str, bool] = {}  # real folder -> inside an excluded folder
        self.seen: dict[object, str] = {}  # a file's identity -> the path it was first met as
        self.scanned_dirs: set[tuple[int, int]] = set()

    # -- the three kinds of source ------------------------------------------------------------

    def named(self, path: str) -> Iterator[InputItem]:
        """A path given on the command line: a file, a folder to scan, or an error."""
        yield from self._source(path, folders_allowed=True)

    def listed(self, path: str) -> Iterator[InputItem]:
        """A path read from stdin: a file or an error (a folder is an error here)."""
        yield from self._source(path, folders_allowed=False)

    def _source(self, path: str, *, folders_allowed: bool) -> Iterator[InputItem]:
        """One named or listed path: a file, a folder to scan (when allowed), or an error; never raises."""
        if "\0" in path:
            yield from self._emit("nul:" + path, path, nul_error(path))
            return
        real = os.path.realpath(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            yield from self._emit(real, path, _discovery_error(path, exc))
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if (st.st_dev, st.st_ino) in self.excluded or self._inside_excluded(real if is_dir else os.path.dirname(real)):
            yield from self._emit(real, path, InputError(path, Reason.INSIDE_OUTPUT))
            return
        if is_dir and folders_allowed:
            yield from self._scan(path, real, st)
            return
        if is_dir:
            error: InputError | None = InputError(path, Reason.IS_DIRECTORY)
        elif stat.S_ISREG(st.st_mode):
            error = None
        else:
            error = not_regular(path, st.st_mode)
        yield from self._emit((st.st_dev, st.st_ino) if error is None else real, path, error)

    def _scan(self, root: str, root_real: str, root_st: os.stat_result) -> Iterator[InputItem]:
        """Scan a folder source, one directory listing at a time (depth first, sorted)."""
        ident = (root_st.st_dev, root_st.st_ino)
        if ident in self.scanned_dirs:
            return
        self.scanned_dirs.add(ident)
        listing = _list_dir(root)
        if isinstance(listing, OSError):
            yield from self._emit("dir:" + root_real, root, _discovery_error(root, listing))
            return
        stack = [_Frame(root, root_real, ident, iter(listing))]
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
            is_link = _is_symlink(entry)
            real = os.path.realpath(entry.path) if is_link else os.path.join(frame.real, name)
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not self.recursive:
                    continue
                try:
                    st = entry.stat()
                except OSError as exc:
                    yield from self._emit("dir:" + real, entry.path, _discovery_error(entry.path, exc))
                    continue
                child = (st.st_dev, st.st_ino)
                if child in self.excluded:
                    continue  # the output folder, however it is reached (a bind mount, another case)
                if child in ancestors:
                    error = InputError(entry.path, Reason.SYMLINK_LOOP, "leads back to an enclosing folder")
                    loop_key = "loop:" + os.path.join(frame.real, name)
                    yield from self._emit(loop_key, entry.path, error)
                    continue
                if child in self.scanned_dirs:
                    continue  # already scanned through another path: its files are all seen
                self.scanned_dirs.add(child)
                listing = _list_dir(entry.path)
                if isinstance(listing, OSError):
                    error = _discovery_error(entry.path, listing)
                    yield from self._emit("dir:" + real, entry.path, error)
                    continue
                stack.append(_Frame(entry.path, real, child, iter(listing)))
                ancestors.add(child)
                continue
            if not _has_image_extension(name):
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                yield from self._emit(real, entry.path, _discovery_error(entry.path, exc))
                continue
            if stat.S_ISREG(st.st_mode):
                yield from self._emit((st.st_dev, st.st_ino), entry.path, None)
            else:  # not a folder, not a regular file
                yield from self._emit(real, entry.path, not_regular(entry.path, st.st_mode))

    # -- helpers -------------------------------------------------------------------------------

    def _emit(self, key: object, path: str, error: InputError | None) -> Iterator[InputItem]:
        """One item; ``key`` is the file's identity (device, inode) or, for an error, a text naming it."""
        source, rel = output_rel(path)
        first = self.seen.get(key)
        if first is not None:  # the same file again: reported, not processed twice (or its error again)
            yield InputItem(path, rel, error, source, duplicate_of=None if error else first)
            return
        if len(self.seen) < _SEEN_LIMIT:
            self.seen[key] = path
        yield InputItem(path, rel, error, source)

    def _inside_excluded(self, real_dir: str) -> bool:
        """Whether a folder (a real path) is an excluded folder or lies inside one, compared by identity."""
        if not self.excluded:
            return False
        known = self._inside.get(real_dir)
        if known is not None:
            return known
        try:
            st = os.stat(real_dir)
            inside = (st.st_dev, st.st_ino) in self.excluded
        except OSError:
            inside = False
        parent = os.path.dirname(real_dir)
        if not inside and parent != real_dir:
            inside = self._inside_excluded(parent)
        if len(self._inside) < 100_000:  # bounded: an endless stdin list must not grow memory
            self._inside[real_dir] = inside
        return inside


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


def output_rel(path: str) -> tuple[str, str]:
    """Where an input's outputs go: ``(source, rel)``, the same however the path is written.

    ``source`` is the path made absolute and normalised (``./``, ``//`` and ``a/..`` removed; symlinks are
    not resolved), then written relative to the current folder when it lies inside it, else kept absolute.
    ``rel`` is ``source`` without a leading ``/`` (tar's rule), with any component that is not a usable
    folder name replaced: ``photos/./cat.jpg`` and ``./photos/cat.jpg`` both give ``photos/cat.jpg``;
    ``../x.jpg`` run from ``/home/u/proj`` gives ``/home/u/x.jpg`` and ``home/u/x.jpg``.
    """
    path = path.replace("\0", "_")
    absolute = os.path.abspath(path)
    cwd = os.getcwd()
    inside = absolute.startswith(cwd.rstrip(os.sep) + os.sep)
    source = os.path.relpath(absolute, cwd) if inside else absolute
    if os.sep != "/":
        source = source.replace(os.sep, "/")
    parts = [_safe_component(part) for part in source.split("/") if part not in ("", ".")]
    return source, "/".join(parts) or "_"


def _safe_component(part: str) -> str:
    return "__" if part == ".." else part


NAME_MAX = 255
"""Bytes in one file or folder name that every common file system accepts."""


def suffixed(rel: str, source: str) -> str:
    """``rel`` with a suffix derived from ``source`` on its last component (``cat.jpg~1a2b3c4d``): where an
    input goes when its plain folder belongs to another input. The same input always gets the same suffix;
    the name is shortened (on a character boundary) to stay within :data:`NAME_MAX` bytes."""
    import hashlib

    tag = "~" + hashlib.sha256(os.fsencode(source)).hexdigest()[:8]
    head, _, last = rel.rpartition("/")
    raw = os.fsencode(last)
    room = NAME_MAX - len(tag)
    if len(raw) > room:
        last = raw[:room].decode("utf-8", "ignore") or "_"
    return f"{head}/{last}{tag}" if head else f"{last}{tag}"


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
