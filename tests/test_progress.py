"""Progress on stderr (a terminal, or --progress), the empty-input warning, and reporting after Ctrl-C/SIGTERM."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitattn.outputs import META

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SUMMARY = re.compile(r"processed (\d+), skipped (\d+), failed (\d+) \(of (\d+)\)")


def pictures(root: Path, n: int, size: tuple[int, int] = (64, 48)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def vitattn(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitattn", "heatmap", *args]


def run_with_terminal_stderr(args: list[str]) -> tuple[int, str, bytes]:
    """Run with stderr on a pseudo-terminal (stdout a pipe); return the exit code, the terminal's text, stdout."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=ENV)
    os.close(slave)
    seen = bytearray()
    stdout = bytearray()
    assert proc.stdout is not None
    out_fd = proc.stdout.fileno()
    open_fds = {master, out_fd}
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], 120)
        assert ready, "no output for two minutes"
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal's other side closed (EIO on Linux)
                chunk = b""
            if not chunk:
                open_fds.discard(fd)
            else:
                (seen if fd == master else stdout).extend(chunk)
    os.close(master)
    return proc.wait(timeout=60), seen.decode(errors="replace"), bytes(stdout)


@pytest.mark.subprocess
def test_progress_on_a_terminal(tmp_path: Path) -> None:
    folder = pictures(tmp_path / "in", 10)
    code, text, stdout = run_with_terminal_stderr(
        vitattn(str(folder), "-o", str(tmp_path / "out"), "-m", "demo", "--batch-size", "2")
    )
    assert code == 0, text
    assert len(stdout.decode().splitlines()) == 10  # the data stays on stdout
    assert "\rloading demo..." in text or "\r\x1b[Kloading demo..." in text  # while the model loads
    frames = [f for f in re.split(r"\r\x1b\[K|\r", text) if f.strip()]
    counters = [f for f in frames if re.match(r"\d+/10 done, 0 failed", f)]
    assert counters, frames  # done/total: the total of a folder is known
    assert any(re.search(r"\d+/10 done, 0 failed, [\d.]+ img/s, ETA \d+:\d\d", f) for f in counters), counters
    assert not re.search(r"^0/10 done.*img/s", "\n".join(counters), re.M)  # no rate before a batch is done
    # the last thing on the terminal is the summary, on a clean line
    assert text.replace("\r\n", "\n").endswith("\x1b[Kprocessed 10, skipped 0, failed 0 (of 10)\n"), repr(text[-200:])


def test_progress_flag_and_quiet_pipes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vitattn.cli import app

    def heatmap(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["heatmap", *args], input=stdin)  # stderr is not a terminal here
        return result.exit_code, result.stderr

    folder = pictures(tmp_path / "in", 3)
    code, quiet = heatmap(str(folder), "-o", str(tmp_path / "a"), "-m", "demo")
    assert code == 0 and quiet == "processed 3, skipped 0, failed 0 (of 3)\n"  # off a terminal: no progress
    code, shown = heatmap(str(folder), "-o", str(tmp_path / "b"), "-m", "demo", "--progress")
    err = shown.splitlines()
    assert code == 0
    assert err[0] == "vitattn: progress: loading demo..." and "\r" not in shown  # plain lines
    assert "vitattn: progress: 3/3 done, 0 failed" in shown
    assert err[-1] == "processed 3, skipped 0, failed 0 (of 3)"
    # stdin: the total is not known in advance
    listed = "".join(f"{p}\n" for p in sorted(folder.iterdir())).encode()
    code, piped = heatmap("-", "-o", str(tmp_path / "c"), "-m", "demo", "--progress", stdin=listed)
    assert code == 0 and "vitattn: progress: 3 done, 0 failed" in piped


def test_empty_input_set_warns_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import vitattn.heatmap
    from vitattn.cli import app

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for an empty input set")

    monkeypatch.setattr(vitattn.heatmap, "load_model", no_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a picture")
    result = CliRunner().invoke(app, ["heatmap", str(empty), "-o", str(tmp_path / "out"), "-m", "demo"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"vitattn: warning: no inputs: {empty} holds no pictures to process",
        "processed 0, skipped 0, failed 0 (of 0)",
    ]
    assert result.stdout_bytes == b""


def completed_folders(out: Path) -> set[str]:
    return {str(p.parent) for p in out.rglob(META)}


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_every_completed_result_is_reported_after_a_stop(tmp_path: Path, sig: int) -> None:
    folder = pictures(tmp_path / "in", 60, size=(320, 240))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        # 4 write workers behind the model: several results finish out of order when the signal comes
        vitattn(str(folder), "-o", str(out), "-m", "demo", "--batch-size", "8", "--json", "--max-side", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.send_signal(sig)
        rest, stderr_bytes = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    stderr = stderr_bytes.decode()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), stderr
    records = [json.loads(line) for line in (first + rest).decode().splitlines()]
    ok = [r for r in records if r["status"] == "ok"]
    reported = {str(Path(r["files"]["meta"]).parent) for r in ok}
    on_disk = completed_folders(out)
    assert on_disk == reported, (sorted(on_disk - reported), sorted(reported - on_disk))  # every one, no other
    found = SUMMARY.fullmatch(stderr.splitlines()[-1])
    assert found, stderr
    processed, _, failed, total = map(int, found.groups())
    assert processed == len(ok) == len(on_disk) and failed == 0 and total == len(records) < 60


def test_empty_stdin_warns() -> None:
    from typer.testing import CliRunner

    from vitattn.cli import app

    result = CliRunner().invoke(app, ["heatmap", "-", "-m", "demo", "-o", "never-written"], input=b"")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "vitattn: warning: no inputs: stdin held no paths",
        "processed 0, skipped 0, failed 0 (of 0)",
    ]


@pytest.mark.subprocess
def test_a_fatal_error_after_the_loading_line_is_on_a_line_of_its_own(tmp_path: Path) -> None:
    folder = pictures(tmp_path / "in", 1)
    missing = tmp_path / "no-model"
    code, text, stdout = run_with_terminal_stderr(
        vitattn(str(folder), "-o", str(tmp_path / "out"), "-m", f"local-dir:{missing}")
    )
    assert code == 3 and stdout == b""
    assert f"loading local-dir:{missing}...\r\x1b[Kvitattn: error: local-dir:{missing}: no such folder" in text, text
