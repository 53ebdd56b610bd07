"""The Ray engine (``--engine ray``) on a real local Ray cluster: the local engine's files, records and errors;
a worker killed mid-run; the driver interrupted and the run resumed.

One cluster (two CPUs, bound to 127.0.0.1, its own token and temp folder) serves every test here; it starts
when the first test needs it and stops at the end of the session.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vitattn.errors import InputError, Reason, UsageError
from vitattn.outputs import META, TMP_MARK
from vitattn.ray_engine import MARKER_PREFIX
from vitattn.records import TIMINGS

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["-m", "test_vit", "--no-pretrained"]

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    pytest.importorskip("ray.data", reason="the ray extra is part of `make test` (pip install -e '.[dev,ray]')")
    temp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # the workers import this checkout's vitattn
        "HF_HUB_OFFLINE": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray then binds the loopback address, not the host's
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ray_cluster.py"), str(temp / "ray")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), f"the test cluster did not start ({address!r})"
        yield Cluster(address, env)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the cluster process shuts its node down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def vitattn(cluster: Cluster, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitattn", "heatmap", *args],
        cwd=cwd,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ray_args(cluster: Cluster, workers: int = 1) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address, "--ray-workers", str(workers)]


def make_inputs(folder: Path, n: int, *, bad: bool = True, scale: int = 1) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (40 + 7 * i) * scale, (64 - 3 * (i % 5)) * scale
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        (folder / "empty.jpg").write_bytes(b"")


def records(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines()]


def tree(out: Path) -> dict[str, bytes]:
    """Every file under ``out``, by path relative to it."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def meta_files(out: Path) -> list[Path]:
    return list(out.rglob(META))


def complete_results(out: Path) -> list[Path]:
    """The meta.json files whose every result is complete (a result is recorded as pending before its files)."""
    done = []
    for path in meta_files(out):
        try:
            results = json.loads(path.read_text())["results"].values()
        except (OSError, ValueError, KeyError):
            continue
        if results and all(entry.get("state") == "complete" for entry in results):
            done.append(path)
    return done


def error_lines(stderr: str) -> set[str]:
    return {line for line in stderr.splitlines() if line.startswith("vitattn: error:")}


def without_timings(meta: dict[str, Any]) -> dict[str, Any]:
    """A meta.json without when each result was written and how long it took."""
    results = {name: {k: v for k, v in entry.items() if k not in TIMINGS} for name, entry in meta["results"].items()}
    assert results and all(set(TIMINGS) <= set(entry) for entry in meta["results"].values())
    return {**meta, "results": results}


