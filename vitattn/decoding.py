"""Read one image file safely, as an upright 8-bit RGB picture.

:func:`load_image` opens a file defensively (regular-file check before any read, a restricted set of
formats, a pixel limit checked on the header, forced decoding, CRC verification for PNG) and converts it
to 8-bit RGB *correctly*: transparency is composited over :data:`BACKGROUND`, 16-bit and float pictures
are scaled instead of clipped, and EXIF orientation is applied. Every failure is an ``InputError``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, TextIO, cast

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from vitattn.errors import InputError, Reason, not_regular, nul_error, os_reason
from vitattn.options import DEFAULT_MAX_PIXELS

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
"""Pillow format names :func:`load_image` accepts. Nothing that runs an external program (EPS, PDF)."""


BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Transparent pixels are composited over this colour (white)."""

_JPEG_FORMATS = ("JPEG", "MPO")  # Pillow reports a multi-picture JPEG (many cameras) as MPO
_ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_TRANSPARENCY_KEY_MODES = frozenset({"L", "RGB", "P"})  # modes whose info["transparency"] Pillow applies
_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DETAIL_MAX = 200


@dataclass
class LoadedImage:
    """A decoded input, ready for preprocessing.

    Attributes:
        image: Mode ``RGB``, upright (EXIF orientation applied), first frame only.
        format: Pillow format name (``JPEG``, ``PNG``...; ``MPO`` for a multi-picture JPEG).
        warnings: Things worth telling the user that did not stop the load, such as
            ``multi-frame file: using the first of 12 frames`` or ``bad EXIF data ignored``.
    """

    image: Image.Image
    format: str
    warnings: list[str] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    """(width, height) of the upright picture at full resolution; ``image`` is smaller after JPEG draft decoding."""


