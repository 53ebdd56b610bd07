"""Batch runs that never lose work (issue 3), end to end through the CLI.

Whatever is in the folder, a run finishes, reports every problem in one line, keeps every good result, and is
safe to run again. Inputs come from ``tests/corpus.py``; the model is timm's random-weight ``test_vit``
(6 blocks, 2 heads, 10x10 grid at 160 px). Subprocesses are used where the real process matters (signals,
pipes, encodings, special files); the rest runs in-process with Typer's ``CliRunner``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
import corpus
from conftest import result_folder

from vitattn.cli import app
from vitattn.errors import Reason, display_path
from vitattn.outputs import META, TMP_MARK

MODEL = ["-m", "test_vit", "--no-pretrained"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
STRICT_ENV = {**ENV, "LC_ALL": "C", "PYTHONIOENCODING": "ascii:strict"}
SUMMARY = re.compile(r"processed (\d+), skipped (\d+), failed (\d+) \(of (\d+)\)")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NAN_TIFF = corpus.encode(Image.fromarray(np.array([[0.0, np.nan, 0.5]], dtype=np.float32)), "TIFF")


# -- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in ``tmp_path`` (CLI processes inherit it): inputs there map to ``OUT/<name>``."""
    monkeypatch.chdir(tmp_path)


def folders(out: Path, paths: list[str]) -> set[str]:
    """The result folders of ``paths`` below ``out``, by the documented rule (see conftest.result_folder)."""
    return {result_folder(out, p).relative_to(out).as_posix() for p in paths}


def invoke(args: list[str], stdin: bytes | None = None) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(app, ["heatmap", *args], input=stdin)
    return result.exit_code, result.stdout_bytes, result.stderr


# As root, CLI processes run without the capabilities that bypass file permissions, so unreadable files and
# folders are tested for real rather than skipped.
_DAC_CAPS = "-dac_override,-dac_read_search"
DROP_DAC = ["setpriv", f"--bounding-set={_DAC_CAPS}", f"--inh-caps={_DAC_CAPS}"] if IS_ROOT else []


def command(*args: str | bytes) -> list[str | bytes]:
    return [*DROP_DAC, sys.executable, "-m", "vitattn", "heatmap", *args]


def summary(stderr: str) -> tuple[int, int, int, int]:
    """The counts of the summary line, which must be the last line on stderr."""
    last = stderr.rstrip("\n").splitlines()[-1]
    found = SUMMARY.fullmatch(last)
    assert found, f"the last stderr line is not the summary: {last!r}"
    processed, skipped, failed, total = map(int, found.groups())
    assert processed + skipped + failed == total
    return processed, skipped, failed, total


def lines(stderr: str, kind: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"vitattn: {kind}: ")]


def assert_errors(stderr: str, expected: dict[str, str]) -> None:
    """Exactly one ``vitattn: error: <path>: <reason>[ (detail)]`` line per failed input, and no other."""
    got = lines(stderr, "error")
    for path, reason in expected.items():
        shown = display_path(path).encode("ascii", "backslashreplace").decode()
        line = re.compile(rf"vitattn: error: {re.escape(shown)}: {re.escape(reason)}( \(.+\))?")
        assert sum(1 for g in got if line.fullmatch(g)) == 1, (path, reason, got)
    assert len(got) == len(expected), got
    assert "Traceback" not in stderr


def complete_results(out: Path) -> set[str]:
    """Assert the tree holds only complete results and no temporary files; return the results' folders.

    Complete: the folder has meta.json and exactly the files it lists.
    """
    done = set()
    for folder, _, files in os.walk(out):
        assert not [f for f in files if TMP_MARK in f], f"temporary files left in {folder}: {files}"
        files = [f for f in files if f != ".vitattn.lock"]  # the writers' lock stays
        if not files:
            continue
        assert META in files, f"incomplete result in {folder}: {files}"
        meta = json.loads(Path(folder, META).read_bytes())
        assert sorted(files) == sorted(meta["files"]), folder
        done.add(Path(folder).relative_to(out).as_posix())
    return done


def mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every readable regular file under ``root``."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.access(path, os.R_OK):
                found[path] = (Path(path).read_bytes(), os.stat(path).st_mtime_ns)
    return found


def noisy(path: Path, size: tuple[int, int] = (48, 32), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = corpus.noisy_png(size, seed) if path.suffix == ".png" else corpus.noisy_jpeg(size, seed)
    path.write_bytes(data)
    return path


def records(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode("ascii").splitlines()]


# -- the generated corpus ---------------------------------------------------------------------------


class Corpus:
    """A folder of good, odd and broken inputs, and what a run must say about each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.good: list[str] = []  # relative names
        self.warned: dict[str, str] = {}  # relative name -> warning
        self.bad: dict[str, str] = {}  # relative name -> reason

    def path(self, rel: str) -> str:
        return os.fsdecode(os.path.join(os.fsencode(self.root), os.fsencode(rel)))


def build_corpus(root: Path) -> Corpus:
    c = Corpus(root)
    root.mkdir()
    for ext in corpus.LOSSLESS_FORMATS:
        c.good.append(corpus.lossless(root, ext).name)
    png = corpus.encode(corpus.rgb_picture(), "PNG")
    good = {
        "noisy.jpg": corpus.noisy_jpeg(),
        "really-png.jpg": png,
        "rotated.jpg": corpus.exif_rotated_jpeg(6),
        "with space.png": png,
        "café ☕.png": png,
        "-leading.png": png,
        "sub/deep.png": corpus.noisy_png(seed=1),
        "album.jpg/inner.png": png,  # a folder named like an image
    }
    (root / "sub").mkdir()
    (root / "album.jpg").mkdir()
    for name, data in good.items():
        corpus.write(root, name, data)
        c.good.append(name)
    corpus.write(root, b"caf\xe9-latin1.png", png)  # not UTF-8
    c.good.append(os.fsdecode(b"caf\xe9-latin1.png"))
    corpus.write(root, "anim.gif", corpus.animated_gif(3))
    c.warned["anim.gif"] = "multi-frame file: using the first of 3 frames"
    payload = b"MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x00" * 10
    corpus.write(root, "bad-exif.jpg", corpus.jpeg_with_exif_payload(payload))
    c.warned["bad-exif.jpg"] = "bad EXIF data ignored"
    bad = {
        "empty.png": (b"", Reason.EMPTY_FILE),
        "text.jpg": (b"just some text\n", Reason.NOT_AN_IMAGE),
        "truncated.jpg": (corpus.truncated(corpus.noisy_jpeg()), Reason.TRUNCATED),
        "truncated.png": (corpus.truncated(corpus.noisy_png()), Reason.TRUNCATED),
        "crc.png": (corpus.bad_crc_png(), Reason.CORRUPT),
        "bad-zlib.png": (corpus.bad_zlib_png(), Reason.CORRUPT),
        "bomb.png": (corpus.bomb_png(20_000, 20_000), Reason.TOO_LARGE),
        "bomb-warning.png": (corpus.bomb_png(10_000, 10_000), Reason.TOO_LARGE),
        "strip.png": (corpus.encode(Image.new("RGB", (1, 4000)), "PNG"), Reason.TOO_LARGE),  # huge once resized
        "doc.png": (corpus.PDF, Reason.UNSUPPORTED_FORMAT),
        "drawing.png": (corpus.EPS, Reason.UNSUPPORTED_FORMAT),
        "nan.tiff": (NAN_TIFF, Reason.NAN_PIXELS),
    }
    for name, (data, reason) in bad.items():
        corpus.write(root, name, data)
        c.bad[name] = reason
    corpus.write(root, b"bad-\xff.png", b"not a picture")
    c.bad[os.fsdecode(b"bad-\xff.png")] = Reason.NOT_AN_IMAGE
    os.mkfifo(root / "fifo.png")
    c.bad["fifo.png"] = Reason.NOT_REGULAR
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    c.bad["dangling.jpg"] = Reason.NO_SUCH_FILE
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    c.bad["loop.jpg"] = Reason.SYMLINK_LOOP
    corpus.write(root, "locked.png", png).chmod(0)  # CLI processes run with permissions enforced (DROP_DAC)
    c.bad["locked.png"] = Reason.PERMISSION
    (root / "secret").mkdir()
    corpus.write(root / "secret", "hidden-away.png", png)
    (root / "secret").chmod(0)
    c.bad["secret"] = Reason.PERMISSION
    (root / "notes.txt").write_text("not an image, not picked up")
    (root / ".hidden.jpg").write_bytes(b"hidden, not picked up")
    return c


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    c = build_corpus(tmp_path_factory.mktemp("corpus") / "photos")
    yield c
    for locked in (c.root / "secret", c.root / "locked.png"):
        if locked.exists():
            locked.chmod(0o755)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small pictures."""
    root = tmp_path_factory.mktemp("many")
    for i in range(40):
        noisy(root / f"img{i:02d}.jpg", seed=i)
    return root


# -- 1, 2, 3, 5, 6, 8: a whole corpus folder, then the same paths as a -0 list ---------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_corpus_folder_run(corpus_dir: Corpus, tmp_path: Path) -> None:
    c = corpus_dir
    out = tmp_path / "out"
    outside_fifo = tmp_path / "named-fifo.png"
    os.mkfifo(outside_fifo)
    before = snapshot(c.root)
    # a real process, with a strict-encoding environment, a FIFO in the folder and one named: nothing blocks
    proc = subprocess.run(
        command(str(c.root), str(outside_fifo), "-r", "-o", str(out), *MODEL, "--batch-size", "4"),
        capture_output=True,
        env=STRICT_ENV,
        timeout=240,
    )
    stderr = proc.stderr.decode("ascii")  # every non-ASCII character was escaped, nothing crashed
    assert proc.returncode == 1, stderr
    assert_errors(stderr, {**{c.path(n): r for n, r in c.bad.items()}, str(outside_fifo): Reason.NOT_REGULAR})
    for name, warning in c.warned.items():
        assert f"vitattn: warning: {c.path(name)}: {warning}" in lines(stderr, "warning")
    good = sorted([*c.good, *c.warned])
    # stdout: one folder per good input, the names' bytes exactly as on disk
    assert sorted(proc.stdout.splitlines()) == sorted(os.fsencode(result_folder(out, c.path(n))) for n in good)
    assert complete_results(out) == folders(out, [c.path(n) for n in good])
    assert summary(stderr) == (len(good), 0, len(c.bad) + 1, len(good) + len(c.bad) + 1)
    assert snapshot(c.root) == before  # inputs only read
    meta = json.loads((result_folder(out, c.path("rotated.jpg")) / META).read_text())
    assert meta["image_size"] == [20, 32]  # stored 32x20 with EXIF orientation 6: upright size


@pytest.mark.subprocess
@pytest.mark.slow
def test_corpus_as_a_nul_separated_list(corpus_dir: Corpus, tmp_path: Path) -> None:
    c = corpus_dir
    names = sorted(n for n in [*c.good, *c.warned, *c.bad] if n != "secret")  # files only: the same paths
    stdin = b"".join(os.fsencode(c.path(n)) + b"\0" for n in names)
    out = tmp_path / "out"
    proc = subprocess.run(
        command("-0", "-", "--json", "-o", str(out), *MODEL, "--batch-size", "4"),
        input=stdin,
        capture_output=True,
        env=ENV,
        timeout=240,
    )
    code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "backslashreplace")
    assert code == 1, stderr
    expected_bad = {c.path(n): r for n, r in c.bad.items() if n != "secret"}
    assert_errors(stderr, expected_bad)
    recs = records(stdout)
    assert len(recs) == len(names)  # every input exactly once, in input order
    by_input = {r["input"]: r for r in recs}
    for name in names:
        path = c.path(name)
        record = by_input[display_path(path)]
        if path in expected_bad:
            assert record["status"] == "error" and record["error"].startswith(expected_bad[path])
        else:
            assert record["status"] == "ok" and Path(record["files"]["meta"]).is_file()
    assert len(complete_results(out)) == len(c.good) + len(c.warned)
    assert summary(stderr)[2] == len(expected_bad)