def summary(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_ray_engine_writes_what_the_local_engine_writes(ray_cluster: Cluster, tmp_path: Path) -> None:
    make_inputs(tmp_path / "in", 5)
    common = ["in", *MODEL, "--json", "--npy", "--batch-size", "2", "-b", "2", "-b", "-1"]
    local = vitattn(ray_cluster, tmp_path, *common, "-o", "local")
    ray = vitattn(ray_cluster, tmp_path, *common, "-o", "ray", *ray_args(ray_cluster, workers=2))

    assert local.returncode == ray.returncode == 1, ray.stderr
    assert error_lines(ray.stderr) == error_lines(local.stderr)
    assert "vitattn: error: in/empty.jpg: empty file" in error_lines(ray.stderr)
    assert any(line.startswith("vitattn: error: in/broken.png: ") for line in error_lines(ray.stderr))
    assert summary(ray.stderr) == summary(local.stderr) == "processed 5, skipped 0, failed 2 (of 7)"

    # the same records, one per input (the Ray engine's come in finishing order), its paths under its folder
    by_input = {r["input"]: r for r in records(local.stdout)}
    ray_records = records(ray.stdout)
    assert len(ray_records) == len(by_input) == 7
    for record in ray_records:
        expected = json.loads(json.dumps(by_input[record["input"]]).replace('"local/', '"ray/'))
        assert record == expected

    local_files, ray_files = tree(tmp_path / "local"), tree(tmp_path / "ray")
    assert sorted(ray_files) == sorted(local_files)  # no marker, no temporary file left behind
    npys = [name for name in local_files if name.endswith(".npy")]
    assert len(npys) == 10  # 5 pictures x 2 blocks
    for name, data in local_files.items():
        if name.endswith(".npy"):
            a, b = (np.load(tmp_path / side / name) for side in ("local", "ray"))
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        elif name.endswith(META):
            assert without_timings(json.loads(ray_files[name])) == without_timings(json.loads(data)), name
        else:
            assert ray_files[name] == data, name  # pictures too: the same code drew them


def test_a_worker_killed_mid_run_loses_nothing_and_repeats_nothing(ray_cluster: Cluster, tmp_path: Path) -> None:
    n = 40  # larger pictures: the run lasts long enough to be cut in the middle
    make_inputs(tmp_path / "in", n, bad=False, scale=4)
    out = tmp_path / "out"
    lookup = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ray_cluster.py"), "--replica-pid", ray_cluster.address],
        env=ray_cluster.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert lookup.stdout is not None
    assert lookup.stdout.readline().strip() == "connected"  # watching before the run starts
    driver = subprocess.Popen(
        [sys.executable, "-m", "vitattn", "heatmap", "in", *MODEL, "--json", "--batch-size", "2", "-o", "out",
         *ray_args(ray_cluster)],
        cwd=tmp_path, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pid = int(lookup.stdout.readline().strip())
        lookup.wait(timeout=60)
        deadline = time.monotonic() + 200
        while not complete_results(out) and time.monotonic() < deadline:  # the replica is at work
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        done_at_kill = len(complete_results(out))
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
        lookup.kill()
    assert 1 <= done_at_kill < n, "the worker must die mid-run"
    assert driver.returncode == 0, stderr
    recs = records(stdout)
    assert sorted(str(r["input"]) for r in recs) == sorted(f"in/img{i:02d}.png" for i in range(n))  # each once
    assert {r["status"] for r in recs} == {"ok"}  # those the dead worker finished count as processed
    assert summary(stderr) == f"processed {n}, skipped 0, failed 0 (of {n})"
    for r in recs:
        files = r["files"]
        assert isinstance(files, dict)
        for path in [*files["heads"], files["mean"], files["grid"], files["meta"]]:
            assert (tmp_path / path).is_file()
    leftovers = [p for p in out.rglob("*") if TMP_MARK in p.name or p.name.startswith(MARKER_PREFIX)]
    assert leftovers == []


def test_an_interrupted_driver_resumes_where_it_stopped(ray_cluster: Cluster, tmp_path: Path) -> None:
    n = 24
    make_inputs(tmp_path / "in", n, bad=False)
    out = tmp_path / "out"
    args = ["in", *MODEL, "--json", "--batch-size", "2", "-o", "out", *ray_args(ray_cluster)]
    driver = subprocess.Popen(
        [sys.executable, "-m", "vitattn", "heatmap", *args],
        cwd=tmp_path, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 200
        while not complete_results(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        driver.send_signal(signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130, stderr
    done = {str(r["input"]) for r in records(stdout) if r["status"] == "ok"}
    finished = len(meta_files(out))
    assert len(complete_results(out)) == finished  # nothing left pending
    assert 1 <= finished < n, "the driver must stop mid-run"
    assert len(done) == finished  # the batches in flight at Ctrl-C finished, and were reported
    # the batches in flight finished: nothing half-written, and the run's marker is gone
    assert [p for p in out.rglob("*") if TMP_MARK in p.name or p.name.startswith(MARKER_PREFIX)] == []

    rerun = vitattn(ray_cluster, tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr
    recs = records(rerun.stdout)
    assert sorted(str(r["input"]) for r in recs) == sorted(f"in/img{i:02d}.png" for i in range(n))
    skipped = {str(r["input"]) for r in recs if r["status"] == "skipped"}
    assert done <= skipped and len(skipped) == finished
    assert summary(rerun.stderr) == f"processed {n - finished}, skipped {finished}, failed 0 (of {n})"
    assert len(meta_files(out)) == n


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['vitattn', 'heatmap', 'x.png', '--engine', 'ray'];"
        "from vitattn.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vitattn: error: --engine: the ray engine needs Ray: pip install 'vitattn[ray]'"


def test_outcomes_and_errors_survive_pickling() -> None:
    from vitattn.discovery import InputItem
    from vitattn.job import Outcome

    err = InputError("a/b.png", Reason.TOO_LARGE, "9000×9000")
    outcome = Outcome(InputItem("a/b.png", "a/b.png", err), "error", {"status": "error"}, error=err)
    back = pickle.loads(pickle.dumps(outcome))
    assert back.error is not None and str(back.error) == str(err) == "a/b.png: image too large (9000×9000)"
    assert (back.error.path, back.error.reason, back.error.detail) == ("a/b.png", Reason.TOO_LARGE, "9000×9000")
    usage = pickle.loads(pickle.dumps(UsageError("bad block 9", option="blocks")))
    assert (str(usage), usage.option) == ("bad block 9", "blocks")


def test_ray_options_are_checked_before_anything_runs() -> None:
    from vitattn.options import Engine, RunOptions, parse_ray_workers

    assert parse_ray_workers("3") == (3, 3) and parse_ray_workers("1-4") == (1, 4) and parse_ray_workers(None) is None
    for bad in ("0", "4-2", "two", "1-"):
        with pytest.raises(UsageError) as exc:
            parse_ray_workers(bad)
        assert exc.value.option == "ray_workers"
    assert RunOptions(engine="RAY").engine is Engine.ray  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        RunOptions(ray_gpus_per_worker=-1)
    proc = subprocess.run([sys.executable, "-m", "vitattn", "heatmap", "x.png", "--ray-workers", "4-2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vitattn: error: --ray-workers: '4-2': at least 1 worker, and MIN at most MAX"


def test_a_worker_that_does_not_see_the_output_folder_stops_the_run(tmp_path: Path) -> None:
    """The replica class itself (what each Ray actor runs), with a marker its node does not have."""
    import socket

    from vitattn.discovery import InputItem
    from vitattn.errors import EngineError
    from vitattn.heatmap import HeatmapSpec
    from vitattn.options import ModelOptions, RenderOptions, RunOptions
    from vitattn.ray_engine import _COLUMN, _Replica, _WorkerContext

    spec = HeatmapSpec(ModelOptions("test_vit", pretrained=False), None, RenderOptions(out=tmp_path), RunOptions())
    marker = tmp_path / "elsewhere" / f"{MARKER_PREFIX}0"
    cwd = os.getcwd()
    try:
        replica = _Replica(spec, _WorkerContext(cwd=str(tmp_path), marker=str(marker)))
        rows = replica({_COLUMN: np.array([pickle.dumps((0, InputItem("a.png", "a.png")))], dtype=object)})
    finally:
        os.chdir(cwd)
    [(_, error)] = [pickle.loads(v) for v in rows[_COLUMN]]
    assert isinstance(error, EngineError) and error.exit_code == 3
    assert str(error) == (
        f"worker node {socket.gethostname()} does not see the output folder {marker.parent}: it must be a path "
        "every node sees (a shared filesystem mounted at the same place)"
    )