def load_image(
    path: str,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] | None = None,
    min_long_side: int = 0,
) -> LoadedImage:
    """Load one picture as upright 8-bit RGB, or explain exactly why not.

    The file is checked with ``stat`` first (so a FIFO never blocks), opened with the
    formats in :data:`ALLOWED_FORMATS` only, its header size checked against ``max_pixels``
    before anything is decoded, PNG chunk CRCs verified, and the data decoded in full.
    Conversion to RGB is numerically careful: alpha (including palette transparency) is
    composited over :data:`BACKGROUND`; 16-bit pictures are scaled (65535 → 255); float
    pictures in [0, 1] are scaled to [0, 255] (other ranges are min-max scaled, with a
    warning); the first frame of a multi-frame file is used (with a warning).

    Args:
        path: File to load; errors carry it exactly as given.
        max_pixels: Largest width × height accepted; None for no limit. Pillow's
            decompression-bomb warning counts as an error.
        min_size: ``(width, height)`` the caller needs at least (in upright orientation).
            A JPEG is then decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at
            least this big on both sides, which is much faster for large photos.
        min_long_side: With ``min_size``: the reduced picture's long side must be at least this
            long too (e.g. the overlay size, while ``min_size`` is what the model's transform needs).

    Returns:
        The picture, its format and any warnings.

    Raises:
        InputError: For any problem with this one file. ``KeyboardInterrupt``,
            ``SystemExit`` and ``MemoryError`` are never turned into an ``InputError``.
    """
    _stat_regular(path)
    notes: list[str] = []
    try:
        with _open_regular(path) as fp, _PILLOW.load(max_pixels) as caught:
            try:
                image, fmt, size = _decode(path, fp, max_pixels, min_size, min_long_side, notes)
            except ValueError as exc:  # a metadata chunk over Pillow's size limit: the pixels may still be fine
                stripped = _large_metadata(exc) and _without_metadata(path)
                if not stripped:
                    raise
                notes.clear()
                image, fmt, size = _decode(path, stripped[0], max_pixels, min_size, min_long_side, notes)
                notes.append(f"large metadata ignored ({', '.join(stripped[1])} chunks over Pillow's size limit)")
        notes.extend(note for note in _warning_notes(caught) if note not in notes)
    except (InputError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(path, Reason.TOO_LARGE, _bomb_detail(str(exc), max_pixels)) from exc
    except EOFError as exc:
        raise InputError(path, Reason.TRUNCATED, _exc_detail(exc)) from exc
    except OSError as exc:
        if exc.errno is not None:
            raise InputError(path, *os_reason(exc, Reason.CORRUPT)) from exc
        reason = Reason.TRUNCATED if "truncated" in str(exc).lower() else Reason.CORRUPT
        raise InputError(path, reason, _exc_detail(exc)) from exc
    except Exception as exc:  # Pillow raises many types (ValueError, SyntaxError, struct.error...)
        raise InputError(path, Reason.CORRUPT, _exc_detail(exc)) from exc
    return LoadedImage(image, fmt, notes, size)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA = (b"iCCP", b"zTXt", b"iTXt", b"tEXt")  # colour profile and text: nothing the pixels need


def _large_metadata(exc: ValueError) -> bool:
    """Pillow's refusal of a PNG text or ICC chunk that decompresses past ``MAX_TEXT_CHUNK``/``MAX_TEXT_MEMORY``."""
    return "MAX_TEXT_CHUNK" in str(exc) or "MAX_TEXT_MEMORY" in str(exc)


def _without_metadata(path: str) -> tuple[io.BytesIO, list[str]] | None:
    """The PNG file without its colour-profile and text chunks (and the kinds dropped), or None when it is
    not a PNG. The chunks are dropped unread, so a compression bomb in one is never expanded."""
    import struct

    with _open_regular(path) as fp:
        data = fp.read()
    if not data.startswith(_PNG_SIGNATURE):
        return None
    kept, dropped, pos = [_PNG_SIGNATURE], [], len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length  # length, type, data, CRC
        if kind in _PNG_METADATA:
            dropped.append(kind.decode("ascii"))
        else:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return io.BytesIO(b"".join(kept)), sorted(set(dropped))


def _stat_regular(path: str) -> None:
    if "\0" in path:
        raise nul_error(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(path, *os_reason(exc, Reason.NO_SUCH_FILE)) from exc
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, Reason.IS_DIRECTORY)
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    if st.st_size == 0:
        raise InputError(path, Reason.EMPTY_FILE)


@contextlib.contextmanager
def _open_regular(path: str) -> Iterator[BinaryIO]:
    """Open for reading without ever blocking, and re-check it is a regular file.

    ``O_NONBLOCK`` plus ``fstat`` closes the window between the ``stat`` check and the open
    (a file swapped for a FIFO); it has no effect on regular files.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputError(path, *os_reason(exc, Reason.CORRUPT)) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        fp = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fp:
        yield fp


class _ShowWarning(Protocol):
    """The signature of ``warnings.showwarning``."""

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None: ...


class _PillowSession:
    """Process-wide Pillow and ``warnings`` settings for the loads in progress, in any thread.

    ``warnings.catch_warnings`` swaps process-wide state and is not safe when loads run in
    several threads (before Python 3.14 an unlucky interleaving leaves every later warning
    of the process going to a dead list). So the settings are shared and reference-counted
    instead: the first load to start installs them, the last one to finish removes them.

    While any load is in progress:

    * ``DecompressionBombWarning`` is an error (Pillow's security advice) and other warnings
      are shown every time rather than once, so that each file gets its own notes;
    * ``warnings.showwarning`` routes a warning raised in a thread that is loading to that
      load's own list (it becomes :attr:`LoadedImage.warnings`); other threads' warnings go
      to the previous handler as usual;
    * ``Image.MAX_IMAGE_PIXELS`` is lifted to the largest limit among the loads that allow
      more than Pillow's configured value (None when one allows any size). Each load's
      own header check (:func:`_check_pixels`) is authoritative, so a shared, higher Pillow
      limit never lets a picture through that its own caller refuses.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._depth = 0
        self._raised: list[int | None] = []
        self._pillow_limit: int | None = None
        self._filters: list[object] = []
        self._previous_show: _ShowWarning | None = None

    @contextlib.contextmanager
    def load(self, max_pixels: int | None) -> Iterator[list[str]]:
        """Enter the shared settings for one load; yields the list that collects its warnings."""
        sink: list[str] = []
        with self._lock:
            if self._depth == 0:
                self._install()
            self._depth += 1
            limit = self._pillow_limit
            raises = limit is not None and (max_pixels is None or max_pixels > limit)
            if raises:
                self._raised.append(max_pixels)
                self._apply_limit()
        self._local.sink = sink
        try:
            yield sink
        finally:
            self._local.sink = None
            with self._lock:
                if raises:
                    self._raised.remove(max_pixels)
                    self._apply_limit()
                self._depth -= 1
                if self._depth == 0:
                    self._uninstall()

    def _install(self) -> None:
        self._pillow_limit = Image.MAX_IMAGE_PIXELS
        warnings.filterwarnings("always")
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
        self._filters = list(warnings.filters[:2])
        self._previous_show = warnings.showwarning
        warnings.showwarning = self._show

    def _uninstall(self) -> None:
        filters = cast("list[object]", warnings.filters)
        for entry in self._filters:
            with contextlib.suppress(ValueError):
                filters.remove(entry)
        self._filters = []
        if warnings.showwarning == self._show and self._previous_show is not None:
            warnings.showwarning = self._previous_show
        self._previous_show = None
        Image.MAX_IMAGE_PIXELS = self._pillow_limit

    def _apply_limit(self) -> None:
        if not self._raised:
            Image.MAX_IMAGE_PIXELS = self._pillow_limit
        elif None in self._raised:
            Image.MAX_IMAGE_PIXELS = None
        else:
            Image.MAX_IMAGE_PIXELS = max(limit for limit in self._raised if limit is not None)

    def _show(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        sink: list[str] | None = getattr(self._local, "sink", None)
        if sink is not None:
            sink.append(str(message))
        elif self._previous_show is not None:
            self._previous_show(message, category, filename, lineno, file, line)


_PILLOW = _PillowSession()


def _warning_notes(messages: list[str]) -> list[str]:
    notes: list[str] = []
    for message in messages:
        text = message.strip()
        note = "bad EXIF data ignored" if "exif" in text.lower() else _clip(text)
        if note not in notes:
            notes.append(note)
    return notes


def _decode(
    path: str,
    fp: BinaryIO,
    max_pixels: int | None,
    min_size: tuple[int, int] | None,
    min_long_side: int,
    notes: list[str],
) -> tuple[Image.Image, str, tuple[int, int]]:
    opened: list[Image.Image] = []
    try:
        im = _identify(path, fp, ALLOWED_FORMATS)
        opened.append(im)
        fmt = im.format or "unknown"
        _check_pixels(path, im.size, max_pixels)
        if fmt == "PNG":  # a bad CRC decodes silently; only verify() on a fresh open notices
            im.verify()
            fp.seek(0)
            im = _identify(path, fp, (fmt,))
            opened.append(im)
        frames = getattr(im, "n_frames", 1)
        if isinstance(frames, int) and frames > 1:
            if fmt != "MPO":  # an MPO's extra pictures are previews or stereo views
                notes.append(f"multi-frame file: using the first of {frames} frames")
            im.seek(0)
        stored_size = im.size  # before any draft reduction
        if fmt in _JPEG_FORMATS:  # EXIF is in the header: readable before decoding
            orientation = _orientation(im, notes)
            if min_size is not None:
                want_w, want_h = min_size
                if orientation in _ROTATING_ORIENTATIONS:  # draft acts on the stored, unrotated picture
                    want_w, want_h = want_h, want_w
                if stored_size[0] >= stored_size[1]:  # the long side stays long when rotated
                    want_w = max(want_w, min_long_side)
                else:
                    want_h = max(want_h, min_long_side)
                if want_w > 0 and want_h > 0:
                    im.draft("RGB", (want_w, want_h))
            im.load()
        else:  # getexif() may decode the whole file (PNG): decode first, so errors are not EXIF's
            im.load()
            orientation = _orientation(im, notes)
        rotated = False
        if orientation is not None and orientation != 1:
            try:
                im = ImageOps.exif_transpose(im)
                rotated = orientation in _ROTATING_ORIENTATIONS
            except (MemoryError, InputError):
                raise
            except Exception:
                notes.append("bad EXIF data ignored")
        if _has_foreign_profile(opened[0]):
            notes.append("colour profile ignored")
        rgb = _to_rgb(path, im, notes)
        if any(rgb is other for other in opened):
            rgb = rgb.copy()  # the file-backed image is closed below
        width, height = stored_size
        return rgb, fmt, ((height, width) if rotated else (width, height))
    finally:
        for other in opened:
            other.close()


def _identify(path: str, fp: BinaryIO, formats: tuple[str, ...]) -> Image.Image:
    fp.seek(0)
    try:
        return Image.open(fp, formats=formats)
    except UnidentifiedImageError as exc:
        raise _unidentified(path, fp) from exc


def _unidentified(path: str, fp: BinaryIO) -> InputError:
    """Why Pillow could not open a file: a format we refuse, a broken header, or not a picture.

    Only the formats' signature tests run here, on the first bytes: nothing is parsed, so
    an EPS file is recognised without Ghostscript ever being started.
    """
    fp.seek(0)
    prefix = fp.read(16)
    if prefix.startswith(b"%PDF-"):
        return InputError(path, Reason.UNSUPPORTED_FORMAT, "PDF")
    Image.init()
    allowed = [name for name in ALLOWED_FORMATS if name in Image.OPEN]
    others = sorted(name for name in Image.OPEN if name not in ALLOWED_FORMATS)
    for name in [*allowed, *others]:
        accept = Image.OPEN[name][1]
        if accept is None:
            continue  # formats without a signature would match anything
        try:
            match = accept(prefix)
        except Exception:
            continue
        if match is True or (match and not isinstance(match, str)):
            if name in ALLOWED_FORMATS:
                return InputError(path, Reason.CORRUPT, f"{name} signature but unreadable header")
            return InputError(path, Reason.UNSUPPORTED_FORMAT, name)
    return InputError(path, Reason.NOT_AN_IMAGE)


def _check_pixels(path: str, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        detail = f"{width}×{height} = {pixels} pixels, limit {max_pixels}; raise it with --max-pixels"
        raise InputError(path, Reason.TOO_LARGE, detail)


def _bomb_detail(message: str, max_pixels: int | None) -> str:
    """Detail for a limit Pillow enforced itself (it does not say the width and height)."""
    found = re.search(r"\((\d+) pixels\)", message)
    pixels = f"{found.group(1)} pixels" if found else "too many pixels"
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    return f"{pixels}, limit {limit}; raise it with --max-pixels"


def _exc_detail(exc: BaseException) -> str:
    return _clip(str(exc).strip() or type(exc).__name__)


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _orientation(im: Image.Image, notes: list[str]) -> int | None:
    """The EXIF orientation (1 to 8), or None when absent, invalid or unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG)
    except (MemoryError, InputError):
        raise
    except Exception:
        notes.append("bad EXIF data ignored")
        return None
    if isinstance(value, int) and 1 <= value <= 8:
        return value
    return None


def _has_foreign_profile(im: Image.Image) -> bool:
    """Whether the file embeds a colour profile other than sRGB (which needs no action)."""
    profile = im.info.get("icc_profile")
    if not isinstance(profile, bytes) or not profile:
        return False
    return b"sRGB" not in profile and b"s\0R\0G\0B" not in profile


# --------------------------------------------------------------------------------------------
# Conversion to RGB
# --------------------------------------------------------------------------------------------


def _to_rgb(path: str, im: Image.Image, notes: list[str]) -> Image.Image:
    mode = im.mode
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(path, np.asarray(im), notes))
    if mode in _INT_MODES:
        data = np.asarray(im)
        grey = _int_to_uint8(data, notes)
        key = im.info.get("transparency")  # a 16-bit grey PNG's tRNS key: Pillow keeps it but never applies it
        if isinstance(key, int) and not isinstance(key, bool) and (data == key).any():
            alpha = np.where(data == key, 0, 255).astype(np.uint8)  # (h, w)
            return _composite(Image.fromarray(np.dstack([grey, grey, grey, alpha]), "RGBA"))
        return _grey_to_rgb(grey)
    if _has_alpha(im):
        return _composite(im.convert("RGBA") if im.mode != "RGBA" else im)
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in _ALPHA_MODES:
        return True
    if im.mode in _TRANSPARENCY_KEY_MODES and "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _composite(rgba: Image.Image) -> Image.Image:
    """Alpha-composite over :data:`BACKGROUND`, exactly rounded: c·a/255 + bg·(1 − a/255)."""
    data = np.asarray(rgba)
    alpha = data[..., 3:4].astype(np.uint16)
    colour = data[..., :3].astype(np.uint16)
    background = np.asarray(BACKGROUND, dtype=np.uint16)
    # colour·alpha + bg·(255 − alpha) ≤ 65025, so uint16 never overflows
    mixed = colour * alpha + background * (255 - alpha) + 127
    return Image.fromarray((mixed // 255).astype(np.uint8))


def _int_to_uint8(data: npt.NDArray[np.generic], notes: list[str]) -> npt.NDArray[np.uint8]:
    """16-bit (or 32-bit integer) greyscale to 8 bit: 0..65535 scaled to 0..255, rounded."""
    lowest, highest = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if lowest >= 0 and highest <= 65535:
        wide = data.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    notes.append(f"integer pixel values outside 0..65535 (min {lowest}, max {highest}): scaled min-max")
    return _min_max(data.astype(np.float64), float(lowest), float(highest))


def _float_to_uint8(path: str, data: npt.NDArray[np.generic], notes: list[str]) -> npt.NDArray[np.uint8]:
    """Float greyscale in [0, 1] to 0..255; other ranges min-max scaled; NaN/inf refused."""
    values = data.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(path, Reason.NAN_PIXELS)
    lowest, highest = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lowest >= 0.0 and highest <= 1.0:
        return np.floor(values * 255.0 + 0.5).astype(np.uint8)
    notes.append(f"float pixel values outside [0, 1] (min {lowest:g}, max {highest:g}): scaled min-max")
    return _min_max(values, lowest, highest)


def _min_max(values: npt.NDArray[np.float64], lowest: float, highest: float) -> npt.NDArray[np.uint8]:
    if highest <= lowest:  # a flat picture: nothing to stretch
        return np.full(values.shape, round(min(max(lowest, 0.0), 1.0) * 255), dtype=np.uint8)
    scaled = (values - lowest) * (255.0 / (highest - lowest))
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: npt.NDArray[np.uint8]) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")