# -- 1: isolation and --fail-fast ----------------------------------------------------------------------


def test_each_stage_failure_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitattn.job
    import vitattn.store

    photos = [noisy(tmp_path / f"{n}.png", size=(40 + i, 30)) for i, n in enumerate("abcde")]
    real_forward, real_crop = vitattn.job.forward_batch, vitattn.job.crop_box
    calls = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the batch of b.png
            raise RuntimeError("CUDA out of memory (simulated)\nmore details")
        return real_forward(*args, **kwargs)

    real_write = vitattn.store.ResultFolder.write

    def write(self: Any, name: str, fn: Any) -> int:
        if self.path.name == "c.png" and name.endswith(".png"):
            raise ValueError("encoder exploded")
        return real_write(self, name, fn)

    def crop(transform: Any, size: tuple[int, int]) -> Any:
        if size == (43, 30):  # d.png
            raise ValueError("odd geometry")
        return real_crop(transform, size)

    monkeypatch.setattr(vitattn.job, "forward_batch", forward)
    monkeypatch.setattr(vitattn.store.ResultFolder, "write", write)
    monkeypatch.setattr(vitattn.job, "crop_box", crop)
    out = tmp_path / "out"
    code, stdout, stderr = invoke([*map(str, photos), "-o", str(out), *MODEL, "--batch-size", "1"])
    assert code == 1, stderr
    failed = {str(photos[1]): Reason.INFERENCE, str(photos[2]): Reason.WRITE, str(photos[3]): Reason.INFERENCE}
    assert_errors(stderr, failed)
    assert f"{photos[1]}: inference failed (CUDA out of memory (simulated))" in stderr
    assert f"{photos[2]}: could not write outputs (encoder exploded)" in stderr
    assert stdout.decode().split() == [str(out / "a.png"), str(out / "e.png")]
    assert complete_results(out) == {"a.png", "e.png"}  # the failed write left nothing behind
    assert summary(stderr) == (2, 0, 3, 5)


