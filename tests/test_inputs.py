"""Tests for vitattn.discovery (iter_inputs) and vitattn.decoding (load_image).

Every file is generated in ``tmp_path`` by ``tests/corpus.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms

sys.path.insert(0, os.path.dirname(__file__))
import corpus

from vitattn.decoding import ALLOWED_FORMATS, BACKGROUND, DEFAULT_MAX_PIXELS, load_image
from vitattn.discovery import IMAGE_EXTENSIONS, InputItem, iter_inputs
from vitattn.errors import InputError, Reason

_NO_DAC_ENV = "VITATTN_TEST_WITHOUT_DAC_OVERRIDE"
_DAC_CAPS = "-dac_override,-dac_read_search"


def permissions_enforced(folder: Path) -> bool:
    """True when a mode-000 file cannot be read by this process (false for root with its usual capabilities)."""
    probe = folder / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        with open(probe, "rb"):
            return False
    except PermissionError:
        return True
    finally:
        probe.unlink()


def ran_without_dac_override(request: pytest.FixtureRequest, folder: Path) -> bool:
    """As root, run this test again in a child pytest without the capabilities that bypass file permissions.

    Returns True when the child ran it (and passed); the caller then returns. Never skips: a machine where
    permissions cannot be enforced at all fails the test.
    """
    if permissions_enforced(folder):
        return False
    assert os.environ.get(_NO_DAC_ENV) is None, "permissions are not enforced even without DAC override"
    assert shutil.which("setpriv"), "running as root: setpriv (util-linux) is needed to drop DAC override"
    cmd = ["setpriv", f"--bounding-set={_DAC_CAPS}", f"--inh-caps={_DAC_CAPS}"]
    cmd += [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid]
    env = {**os.environ, _NO_DAC_ENV: "1"}
    proc = subprocess.run(cmd, cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
    return True


# -- helpers ----------------------------------------------------------------------------------


def items(*sources: str, **options: Any) -> list[InputItem]:
    return list(iter_inputs(list(sources), **options))


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in ``tmp_path``: an input's output name is its path relative to the current folder."""
    monkeypatch.chdir(tmp_path)


def rels(found: list[InputItem], under: str = "") -> list[str]:
    """The output names, each checked to start with ``under/`` and shown without it."""
    prefix = f"{under}/" if under else ""
    assert all(item.rel.startswith(prefix) for item in found), [item.rel for item in found]
    return [item.rel[len(prefix) :] for item in found]


def reasons(found: list[InputItem], under: str = "") -> dict[str, str | None]:
    names = rels(found, under)
    return {name: item.error.reason if item.error else None for name, item in zip(names, found, strict=True)}


def touch_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(corpus.flat_jpeg((8, 8)))
    return path


def load_error(path: str | Path, **options: Any) -> InputError:
    with pytest.raises(InputError) as caught:
        load_image(str(path), **options)
    return caught.value


def pixels(path: Path, **options: Any) -> np.ndarray:
    loaded = load_image(str(path), **options)
    assert loaded.image.mode == "RGB"
    return np.asarray(loaded.image)


