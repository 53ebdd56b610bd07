"""User-facing errors: every failure vitattn reports is one of these.

The CLI turns them into one line on stderr and an exit code in one place (``cli.py``);
library users catch :class:`VitattnError`.
"""

from __future__ import annotations

import errno
import os
import stat


class ExitCode:
    """Process exit codes (a contract: scripts depend on them)."""

    OK = 0  # every input processed or skipped as already done
    INPUT_FAILED = 1  # at least one input failed; all others are complete
    USAGE = 2  # bad option, model option or argument
    FATAL = 3  # the run could not go on: model or weights, output folder, disk
    INTERRUPTED = 130  # SIGINT / Ctrl-C
    TERMINATED = 143  # SIGTERM


class Reason:
    """The fixed vocabulary of per-input failure reasons (a contract too)."""

    NOT_AN_IMAGE = "not an image"
    EMPTY_FILE = "empty file"
    UNSUPPORTED_FORMAT = "unsupported format"
    TRUNCATED = "file is truncated"
    CORRUPT = "corrupt data"
    TOO_LARGE = "image too large"
    NAN_PIXELS = "NaN/inf pixels"
    IS_DIRECTORY = "is a directory"
    NOT_REGULAR = "not a regular file"
    PERMISSION = "permission denied"
    NO_SUCH_FILE = "no such file"
    SYMLINK_LOOP = "symlink loop"
    INSIDE_OUTPUT = "inside the output folder"
    OUTPUTS_EXIST = "outputs exist (use --overwrite)"
    UNSAFE_OUTPUT = "unsafe output folder"
    INFERENCE = "inference failed"
    NON_FINITE = "non-finite model output"
    WRITE = "could not write outputs"


class VitattnError(Exception):
    """Base class: a message meant for the user, and the exit code it maps to."""

    exit_code: int = ExitCode.FATAL


class UsageError(VitattnError):
    """A bad option value: block or head out of range, unknown query, bad model name...

    Attributes:
        option: the option's name in the library (``query``, ``top_k``...), when one option is at fault;
            the CLI prefixes the message with that option's flag.
    """

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class ModelError(VitattnError):
    """The model or its weights could not be loaded."""

    exit_code = ExitCode.FATAL


class WeightsUnavailableError(ModelError):
    """Pretrained weights could not be fetched (typically: no network)."""


class UnsupportedModelError(UsageError):
    """The model is not a ViT-style model with global self-attention blocks."""


class CaptureError(VitattnError):
    """A hook captured nothing, or something other than what was expected."""

    exit_code = ExitCode.FATAL


class OutputError(VitattnError):
    """The output folder is unusable or a write failed for a reason that affects every input."""

    exit_code = ExitCode.FATAL


class InputError(VitattnError):
    """One input failed. The batch goes on; the run exits 1 at the end."""

    exit_code = ExitCode.INPUT_FAILED

    def __init__(self, path: str, reason: str, detail: str | None = None) -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"{display_path(path)}: {self.message}")

    @property
    def message(self) -> str:
        """The reason, with its detail when there is one (``image too large (...)``)."""
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as text that can always be printed: undecodable bytes become ``\\xNN`` escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def os_reason(exc: OSError, default: str) -> tuple[str, str | None]:
    """The closest :class:`Reason` (and a detail when the reason alone says too little)."""
    known = {
        errno.ENOENT: Reason.NO_SUCH_FILE,
        errno.ENOTDIR: Reason.NO_SUCH_FILE,
        errno.ELOOP: Reason.SYMLINK_LOOP,
        errno.EACCES: Reason.PERMISSION,
        errno.EPERM: Reason.PERMISSION,
        errno.EISDIR: Reason.IS_DIRECTORY,
    }
    if exc.errno in known:
        return known[exc.errno], None
    return default, exc.strerror or type(exc).__name__


def nul_error(path: str) -> InputError:
    return InputError(path, Reason.NO_SUCH_FILE, "the name contains a NUL byte")


def not_regular(path: str, mode: int) -> InputError:
    if stat.S_ISFIFO(mode):
        kind = "a FIFO"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    else:
        kind = None
    return InputError(path, Reason.NOT_REGULAR, kind)