def test_fail_fast_stops_at_the_first_failure(tmp_path: Path) -> None:
    a, b, c = (noisy(tmp_path / f"{n}.png") for n in "abc")
    bad = corpus.write(tmp_path, "bad.png", b"not a picture")
    out = tmp_path / "out"
    inputs = [str(a), str(bad), str(b), str(c)]
    code, stdout, stderr = invoke([*inputs, "-o", str(out), *MODEL, "--fail-fast", "--batch-size", "1"])
    assert code == 1, stderr
    assert_errors(stderr, {str(bad): Reason.NOT_AN_IMAGE})
    assert stdout.decode().split() == [str(out / "a.png")]
    assert complete_results(out) == {"a.png"}  # the later inputs were not processed
    assert summary(stderr) == (1, 0, 1, 2)


# -- 4, 5: rerun, resume, overwrite, leftovers of a killed run -------------------------------------------


def test_rerun_skips_picture_settings_redraw_and_edits_need_overwrite(tmp_path: Path) -> None:
    a, b = noisy(tmp_path / "in" / "a.png"), noisy(tmp_path / "in" / "b.jpg", seed=1)
    out = tmp_path / "out"
    base = [str(a), str(b), "-o", str(out), *MODEL, "--json"]
    code, stdout, stderr = invoke([*base, "--npy"])
    assert code == 0 and [r["status"] for r in records(stdout)] == ["ok", "ok"], stderr
    first = mtimes(out)
    code, stdout, stderr = invoke([*base, "--npy"])  # a second run rewrites nothing
    assert code == 0 and [r["status"] for r in records(stdout)] == ["skipped", "skipped"]
    assert mtimes(out) == first and summary(stderr) == (0, 2, 0, 2)
    # an edited input: its result is not "done", and not replaced without --overwrite
    noisy(a, seed=9)
    os.utime(a, ns=(first[str(out / "in" / "a.png" / META)], first[str(out / "in" / "a.png" / META)] + 10**9))
    code, stdout, stderr = invoke([*base, "--npy"])
    assert code == 1
    assert_errors(stderr, {str(a): Reason.OUTPUTS_EXIST})
    assert [r.get("error") for r in records(stdout)] == [Reason.OUTPUTS_EXIST, None]
    assert mtimes(out) == first
    # picture settings only: redrawn in place, the array kept unless --npy is dropped
    code, stdout, stderr = invoke([*base, "--cmap", "viridis", "--overwrite"])
    assert code == 0 and [r["status"] for r in records(stdout)] == ["ok", "ok"], stderr
    assert complete_results(out) == {"in/a.png", "in/b.jpg"}
    meta = json.loads((out / "in" / "a.png" / META).read_text())
    assert meta["settings"]["cmap"] == "viridis" and not (out / "in" / "a.png" / "block5_attn.npy").exists()
    assert all(mtimes(out)[p] != t for p, t in first.items() if Path(p).exists() and not p.endswith(".lock"))


def test_leftovers_of_a_killed_run_are_cleaned_and_redone(tmp_path: Path) -> None:
    a, b = noisy(tmp_path / "a.png"), noisy(tmp_path / "b.png", seed=1)
    out = tmp_path / "out"
    args = [str(a), str(b), "-o", str(out), *MODEL, "--json"]
    assert invoke(args)[0] == 0
    # what SIGKILL can leave: a result without meta.json, a half-written file, temporary files
    folder = out / "a.png"
    (folder / META).unlink()
    (folder / "block5_head0.png").write_bytes(b"half")
    (folder / f".block5_head1.png{TMP_MARK}99999-0").write_bytes(b"partial")
    (folder / f".{META}{TMP_MARK}99999-1").write_bytes(b"{")
    code, stdout, stderr = invoke(args)
    assert code == 0, stderr
    assert [r["status"] for r in records(stdout)] == ["ok", "skipped"]
    assert complete_results(out) == {"a.png", "b.png"}
    with Image.open(folder / "block5_head0.png") as im:
        im.load()


def test_output_folder_inside_the_input_folder_is_never_scanned(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(2):
        noisy(photos / f"p{i}.jpg", seed=i)
    args = [str(photos), "-r", "-o", str(photos / "maps"), *MODEL]
    code, _, stderr = invoke(args)
    assert code == 0 and summary(stderr) == (2, 0, 0, 2)
    code, _, stderr = invoke(args)
    assert code == 0 and summary(stderr) == (0, 2, 0, 2)


def test_disk_full_aborts_and_keeps_earlier_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = [noisy(tmp_path / f"p{i}.png", seed=i) for i in range(6)]
    real_replace = os.replace
    lock = threading.Lock()
    done = [0]

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        with lock:
            done[0] += 1
            full = done[0] > 15  # 6 files per input (meta.json twice): two and a half results fit
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    code, stdout, stderr = invoke([*map(str, photos), "-o", str(out), *MODEL, "--batch-size", "1"])
    assert code == 3, stderr
    errors = lines(stderr, "error")
    assert len(errors) == 1 and errors[0].startswith("vitattn: error: cannot write ")
    assert errors[0].endswith(": No space left on device") and "Traceback" not in stderr
    processed, _, failed, _ = summary(stderr)  # still the last line
    assert processed >= 1 and failed == 0
    kept = complete_results(out)  # the earlier results are complete, nothing half-written
    assert {str(out / k) for k in kept} >= set(stdout.decode().split()) and len(kept) >= processed


def signal_run(folder: Path, out: Path, sig: int) -> tuple[subprocess.CompletedProcess[bytes], list[str]]:
    """Start a run on ``folder``, send ``sig`` once the first result is printed, wait for the end."""
    proc = subprocess.Popen(
        command(str(folder), "-o", str(out), *MODEL, "--batch-size", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: communicate() must see everything after the first line
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored, even from a background job
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(sig)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    reported = (first + rest).decode().split()
    return subprocess.CompletedProcess(proc.args, proc.returncode, first + rest, stderr), reported


@pytest.mark.subprocess
@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(many: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, reported = signal_run(many, out, signal.SIGINT)
    stderr = proc.stderr.decode()
    assert proc.returncode == 130, stderr
    assert "vitattn: error: interrupted" in stderr and "Traceback" not in stderr
    processed, _, failed, total = summary(stderr)
    assert len(reported) - 1 <= processed <= len(reported) and failed == 0 and total < 40  # Ctrl-C may fall
    assert reported  # between printing a result and counting it
    finished = complete_results(out)  # only complete folders, no temporary files: the write pool was drained
    assert {str(out / f) for f in finished} >= set(reported)
    finished = {Path(f).name for f in finished}
    code, stdout, stderr = invoke([str(many), "-o", str(out), *MODEL, "--json"])
    assert code == 0, stderr
    status = {Path(r["input"]).name: r["status"] for r in records(stdout)}
    assert {n for n, s in status.items() if s == "skipped"} == finished
    assert {n for n, s in status.items() if s == "ok"} == {f"img{i:02d}.jpg" for i in range(40)} - finished
    assert len(complete_results(out)) == 40


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_stops_cleanly(many: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, reported = signal_run(many, out, signal.SIGTERM)
    stderr = proc.stderr.decode()
    assert proc.returncode == 143, stderr
    assert "vitattn: error: terminated" in stderr and "Traceback" not in stderr
    assert reported and len(reported) - 1 <= summary(stderr)[0] <= len(reported)
    assert {str(out / f) for f in complete_results(out)} >= set(reported)


# -- 6, 7: limits and pixels end to end ------------------------------------------------------------------


def test_max_pixels_end_to_end(tmp_path: Path) -> None:
    bomb = corpus.write(tmp_path, "bomb.png", corpus.bomb_png(10_000, 10_000))  # Pillow only warns for this one
    small = noisy(tmp_path / "small.png", size=(64, 48))
    code, _, stderr = invoke([str(bomb), "-o", str(tmp_path / "o1"), *MODEL])
    assert code == 1
    assert f"{bomb}: image too large (100000000 pixels, limit 89478485; raise it with --max-pixels)" in stderr
    code, _, stderr = invoke([str(small), "-o", str(tmp_path / "o2"), *MODEL, "--max-pixels", "1000"])
    assert code == 1 and f"{small}: image too large (64×48 = 3072 pixels, limit 1000" in stderr
    assert complete_results(tmp_path / "o2") == set()
    code, _, stderr = invoke([str(small), "-o", str(tmp_path / "o3"), *MODEL, "--max-pixels", "5000"])
    assert code == 0 and complete_results(tmp_path / "o3") == {"small.png"}, stderr
    code, _, stderr = invoke([str(bomb), "-o", str(tmp_path / "o4"), *MODEL, "--max-pixels", "0"])
    assert code == 1 and f"{bomb}: {Reason.TRUNCATED}" in stderr  # past the limit; then its data is missing


def test_transparency_gives_the_attention_of_the_white_composite(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[..., 3] = rng.choice([0, 255, 128], size=(40, 56))
    rgba[rgba[..., 3] == 0, :3] = (255, 0, 0)  # hidden red under transparent pixels
    alpha = rgba[..., 3:].astype(np.uint16)
    white = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(white.astype(np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(rgba[..., :3].copy()).save(tmp_path / "naive.png")  # what convert("RGB") would see
    out = tmp_path / "out"
    names = ["rgba.png", "white.png", "naive.png"]
    paths = [str(tmp_path / n) for n in names]
    code, _, stderr = invoke([*paths, "-o", str(out), *MODEL, "--npy", "--batch-size", "1"])
    assert code == 0, stderr
    maps = {n: np.load(out / n / "block5_attn.npy") for n in names}
    np.testing.assert_array_equal(maps["rgba.png"], maps["white.png"])
    assert not np.allclose(maps["rgba.png"], maps["naive.png"])


# -- 8: names --------------------------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_json_records_and_dash_names_with_a_strict_encoding(tmp_path: Path) -> None:
    png = corpus.encode(corpus.rgb_picture(), "PNG")
    corpus.write(tmp_path, "-dash.jpg", png)
    corpus.write(tmp_path, b"caf\xe9 \xe2\x98\x95.png", png)  # Latin-1 byte, then UTF-8
    proc = subprocess.run(
        command("--json", "-o", "out", *MODEL, "--", "-dash.jpg", b"caf\xe9 \xe2\x98\x95.png"),
        capture_output=True,
        env=STRICT_ENV,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    recs = records(proc.stdout)
    assert [r["input"] for r in recs] == ["-dash.jpg", "caf\\xe9 ☕.png"]
    assert os.fsencode(recs[1]["files"]["meta"]) == b"out/caf\xe9 \xe2\x98\x95.png/meta.json"
    assert complete_results(tmp_path / "out") == {"-dash.jpg", os.fsdecode(b"caf\xe9 \xe2\x98\x95.png")}


# -- 9: bad options not covered by test_cli --------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_bad_outputs_devices_and_weights_are_one_line(tmp_path: Path) -> None:
    photo = str(noisy(tmp_path / "p.png"))
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep me")
    locked = tmp_path / "locked.pth"
    locked.write_bytes(b"x")
    locked.chmod(0)
    cases: list[tuple[list[str], int, str]] = [
        (["-o", str(afile), *MODEL], 2, "exists and is not a folder"),
        (["-o", str(afile / "sub"), *MODEL], 3, "cannot create output folder"),
        (["-m", "test_vit", "--weights", str(tmp_path / "missing.pth")], 3, "no such file"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", *MODEL], 2, "CUDA is not available"))
    for args, want, message in cases:
        code, stdout, stderr = invoke([photo, *(["-o", str(tmp_path / "never")] if "-o" not in args else []), *args])
        assert code == want and message in stderr, (args, stderr)
        assert len(lines(stderr, "error")) == 1 and stdout == b"" and "Traceback" not in stderr
        assert not SUMMARY.search(stderr)  # nothing was run
    assert not (tmp_path / "never").exists() and afile.read_bytes() == b"keep me"
    # an unreadable weights file: in a process with permissions enforced, also as root (DROP_DAC)
    proc = subprocess.run(
        command(photo, "-o", str(tmp_path / "never"), "-m", "test_vit", "--weights", str(locked)),
        capture_output=True,
        env=ENV,
        timeout=120,
    )
    stderr = proc.stderr.decode()
    assert proc.returncode == 3 and "locked.pth" in stderr and len(lines(stderr, "error")) == 1, stderr
    assert not (tmp_path / "never").exists()


# -- 10: pipes -------------------------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
def test_closed_pipes_end_quietly(many: Path, tmp_path: Path) -> None:
    vitattn = " ".join(
        [f"'{sys.executable}'", "-m", "vitattn", "heatmap", f"'{many}'", "--json", "--batch-size", "1", *MODEL]
    )
    script = (
        f"({vitattn} -o o1 2>err1; echo $? >rc1) | head -1 >line1; "  # stdout closed early
        f"({vitattn} -o o2 2>&1; echo $? >rc2) | head -1 >line2"  # stdout and stderr closed early
    )
    subprocess.run(["sh", "-c", script], cwd=tmp_path, env=ENV, timeout=300, check=True)
    assert (tmp_path / "rc1").read_text().strip() == "141"
    err = (tmp_path / "err1").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err and not lines(err, "error")
    processed = summary(err)[0]
    assert 1 <= processed < 40
    assert json.loads((tmp_path / "line1").read_text())["status"] == "ok"
    assert (tmp_path / "rc2").read_text().strip() == "141"
    assert (tmp_path / "line2").read_text().startswith("vitattn: warning: --no-pretrained")
    complete_results(tmp_path / "o1")
    complete_results(tmp_path / "o2")