def mode_of(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def save(image: Image.Image, path: Path, **options: Any) -> Path:
    image.save(path, **options)
    return path


def in_thread(function: Any, timeout: float = 5.0) -> Any:
    """Run ``function`` in a thread; fail (instead of hanging) if it does not finish in time."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = function()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked"
    if "error" in result:
        raise result["error"]
    return result["value"]


# -- constants --------------------------------------------------------------------------------


def test_constants() -> None:
    assert {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"} == IMAGE_EXTENSIONS
    assert set(ALLOWED_FORMATS) == {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"}
    assert "EPS" not in ALLOWED_FORMATS and "PDF" not in ALLOWED_FORMATS
    assert DEFAULT_MAX_PIXELS == 89_478_485
    assert BACKGROUND == (255, 255, 255)


# -- discovery: folders -----------------------------------------------------------------------


def test_folder_scan_sorted_by_extension_case_insensitive(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for name in ["b.jpg", "a.PNG", "c.JpEg", "d.webp", "e.bmp", "f.tif", "g.TIFF", "h.gif"]:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"x")
    (photos / "notes.txt").write_text("x")
    (photos / "jpg").write_text("no extension")
    (photos / ".hidden.jpg").write_bytes(b"x")
    touch_jpeg(photos / "sub" / "deep.jpg")
    found = items(str(photos))
    assert rels(found, "photos") == ["a.PNG", "b.jpg", "c.JpEg", "d.webp", "e.bmp", "f.tif", "g.TIFF", "h.gif"]
    assert found[1].path == os.path.join(str(photos), "b.jpg")
    assert all(item.error is None for item in found)


def test_recursive_scan_relative_names(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    touch_jpeg(photos / "cats" / "tom.jpg")
    touch_jpeg(photos / "cats" / "kittens" / "a.jpg")
    touch_jpeg(photos / "b.jpg")
    touch_jpeg(photos / "z.jpg")
    (photos / ".cache").mkdir()
    touch_jpeg(photos / ".cache" / "thumb.jpg")
    found = items(str(photos) + "/", recursive=True)
    assert rels(found, "photos") == ["b.jpg", "cats/kittens/a.jpg", "cats/tom.jpg", "z.jpg"]
    assert found[2].path == str(photos) + "/cats/tom.jpg"


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    touch_jpeg(tmp_path / "dir.jpg" / "inner.jpg")
    touch_jpeg(tmp_path / "top.jpg")
    assert rels(items(str(tmp_path))) == ["top.jpg"]  # not recursive: the folder is skipped
    assert rels(items(str(tmp_path), recursive=True)) == ["dir.jpg/inner.jpg", "top.jpg"]
    assert rels(items(str(tmp_path / "dir.jpg"))) == ["dir.jpg/inner.jpg"]  # named: scanned as a folder
    listed = items("-", stdin=io.BytesIO(os.fsencode(tmp_path / "dir.jpg") + b"\n"))
    assert reasons(listed) == {rels(listed)[0]: Reason.IS_DIRECTORY}
    assert load_error(tmp_path / "dir.jpg").reason == Reason.IS_DIRECTORY


def test_scan_is_lazy_generator(tmp_path: Path) -> None:
    for i in range(5):
        touch_jpeg(tmp_path / f"{i}.jpg")
    found = iter_inputs([str(tmp_path)])
    assert next(found).rel == "0.jpg"
    touch_jpeg(tmp_path / "late.jpg")  # one listing per folder, taken when the folder is reached
    assert [item.rel for item in found] == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]


# -- discovery: naming ------------------------------------------------------------------------


def test_explicit_file_any_extension_and_its_path(tmp_path: Path) -> None:
    tom = touch_jpeg(tmp_path / "a" / "b" / "tom.jpg")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image, but named explicitly")
    found = items(str(tom), "notes.txt")
    assert [(i.path, i.rel, i.source, i.error) for i in found] == [
        (str(tom), "a/b/tom.jpg", "a/b/tom.jpg", None),
        ("notes.txt", "notes.txt", "notes.txt", None),
    ]


def test_output_names_follow_the_path_whatever_the_order(tmp_path: Path) -> None:
    one = touch_jpeg(tmp_path / "one" / "tom.jpg")
    two = touch_jpeg(tmp_path / "two" / "tom.jpg")
    three = touch_jpeg(tmp_path / "three" / "Tom.jpg")
    touch_jpeg(tmp_path / "f1" / "cats" / "x.jpg")
    touch_jpeg(tmp_path / "f2" / "cats" / "x.jpg")
    found = items(str(one), str(two), str(three), str(tmp_path / "f1"), str(tmp_path / "f2"), recursive=True)
    expected = ["one/tom.jpg", "two/tom.jpg", "three/Tom.jpg", "f1/cats/x.jpg", "f2/cats/x.jpg"]
    assert rels(found) == expected
    # the other order gives every input the same name
    found = items(str(tmp_path / "f2"), str(tmp_path / "f1"), str(three), str(two), str(one), recursive=True)
    assert rels(found) == expected[::-1]


def test_suffixed_names_are_short_and_depend_on_the_input_alone() -> None:
    from vitattn.discovery import suffixed

    a = suffixed("photos/cat.jpg", "/abs/photos/cat.jpg")
    assert a == suffixed("photos/cat.jpg", "/abs/photos/cat.jpg") and a.startswith("photos/cat.jpg~")
    assert a != suffixed("photos/cat.jpg", "photos/cat.jpg")
    long = "é" * 127 + ".png"  # 258 bytes is over the limit with the suffix
    name = suffixed(f"d/{long}", "x").rpartition("/")[2]
    assert len(os.fsencode(name)) <= 255 and name.startswith("é" * 100) and "~" in name
    name.encode("utf-8")  # cut on a character boundary


def test_stdin_rel_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    touch_jpeg(work / "a" / "x.jpg")
    (work / "a" / "b").mkdir()
    touch_jpeg(tmp_path / "up.jpg")
    absolute = touch_jpeg(tmp_path / "abs" / "y.jpg")
    monkeypatch.chdir(work)
    listing = f"./a/x.jpg\n../up.jpg\n{absolute}\na//./b/../x.jpg\n".encode()
    found = items("-", stdin=io.BytesIO(listing))
    # outside the current folder: the absolute path without its leading slash (tar's rule)
    up = str(tmp_path / "up.jpg")
    assert rels(found) == ["a/x.jpg", up.lstrip("/"), str(absolute).lstrip("/"), "a/x.jpg"]
    assert [i.source for i in found] == ["a/x.jpg", up, str(absolute), "a/x.jpg"]
    assert found[0].path == "./a/x.jpg"  # the path as given
    assert found[3].duplicate_of == "./a/x.jpg"  # a//./b/../x.jpg is the same file
    assert all(item.error is None for item in found)
    for item in found:
        assert not item.rel.startswith("/") and ".." not in item.rel.split("/")
    missing = items("-", stdin=io.BytesIO(b"/\n.\n..\n"))
    assert all(item.rel not in ("", ".", "..") for item in missing)


def test_stdin_newline_and_nul_modes(tmp_path: Path) -> None:
    a = touch_jpeg(tmp_path / "a.jpg")
    odd = touch_jpeg(tmp_path / "line\nbreak.jpg")
    spaced = touch_jpeg(tmp_path / " spaced .jpg")
    newline = os.fsencode(a) + b"\r\n\n\n" + os.fsencode(spaced) + b"\n"
    assert [i.path for i in items("-", stdin=io.BytesIO(newline))] == [str(a), str(spaced)]
    nul = b"\0".join([os.fsencode(a), b"", os.fsencode(odd), os.fsencode(spaced)])
    found = items("-", null_separated=True, stdin=io.BytesIO(nul))
    assert [i.path for i in found] == [str(a), str(odd), str(spaced)]
    assert all(item.error is None for item in found)


class TrickleStream(io.RawIOBase):
    """Hands out one entry per read and records how far it was read."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        if self.reads >= len(self.chunks):
            return b""
        self.reads += 1
        return self.chunks[self.reads - 1]


def test_stdin_is_read_incrementally(tmp_path: Path) -> None:
    paths = [touch_jpeg(tmp_path / f"{i}.jpg") for i in range(3)]
    stream = TrickleStream([os.fsencode(p) + b"\n" for p in paths])
    found = iter_inputs(["-"], stdin=stream)  # type: ignore[arg-type]
    assert next(found).path == str(paths[0])
    assert stream.reads == 1
    assert [i.path for i in found] == [str(p) for p in paths[1:]]


def test_stdin_pipe_yields_before_writer_finishes(tmp_path: Path) -> None:
    first = touch_jpeg(tmp_path / "first.jpg")
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb") as writer:
        writer.write(os.fsencode(first) + b"\n" + os.fsencode(tmp_path / "partial"))
        writer.flush()
        found = iter_inputs(["-"], stdin=reader)
        item = in_thread(lambda: next(found))  # would block if the whole stream were read first
        assert item.path == str(first)
        writer.write(b".jpg\n")
        writer.close()
        assert [i.rel for i in found] == ["partial.jpg"]  # inside the current folder: relative to it


# -- discovery: errors ------------------------------------------------------------------------


def test_discovery_errors_never_raise(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop1.jpg").symlink_to(tmp_path / "loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to(tmp_path / "loop1.jpg")
    os.mkfifo(tmp_path / "fifo.png")
    sources = [str(tmp_path / n) for n in ["missing.jpg", "dangling.jpg", "loop1.jpg", "fifo.png"]]
    found = in_thread(lambda: items(*sources))
    assert reasons(found) == {
        "missing.jpg": Reason.NO_SUCH_FILE,
        "dangling.jpg": Reason.NO_SUCH_FILE,
        "loop1.jpg": Reason.SYMLINK_LOOP,
        "fifo.png": Reason.NOT_REGULAR,
    }
    assert [item.error.path for item in found if item.error] == sources  # paths exactly as given
    # the same problems inside a folder scan (with an image extension) are reported too
    scanned = in_thread(lambda: items(str(tmp_path)))
    assert reasons(scanned) == {
        "dangling.jpg": Reason.NO_SUCH_FILE,
        "fifo.png": Reason.NOT_REGULAR,
        "loop1.jpg": Reason.SYMLINK_LOOP,
        "loop2.jpg": Reason.SYMLINK_LOOP,
    }
    listed = items("-", stdin=io.BytesIO(b"\n".join(os.fsencode(s) for s in sources)))
    assert [item.error.reason for item in listed if item.error] == list(reasons(found).values())
    # a NUL byte cannot be in a file name (newline-separated lists can still carry one)
    nul = items("bad\0name.jpg", "-", stdin=io.BytesIO(b"x\0y.jpg\n"))
    assert [(i.rel, i.error.reason if i.error else None) for i in nul] == [
        ("bad_name.jpg", Reason.NO_SUCH_FILE),
        ("x_y.jpg", Reason.NO_SUCH_FILE),
    ]
    assert load_error("bad\0name.jpg").reason == Reason.NO_SUCH_FILE


def test_directory_symlink_loop_reported_once(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    touch_jpeg(photos / "a.jpg")
    touch_jpeg(photos / "sub" / "b.jpg")
    (photos / "sub" / "up").symlink_to(photos)  # loop back to an ancestor
    (photos / "sub" / "self").symlink_to(photos / "sub")
    (photos / "alias").symlink_to(photos / "sub")  # not a loop: a second way to reach sub/
    found = items(str(photos), recursive=True)
    assert reasons(found, "photos") == {
        "a.jpg": None,
        "alias/b.jpg": None,
        "alias/self": Reason.SYMLINK_LOOP,
        "alias/up": Reason.SYMLINK_LOOP,
    }
    assert found[2].path == os.path.join(str(photos), "alias", "self")
    assert len(found) == 4  # sub/ was reached through alias/ first and is not scanned again


def test_unreadable_subfolder_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch_jpeg(tmp_path / "ok" / "a.jpg")
    touch_jpeg(tmp_path / "secret" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert reasons(items(str(tmp_path), recursive=True)) == {"ok/a.jpg": None, "secret": Reason.PERMISSION}
    assert reasons(items(str(tmp_path / "secret"))) == {"secret": Reason.PERMISSION}


@pytest.mark.subprocess
def test_unreadable_subfolder_for_real(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if ran_without_dac_override(request, tmp_path):
        return
    touch_jpeg(tmp_path / "secret" / "b.jpg")
    (tmp_path / "secret").chmod(0)
    try:
        assert reasons(items(str(tmp_path), recursive=True)) == {"secret": Reason.PERMISSION}
    finally:
        (tmp_path / "secret").chmod(0o755)


@pytest.mark.subprocess
def test_unreadable_file(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if ran_without_dac_override(request, tmp_path):
        return
    path = touch_jpeg(tmp_path / "secret.jpg")
    path.chmod(0)
    assert items(str(path))[0].error is None  # found; the load reports it
    assert load_error(path).reason == Reason.PERMISSION


def test_exclude_output_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    touch_jpeg(photos / "a.jpg")
    out = photos / "out"
    inside = touch_jpeg(out / "a.jpg" / "overlay.jpg")
    (tmp_path / "out-link").symlink_to(out)
    (photos / "also-out").symlink_to(out)  # the output folder met again during the scan, by another path
    for exclude in ([str(out)], [out], [str(tmp_path / "out-link")]):
        assert rels(items(str(photos), recursive=True, exclude=exclude), "photos") == ["a.jpg"]
        # named or listed inside it: reported, not dropped
        named = items(str(inside), str(out), exclude=exclude)
        assert [(i.path, i.error.reason if i.error else None) for i in named] == [
            (str(inside), Reason.INSIDE_OUTPUT),
            (str(out), Reason.INSIDE_OUTPUT),
        ]
        listed = items("-", stdin=io.BytesIO(os.fsencode(inside)), exclude=exclude)
        assert [i.error.reason if i.error else None for i in listed] == [Reason.INSIDE_OUTPUT]
    assert rels(items(str(photos), recursive=True), "photos") == ["a.jpg", "also-out/a.jpg/overlay.jpg"]


def test_the_same_file_again_is_reported_as_a_duplicate(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    a = touch_jpeg(photos / "a.jpg")
    (tmp_path / "link.jpg").symlink_to(a)
    (tmp_path / "photos-link").symlink_to(photos)
    found = items(
        str(a),
        str(tmp_path / "link.jpg"),
        str(photos),
        str(tmp_path / "photos-link"),
        f"{photos}/../photos/a.jpg",
    )
    # photos/ and photos-link/ are one folder, scanned once; every other way to the file is a duplicate
    assert [(i.path, i.rel, i.duplicate_of) for i in found] == [
        (str(a), "photos/a.jpg", None),
        (str(tmp_path / "link.jpg"), "link.jpg", str(a)),
        (str(a), "photos/a.jpg", str(a)),
        (f"{photos}/../photos/a.jpg", "photos/a.jpg", str(a)),
    ]
    listed = items(str(a), "-", stdin=io.BytesIO(os.fsencode(a) + b"\n" + os.fsencode(a)))
    assert [i.duplicate_of for i in listed] == [None, str(a), str(a)]


def test_tricky_names(tmp_path: Path) -> None:
    data = corpus.encode(corpus.rgb_picture(), "PNG")
    names = [b"with space.png", "café ☕.png".encode(), b"-leading.png", b"caf\xe9-latin1.png"]
    paths = [corpus.write(tmp_path, name, data) for name in names]
    found = items(str(tmp_path))
    assert sorted(os.fsencode(i.rel) for i in found) == sorted(names)
    for item in found:
        assert os.fsencode(item.path) in {os.fsencode(p) for p in paths}
        assert np.array_equal(pixels(Path(item.path)), corpus.PIXELS)
    bad = next(i for i in found if b"\xe9-latin1" in os.fsencode(i.rel))
    assert "\udce9" in bad.rel  # surrogate escape survives
    listed = items("-", stdin=io.BytesIO(os.fsencode(paths[3])))
    assert listed[0].path == os.fsdecode(os.fsencode(paths[3]))
    assert load_image("./" + os.path.relpath(paths[2])).format == "PNG"


# -- loading: formats and failures ------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(corpus.LOSSLESS_FORMATS))
def test_lossless_formats_exact(tmp_path: Path, ext: str) -> None:
    path = corpus.lossless(tmp_path, ext)
    loaded = load_image(str(path))
    assert loaded.format == corpus.LOSSLESS_FORMATS[ext]
    assert loaded.warnings == []
    assert np.array_equal(np.asarray(loaded.image), corpus.PIXELS)


def test_jpeg_and_gif(tmp_path: Path) -> None:
    jpeg = corpus.write(tmp_path, "flat.jpg", corpus.flat_jpeg((16, 8), (90, 160, 220)))
    loaded = load_image(str(jpeg))
    assert loaded.format == "JPEG" and loaded.image.size == (16, 8)
    assert np.abs(np.asarray(loaded.image).astype(int) - (90, 160, 220)).max() <= 3
    gif = save(Image.fromarray(corpus.PIXELS).quantize(8), tmp_path / "p.gif")
    assert np.array_equal(pixels(gif), corpus.PIXELS)


def test_png_named_jpg_loads(tmp_path: Path) -> None:
    path = corpus.write(tmp_path, "really-png.jpg", corpus.encode(corpus.rgb_picture(), "PNG"))
    loaded = load_image(str(path))
    assert loaded.format == "PNG"
    assert np.array_equal(np.asarray(loaded.image), corpus.PIXELS)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.png", b"", Reason.EMPTY_FILE),
        ("text.jpg", b"just some text, not a picture\n", Reason.NOT_AN_IMAGE),
        ("truncated.jpg", corpus.truncated(corpus.noisy_jpeg()), Reason.TRUNCATED),
        ("truncated.png", corpus.truncated(corpus.noisy_png()), Reason.TRUNCATED),
        ("crc.png", corpus.bad_crc_png(), Reason.CORRUPT),
        ("bad-zlib.png", corpus.bad_zlib_png(), Reason.CORRUPT),
        ("header-only.png", corpus.noisy_png()[:30], Reason.CORRUPT),
        ("bomb.png", corpus.bomb_png(20_000, 20_000), Reason.TOO_LARGE),  # > 2x Pillow's limit
        ("bomb-warning.png", corpus.bomb_png(10_000, 10_000), Reason.TOO_LARGE),  # Pillow only warns
        ("doc.png", corpus.PDF, Reason.UNSUPPORTED_FORMAT),
    ],
)
def test_load_failures(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    path = corpus.write(tmp_path, name, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks as a warning either
        error = load_error(path)
    assert (error.reason, error.path) == (reason, str(path))


def test_eps_refused_without_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def forbidden(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise KeyboardInterrupt  # escapes every handler: the test fails loudly if reached

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, forbidden)
    path = corpus.write(tmp_path, "drawing.png", corpus.EPS)
    error = load_error(path)
    assert (error.reason, error.detail) == (Reason.UNSUPPORTED_FORMAT, "EPS")
    assert calls == []


def test_too_large_detail_and_limits(tmp_path: Path) -> None:
    path = corpus.lossless(tmp_path, "png")  # 4x2
    error = load_error(path, max_pixels=7)
    assert error.reason == Reason.TOO_LARGE
    assert error.detail == "4×2 = 8 pixels, limit 7; raise it with --max-pixels"
    assert load_image(str(path), max_pixels=8).image.size == (4, 2)
    big = corpus.write(tmp_path, "big.png", corpus.bomb_png(10_000, 10_000))
    assert load_error(big).detail == "100000000 pixels, limit 89478485; raise it with --max-pixels"
    # lifting the limit gets past the size check (and then finds the data missing)
    assert load_error(big, max_pixels=None).reason == Reason.TRUNCATED
    assert load_error(big, max_pixels=150_000_000).reason == Reason.TRUNCATED
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # Pillow's global is restored


def test_special_files(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert in_thread(lambda: load_error(fifo)).reason == Reason.NOT_REGULAR
    assert load_error(tmp_path / "missing.png").reason == Reason.NO_SUCH_FILE
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nothing.png")
    assert load_error(tmp_path / "dangling.png").reason == Reason.NO_SUCH_FILE
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    assert load_error(tmp_path / "loop.png").reason == Reason.SYMLINK_LOOP
    given = f"{tmp_path}/./sub/../missing.png"
    assert load_error(given).path == given
    if os.path.exists("/dev/null"):
        assert load_error("/dev/null").reason == Reason.NOT_REGULAR


@pytest.mark.parametrize(
    "exc",
    [
        struct.error("bad struct"),
        ValueError("bad value"),
        SyntaxError("bad syntax"),
        IndexError("i"),
        OSError("x"),
    ],
)
def test_unexpected_pillow_errors_become_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    path = corpus.lossless(tmp_path, "png")

    def broken_load(self: Image.Image) -> None:
        raise exc

    monkeypatch.setattr(Image.Image, "load", broken_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", broken_load)
    error = load_error(path)
    assert error.reason == Reason.CORRUPT and error.detail


@pytest.mark.parametrize("exc", [MemoryError, KeyboardInterrupt, SystemExit])
def test_fatal_errors_are_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]
) -> None:
    path = corpus.lossless(tmp_path, "png")

    def boom(self: Image.Image) -> None:
        raise exc

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", boom)
    with pytest.raises(exc):
        load_image(str(path))


# -- loading: frames, orientation, metadata ---------------------------------------------------


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    path = corpus.write(tmp_path, "anim.gif", corpus.animated_gif(12))
    loaded = load_image(str(path))
    assert loaded.warnings == ["multi-frame file: using the first of 12 frames"]
    assert np.all(np.asarray(loaded.image) == (255, 0, 0))


def test_multipage_tiff_first_page(tmp_path: Path) -> None:
    loaded = load_image(str(corpus.write(tmp_path, "pages.tiff", corpus.multipage_tiff(3))))
    assert loaded.warnings == ["multi-frame file: using the first of 3 frames"]
    assert np.all(np.asarray(loaded.image) == 40)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = corpus.write(tmp_path, "rotated.jpg", corpus.exif_rotated_jpeg(6))
    loaded = load_image(str(path))
    assert loaded.image.size == (20, 32)
    data = np.asarray(loaded.image).astype(int)
    # stored top-left corner, rotated 90° clockwise for display, is now top-right
    assert np.abs(data[1:7, 13:19] - (255, 0, 0)).max() < 40
    assert np.abs(data[1:7, 1:7] - 255).max() < 40
    assert np.abs(data[25:31, 13:19] - 255).max() < 40


def test_draft_decodes_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    plain = corpus.write(tmp_path, "plain.jpg", corpus.flat_jpeg((800, 600)))
    assert load_image(str(plain), min_size=(100, 100)).image.size == (200, 150)  # 1/4 scale
    assert load_image(str(plain), min_size=(300, 300)).image.size == (400, 300)  # 1/2 scale
    assert load_image(str(plain), min_size=(900, 10)).image.size == (800, 600)  # no smaller scale fits
    assert load_image(str(plain)).image.size == (800, 600)
    # orientation 6: stored 1600x1000, upright 1000x1600; the draft request is swapped
    image = Image.new("RGB", (1600, 1000), (30, 60, 90))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = save(image, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert load_image(str(rotated), min_size=(200, 300)).image.size == (250, 400)
    # the long side also bounds the scale: short side >= 100 alone allows 1/8 (125x200), long side >= 300 not
    assert load_image(str(rotated), min_size=(100, 100), min_long_side=300).image.size == (250, 400)
    assert load_image(str(rotated), min_size=(100, 100), min_long_side=201).image.size == (250, 400)
    assert load_image(str(rotated), min_size=(100, 100), min_long_side=200).image.size == (125, 200)
    assert load_image(str(plain), min_size=(100, 100), min_long_side=401).image.size == (800, 600)
    png = corpus.lossless(tmp_path, "png")
    assert load_image(str(png), min_size=(1, 1)).image.size == (4, 2)  # only JPEG is drafted


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage, not TIFF",
        b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 10,
        b"II\x2a\x00\xff\xff\x00\x00",
    ],
)
def test_bad_exif_is_a_warning(tmp_path: Path, payload: bytes) -> None:
    path = corpus.write(tmp_path, "bad-exif.jpg", corpus.jpeg_with_exif_payload(payload))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_image(str(path))
    assert loaded.image.size == (16, 16)
    if loaded.warnings:
        assert loaded.warnings == ["bad EXIF data ignored"]


def test_bad_exif_warning_reported(tmp_path: Path) -> None:
    payload = b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 10
    loaded = load_image(str(corpus.write(tmp_path, "bad.jpg", corpus.jpeg_with_exif_payload(payload))))
    assert loaded.warnings == ["bad EXIF data ignored"]


def test_concurrent_loads_keep_global_state(tmp_path: Path) -> None:
    payload = b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 10
    bad_exif = corpus.write(tmp_path, "bad.jpg", corpus.jpeg_with_exif_payload(payload))
    good = corpus.lossless(tmp_path, "png")
    big = corpus.write(tmp_path, "big.png", corpus.bomb_png(10_000, 1_000))
    filters, show = list(warnings.filters), warnings.showwarning

    def one(index: int) -> str:
        kind = index % 4
        if kind == 0:
            return ",".join(load_image(str(bad_exif)).warnings)
        if kind == 1:
            return str(load_image(str(good)).image.size)
        if kind == 2:
            return str(load_image(str(good), max_pixels=None).image.size)  # lifts Pillow's limit
        return load_error(big, max_pixels=7).reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(80)))
    assert results == ["bad EXIF data ignored", "(4, 2)", "(4, 2)", Reason.TOO_LARGE] * 20
    assert list(warnings.filters) == filters and warnings.showwarning is show
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS


def test_colour_profile_warning(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    picture = corpus.rgb_picture()
    assert load_image(str(save(picture, tmp_path / "srgb.png", icc_profile=srgb))).warnings == []
    loaded = load_image(str(save(picture, tmp_path / "other.png", icc_profile=lab)))
    assert loaded.warnings == ["colour profile ignored"]
    assert np.array_equal(np.asarray(loaded.image), corpus.PIXELS)


# -- loading: conversion to RGB, checked numerically ------------------------------------------


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing with exact rounding."""
    colour = colour.astype(np.int64)
    alpha = alpha.astype(np.int64)[..., None]
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    rgba = np.array(
        [[[255, 0, 0, 255], [255, 0, 0, 0], [255, 0, 0, 128], [0, 0, 255, 64], [10, 200, 30, 1]]],
        dtype=np.uint8,
    )
    path = save(Image.fromarray(rgba), tmp_path / "rgba.png")
    result = pixels(path)
    assert result[0, 0].tolist() == [255, 0, 0]
    assert result[0, 1].tolist() == [255, 255, 255]  # fully transparent: the hidden red never shows
    assert result[0, 2].tolist() == [255, 127, 127]
    assert np.array_equal(result, over_white(rgba[..., :3], rgba[..., 3]))
    webp = save(Image.fromarray(rgba), tmp_path / "rgba.webp", lossless=True, exact=True)
    assert np.array_equal(pixels(webp), over_white(rgba[..., :3], rgba[..., 3]))


def test_la_composited(tmp_path: Path) -> None:
    la = np.array([[[0, 255], [0, 0], [100, 128], [200, 51]]], dtype=np.uint8)
    path = save(Image.fromarray(la, "LA"), tmp_path / "la.png")
    grey = np.repeat(la[..., :1], 3, axis=2)
    assert np.array_equal(pixels(path), over_white(grey, la[..., 1]))
    assert pixels(path)[0, :2].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_palette_transparency(tmp_path: Path) -> None:
    # PNG palette with per-entry alpha (tRNS): index 0 red @128, index 1 green @0, index 2 blue opaque
    image = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    path = save(image, tmp_path / "p.png", transparency=bytes([128, 0, 255]))
    assert mode_of(path) == "P"
    assert pixels(path).tolist() == [[[255, 127, 127], [255, 255, 255], [0, 0, 255]]]
    # GIF: one transparent index
    gif = save(image, tmp_path / "p.gif", transparency=1)
    assert pixels(gif).tolist() == [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]]


def test_colour_key_transparency(tmp_path: Path) -> None:
    grey = Image.fromarray(np.array([[0, 200, 90]], dtype=np.uint8))
    path = save(grey, tmp_path / "l-key.png", transparency=200)
    assert pixels(path).tolist() == [[[0, 0, 0], [255, 255, 255], [90, 90, 90]]]
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8))
    path = save(rgb, tmp_path / "rgb-key.png", transparency=(1, 2, 3))
    assert pixels(path).tolist() == [[[255, 255, 255], [4, 5, 6]]]


def test_greyscale_and_one_bit(tmp_path: Path) -> None:
    grey = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    path = save(Image.fromarray(grey), tmp_path / "l.png")
    assert np.array_equal(pixels(path), np.repeat(grey[..., None], 3, axis=2))
    one = Image.fromarray(np.array([[True, False, True]]))
    for ext in ("png", "bmp", "tiff"):
        assert pixels(save(one, tmp_path / f"one.{ext}")).tolist() == [[[255] * 3, [0] * 3, [255] * 3]]


def test_sixteen_bit_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535, 1000]], dtype=np.uint16)
    expected = [0, 1, 128, 255, 4]  # round(v * 255 / 65535)
    png = save(Image.fromarray(values), tmp_path / "i16.png")
    assert mode_of(png) == "I;16"
    assert pixels(png)[..., 0].tolist() == [expected]
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())  # convert() would clip
    tiff_be = save(big_endian, tmp_path / "i16b.tiff")
    assert mode_of(tiff_be) == "I;16B"
    assert pixels(tiff_be)[..., 0].tolist() == [expected]
    as_int = save(Image.fromarray(values.astype(np.int32)), tmp_path / "i32.tiff")
    assert mode_of(as_int) == "I"
    loaded = load_image(str(as_int))
    assert np.asarray(loaded.image)[..., 0].tolist() == [expected] and loaded.warnings == []
    out_of_range = save(Image.fromarray(np.array([[-10, 0, 90]], dtype=np.int32)), tmp_path / "wide.tiff")
    loaded = load_image(str(out_of_range))
    assert np.asarray(loaded.image)[..., 0].tolist() == [[0, 26, 255]]  # min-max
    assert loaded.warnings and "min-max" in loaded.warnings[0]


def test_float_images(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    loaded = load_image(str(save(Image.fromarray(unit), tmp_path / "unit.tiff")))
    assert np.asarray(loaded.image)[..., 0].tolist() == [[0, 64, 128, 255]] and loaded.warnings == []
    wide = np.array([[-1.0, 0.0, 1.0, 3.0]], dtype=np.float32)
    loaded = load_image(str(save(Image.fromarray(wide), tmp_path / "wide.tiff")))
    assert np.asarray(loaded.image)[..., 0].tolist() == [[0, 64, 128, 255]]
    assert len(loaded.warnings) == 1 and "min-max" in loaded.warnings[0]
    for bad in (np.nan, np.inf, -np.inf):
        data = np.array([[0.0, bad, 0.5]], dtype=np.float32)
        path = save(Image.fromarray(data), tmp_path / "bad.tiff")
        assert load_error(path).reason == Reason.NAN_PIXELS


def test_cmyk(tmp_path: Path) -> None:
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 128], [128, 0, 0, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    path = save(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.tiff")
    assert pixels(path).tolist() == [[[0, 255, 255], [127, 127, 127], [63, 127, 127], [255, 255, 255]]]
    jpeg = save(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(pixels(jpeg).astype(int) - (255, 0, 255)).max() <= 4


def test_loaded_image_is_independent(tmp_path: Path) -> None:
    loaded = load_image(str(corpus.lossless(tmp_path, "png")))
    assert type(loaded.image) is Image.Image  # not tied to a (closed) file
    assert loaded.image.copy().getpixel((0, 0)) == (255, 0, 0)


@pytest.fixture(autouse=True)
def _pillow_limit_untouched() -> Iterator[None]:
    yield
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS
