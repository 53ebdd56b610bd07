"""The output store (issues 13 §1 and 14): results that coexist, a deterministic folder mapping, writes that
cannot leave ``-o``, concurrent writers, kills at any point, inputs reported exactly once, streamed stdin.

Everything runs on real files in ``tmp_path`` with timm's random-weight ``test_vit`` (6 blocks, 2 heads, 10x10
grid); what a test expects is written out here (file names, folder names), not derived from the code under test.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vitattn.cli import app

MODEL = ["-m", "test_vit", "--no-pretrained"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def invoke(args: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["heatmap", *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def picture(path: Path, seed: int, size: tuple[int, int] = (96, 80)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def meta(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "meta.json").read_text())
    return data


def on_disk(folder: Path) -> set[str]:
    """Every file below a result folder (relative names), except the lock file."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != ".vitattn.lock"}


def assert_consistent(folder: Path) -> dict[str, Any]:
    """One folder holds exactly the files its meta.json lists, each complete with its recorded size."""
    m = meta(folder)
    assert on_disk(folder) == set(m["files"]), folder
    for key, entry in m["results"].items():
        assert entry["state"] == "complete", key
        for name in entry["files"]:
            assert (folder / name).stat().st_size == entry["sizes"][name], name
    return m


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path``, so inputs are named by relative paths as a user types them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- 13 §1: results that coexist ----------------------------------------------------------------------------


def test_the_four_methods_commands_in_a_row_give_four_results(cwd: Path) -> None:
    picture(cwd / "cat.jpg", 0)
    runs = [
        ["-b", "3", "-b", "5"],
        ["--fuse", "max", "--threshold", "0.6"],
        ["--method", "rollout", "--discard-ratio", "0.9"],
        ["--method", "grad-rollout", "--target-class", "3"],
    ]
    for args in runs:
        code, _, err = invoke(["cat.jpg", *MODEL, "--json", *args])
        assert code == 0, err
    folder = cwd / "vitattn-out" / "cat.jpg"
    m = assert_consistent(folder)
    assert set(m["results"]) == {
        "block3",
        "block5",
        "block5_max",
        "block5_rollout_discard0.9",
        "block5_grad-rollout_class3",
    }
    names = on_disk(folder)
    assert {"block3_head0.png", "block3_mean.png", "block3_grid.png"} <= names
    assert {"block5_head0.png", "block5_mean.png", "block5_grid.png"} <= names  # the first command's, kept
    assert {"block5_max_head0.png", "block5_max.png", "block5_max_mask.png", "block5_max_grid.png"} <= names
    assert {"block5_rollout_discard0.9.png", "block5_rollout_discard0.9_grid.png"} <= names
    assert {"block5_grad-rollout_class3.png", "block5_grad-rollout_class3_grid.png"} <= names
    # each is resumable on its own: every command again skips
    for args in runs:
        code, out, err = invoke(["cat.jpg", *MODEL, "--json", *args])
        assert code == 0 and [r["status"] for r in records(out)] == ["skipped"], err


def test_picture_settings_rerender_in_place_and_arrays_stay(cwd: Path) -> None:
    picture(cwd / "a.png", 1)
    code, out, err = invoke(["a.png", *MODEL, "--npy", "--json"])
    assert code == 0, err
    folder = cwd / "vitattn-out" / "a.png"
    npy = folder / "block5_attn.npy"
    before_npy = (npy.stat().st_ino, npy.stat().st_mtime_ns, npy.read_bytes())
    before_png = (folder / "block5_head0.png").read_bytes()
    code, out, err = invoke(["a.png", *MODEL, "--npy", "--json", "--cmap", "viridis"])
    assert code == 0, err
    assert [r["status"] for r in records(out)] == ["ok"]
    assert (folder / "block5_head0.png").read_bytes() != before_png  # re-drawn with another colour map
    assert (npy.stat().st_ino, npy.stat().st_mtime_ns, npy.read_bytes()) == before_npy  # untouched
    m = assert_consistent(folder)
    assert m["results"]["block5"]["settings"]["cmap"] == "viridis"
    code, out, err = invoke(["a.png", *MODEL, "--npy", "--json", "--cmap", "viridis"])
    assert code == 0 and [r["status"] for r in records(out)] == ["skipped"], err
    # another format: the PNGs are replaced by JPEGs, nothing of the PNGs is left
    code, out, err = invoke(["a.png", *MODEL, "--npy", "--format", "jpg"])
    assert code == 0, err
    assert {n for n in on_disk(folder) if n.endswith(".png")} == set()
    assert_consistent(folder)


def test_a_second_model_sits_next_to_the_first_and_overwrite_redoes_only_its_result(cwd: Path) -> None:
    picture(cwd / "a.png", 2)
    assert invoke(["a.png", *MODEL])[0] == 0
    assert invoke(["a.png", *MODEL, "--method", "rollout"])[0] == 0
    folder = cwd / "vitattn-out" / "a.png"
    first = {n: (folder / n).stat().st_mtime_ns for n in on_disk(folder) if n != "meta.json"}
    code, out, err = invoke(["a.png", "-m", "test_vit", "--weights", str(save_weights(cwd)), "--json"])
    assert code == 0, err
    (record,) = records(out)
    assert record["files"]["grid"] == str(Path("vitattn-out/a.png/test_vit@w.pth/block5_grid.png"))
    m = assert_consistent(folder)
    assert set(m["results"]) == {"block5", "block5_rollout", "test_vit@w.pth/block5"}
    assert m["primary_model"] == {"model": "test_vit", "weights": "random"}
    # --overwrite redoes the named result only: the raw result of the first model is rewritten, its rollout
    # result and the other model's files are not touched
    time.sleep(0.01)
    assert invoke(["a.png", *MODEL, "--overwrite"])[0] == 0
    after = {n: (folder / n).stat().st_mtime_ns for n in first}
    assert {n for n in first if after[n] != first[n]} == {
        "block5_head0.png",
        "block5_head1.png",
        "block5_mean.png",
        "block5_grid.png",
    }
    assert_consistent(folder)


def save_weights(where: Path) -> Path:
    import timm
    import torch

    torch.manual_seed(7)
    model = timm.create_model("test_vit", pretrained=False)
    path = where / "w.pth"
    torch.save(model.state_dict(), path)
    return path


def test_an_edited_input_is_not_skipped_and_not_replaced_without_overwrite(cwd: Path) -> None:
    photo = picture(cwd / "x.bmp", 3, (64, 64))
    assert invoke(["x.bmp", *MODEL])[0] == 0
    picture(photo, 4, (64, 64))  # other pixels, same size; the time moves on
    os.utime(photo, ns=(time.time_ns(), time.time_ns() + 10**9))
    code, out, err = invoke(["x.bmp", *MODEL, "--json"])
    assert code == 1 and records(out)[0]["error"] == "outputs exist (use --overwrite)", err
    assert invoke(["x.bmp", *MODEL, "--overwrite"])[0] == 0


def test_same_named_files_in_two_folders_get_their_own_results(cwd: Path) -> None:
    a = picture(cwd / "d1" / "x.bmp", 5, (64, 64))
    b = picture(cwd / "d2" / "x.bmp", 6, (64, 64))
    os.utime(a, ns=(10**18, 10**18))
    os.utime(b, ns=(10**18, 10**18))  # same size, same time, other pixels
    assert invoke(["d1/x.bmp", *MODEL])[0] == 0
    code, out, err = invoke(["d2/x.bmp", *MODEL, "--json"])
    assert code == 0 and records(out)[0]["status"] == "ok", err
    assert meta(cwd / "vitattn-out" / "d1" / "x.bmp")["input"] == "d1/x.bmp"
    assert meta(cwd / "vitattn-out" / "d2" / "x.bmp")["input"] == "d2/x.bmp"


def folders_of(stdout: str) -> dict[str, str]:
    return {r["input"]: str(Path(r["files"]["meta"]).parent) for r in records(stdout)}


def test_the_folder_mapping_does_not_depend_on_how_or_in_which_order_paths_are_given(cwd: Path) -> None:
    picture(cwd / "photos" / "cats" / "tom.jpg", 7)
    picture(cwd / "photos" / "dogs" / "tom.jpg", 8)
    picture(cwd / "photos" / "a.png", 9)
    out = ["-o", "maps", *MODEL, "--json", "--top-k", "0"]
    expected = {
        "photos/cats/tom.jpg": "maps/photos/cats/tom.jpg",
        "photos/dogs/tom.jpg": "maps/photos/dogs/tom.jpg",
        "photos/a.png": "maps/photos/a.png",
    }

    def normalised(got: dict[str, str]) -> dict[str, str]:
        return {os.path.normpath(k): v for k, v in got.items()}

    code, stdout, err = invoke(["photos/cats/tom.jpg", "photos/dogs/tom.jpg", "photos/a.png", *out])
    assert code == 0, err
    assert folders_of(stdout) == expected
    for args, stdin in [
        (["./photos/a.png", "photos/dogs/../dogs/tom.jpg", "photos//cats/tom.jpg"], None),  # other spellings
        (["-"], b"photos/a.png\nphotos/dogs/tom.jpg\nphotos/cats/tom.jpg\n"),  # stdin, another order
        (["photos", "-r"], None),  # a folder scan
        ([str(cwd / "photos" / "a.png"), str(cwd / "photos" / "cats" / "tom.jpg")], None),  # absolute, inside
    ]:
        code, stdout, err = invoke([*args, *out], stdin=stdin)
        assert code == 0, err
        got = normalised({os.path.relpath(k, cwd) if os.path.isabs(k) else k: v for k, v in folders_of(stdout).items()})
        assert got == {k: v for k, v in expected.items() if k in got} and got, (args, got)
        assert all(r["status"] == "skipped" for r in records(stdout)), args  # the same folders: all done before


def test_paths_outside_the_current_folder_and_their_collisions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``..`` and absolute paths outside the current folder keep their absolute path without the leading
    ``/``; a relative path that spells the same name gets its own folder with a suffix, the same every run,
    and a long name stays within 255 bytes."""
    work = tmp_path / "work"
    long_name = "x" * 240 + ".png"
    outside = picture(tmp_path / "data" / long_name, 10)
    spelled = outside.as_posix().lstrip("/")  # e.g. tmp/pytest-.../data/xxx.png
    inside = picture(work / spelled, 11)  # a relative path with the very same spelling
    monkeypatch.chdir(work)
    args = ["-o", "out", *MODEL, "--json", "--top-k", "0"]
    code, stdout, err = invoke([f"../data/{long_name}", *args])
    assert code == 0, err
    assert folders_of(stdout) == {f"../data/{long_name}": f"out/{spelled}"}
    assert meta(work / "out" / spelled)["input_path"] == outside.as_posix()
    code, stdout, err = invoke([os.path.relpath(inside, work), *args])
    assert code == 0, err
    (folder,) = folders_of(stdout).values()
    name = Path(folder).name
    assert folder != f"out/{spelled}" and name.startswith("x" * 200) and "~" in name
    assert len(os.fsencode(name)) <= 255
    # both again, in the other order: each finds its own folder and skips
    code, stdout, err = invoke([os.path.relpath(inside, work), str(outside), *args])
    assert code == 0 and [r["status"] for r in records(stdout)] == ["skipped", "skipped"], err
    assert sorted(folders_of(stdout).values()) == sorted([folder, f"out/{spelled}"])


# -- 14.1: writes that cannot leave -o ---------------------------------------------------------------------


def test_a_result_folder_that_is_a_symlink_is_refused(cwd: Path) -> None:
    picture(cwd / "b.jpg", 12)
    elsewhere = cwd / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "block5_grid.png"
    victim.write_bytes(b"precious")
    (cwd / "out").mkdir()
    (cwd / "out" / "b.jpg").symlink_to(elsewhere)
    code, stdout, err = invoke(["b.jpg", "-o", "out", *MODEL, "--json"])
    assert code == 1
    (record,) = records(stdout)
    assert record["error"].startswith("unsafe output folder (") and "is a symlink" in record["error"], err
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in elsewhere.iterdir()) == ["block5_grid.png"]


def test_symlinks_planted_under_result_names_are_replaced_not_followed(cwd: Path) -> None:
    picture(cwd / "c.jpg", 13)
    victim = cwd / "victim.txt"
    victim.write_bytes(b"precious")
    folder = cwd / "out" / "c.jpg"
    folder.mkdir(parents=True)
    for name in ("block5_head0.png", "meta.json", ".vitattn.lock"):
        (folder / name).symlink_to(victim)
    code, _, err = invoke(["c.jpg", "-o", "out", *MODEL])
    # the lock file is opened without following links: the input fails, and the victim is untouched
    assert code == 1 and "unsafe output folder" in err and ".vitattn.lock is a symlink" in err, err
    assert victim.read_bytes() == b"precious"
    (folder / ".vitattn.lock").unlink()
    code, _, err = invoke(["c.jpg", "-o", "out", *MODEL])
    assert code == 0, err
    assert victim.read_bytes() == b"precious"
    assert not (folder / "block5_head0.png").is_symlink() and not (folder / "meta.json").is_symlink()
    assert_consistent(folder)


def test_temporary_files_are_created_exclusively_with_unguessable_names(tmp_path: Path) -> None:
    from vitattn.store import open_locked

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    with open_locked(out, "d.jpg", "d.jpg") as folder:
        # an attacker plants links under every name the old scheme would have used
        for n in range(50):
            (out / "d.jpg" / f".block5_grid.png.vitattn-tmp-{os.getpid()}-{n}").symlink_to(victim)
        folder.write("block5_grid.png", lambda f: f.write(b"new"))
    assert victim.read_bytes() == b"precious"
    assert (out / "d.jpg" / "block5_grid.png").read_bytes() == b"new"


# -- 14.2 and 14.3: concurrent writers and kills ------------------------------------------------------------


def heatmap_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitattn", "heatmap", *args]


@pytest.mark.subprocess
def test_three_concurrent_runs_over_the_same_inputs(tmp_path: Path) -> None:
    for i in range(12):
        picture(tmp_path / "in" / f"{i:02d}.png", 20 + i)
    args = ["in", "-o", "out", *MODEL, "--json", "--top-k", "0", "-b", "2,5", "--batch-size", "4"]
    procs = [
        subprocess.Popen(heatmap_command(*args), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e.decode()[-2000:] for _, e in outputs]
    statuses: dict[str, list[str]] = {}
    for out, _ in outputs:
        for r in records(out.decode()):
            statuses.setdefault(r["input"], []).append(r["status"])
    assert len(statuses) == 12
    for name, seen in statuses.items():
        assert sorted(seen) == ["ok", "skipped", "skipped"], (name, seen)  # done exactly once across the runs
    for i in range(12):
        m = assert_consistent(tmp_path / "out" / "in" / f"{i:02d}.png")
        assert set(m["results"]) == {"block2", "block5"}
    proc = subprocess.run(heatmap_command(*args), cwd=tmp_path, env=ENV, capture_output=True, timeout=600)
    assert proc.returncode == 0 and {r["status"] for r in records(proc.stdout.decode())} == {"skipped"}
    assert not [p for p in (tmp_path / "out").rglob("*") if ".vitattn-tmp-" in p.name]


@pytest.mark.subprocess
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_a_kill_during_an_overwrite_leaves_folders_that_the_next_run_completes(tmp_path: Path, delay: float) -> None:
    n = 10
    for i in range(n):
        picture(tmp_path / "in" / f"{i}.png", 40 + i)
    base = ["in", "-o", "out", *MODEL, "--top-k", "0", "--batch-size", "2"]
    first = subprocess.run(heatmap_command(*base, "--format", "jpg"), cwd=tmp_path, env=ENV, capture_output=True)
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    proc = subprocess.Popen(
        heatmap_command(*base, "--format", "png", "--overwrite"),
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # kill once it has started writing (the first folder path on stdout), a little later each time
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    assert ready, "the overwrite run wrote nothing"
    time.sleep(delay / 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    rerun = subprocess.run(heatmap_command(*base, "--format", "png"), cwd=tmp_path, env=ENV, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    for i in range(n):
        folder = tmp_path / "out" / "in" / f"{i}.png"
        m = assert_consistent(folder)
        assert set(m["results"]) == {"block5"}
        assert {Path(f).suffix for f in m["files"]} == {".png", ".json"}  # exactly one result: no JPEG left


# -- 14.5 and 14.6: the output folder by identity; every input reported once ---------------------------------


def test_the_output_folder_is_not_scanned_when_reached_through_a_link(cwd: Path) -> None:
    picture(cwd / "photos" / "a.png", 50)
    assert invoke(["photos", "-o", "maps", *MODEL])[0] == 0
    (cwd / "photos" / "maps-link").symlink_to(cwd / "maps")  # the output folder, by another path
    code, stdout, err = invoke(["photos", "-r", "-o", "maps", *MODEL, "--json"])
    assert code == 0, err
    assert [r["input"] for r in records(stdout)] == ["photos/a.png"]


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0), reason="a bind mount needs root")
def test_the_output_folder_is_not_scanned_through_a_bind_mount(cwd: Path) -> None:
    picture(cwd / "photos" / "a.png", 51)
    (cwd / "maps").mkdir()
    (cwd / "photos" / "mnt").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(cwd / "maps"), str(cwd / "photos" / "mnt")], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {mounted.stderr.decode().strip()}")
    try:
        assert invoke(["photos", "-r", "-o", "maps", *MODEL])[0] == 0
        code, stdout, err = invoke(["photos", "-r", "-o", "maps", *MODEL, "--json"])
        assert code == 0 and [r["input"] for r in records(stdout)] == ["photos/a.png"], err
    finally:
        subprocess.run(["umount", str(cwd / "photos" / "mnt")], check=True)


def test_inputs_inside_the_output_folder_and_duplicates_are_reported(cwd: Path) -> None:
    picture(cwd / "photos" / "cat.jpg", 52)
    picture(cwd / "photos" / "dog.jpg", 53)
    (cwd / "photos" / "same.jpg").symlink_to("cat.jpg")
    code, stdout, err = invoke(["photos/cat.jpg", "-o", "photos", *MODEL, "--json"])
    assert code == 1
    assert [(r["input"], r["status"], r.get("error")) for r in records(stdout)] == [
        ("photos/cat.jpg", "error", "inside the output folder")
    ]
    args = ["photos/cat.jpg", "photos/dog.jpg", "./photos/cat.jpg", "photos/same.jpg", "photos/dog.jpg"]
    code, stdout, err = invoke([*args, "-o", "out", *MODEL, "--json"])
    assert code == 0, err
    got = [(r["input"], r["status"], r.get("duplicate_of")) for r in records(stdout)]
    assert got == [
        ("photos/cat.jpg", "ok", None),
        ("photos/dog.jpg", "ok", None),
        ("./photos/cat.jpg", "skipped", "photos/cat.jpg"),
        ("photos/same.jpg", "skipped", "photos/cat.jpg"),
        ("photos/dog.jpg", "skipped", "photos/dog.jpg"),
    ]
    assert err.rstrip().splitlines()[-1] == "processed 2, skipped 3, failed 0 (of 5)"


# -- 14.7: stdin processed as it arrives --------------------------------------------------------------------


@pytest.mark.subprocess
def test_a_slow_producer_gets_its_result_before_the_end_of_its_input(tmp_path: Path) -> None:
    picture(tmp_path / "img.png", 60)
    proc = subprocess.Popen(
        heatmap_command("-", "-o", "out", *MODEL, "--json"),
        cwd=tmp_path,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"img.png\n")
    proc.stdin.flush()
    # stdin stays open: the result must come anyway (a partial batch goes to the model when input is idle)
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    assert ready, "no result while the producer was still running"
    line = proc.stdout.readline()
    assert json.loads(line)["status"] == "ok"
    assert proc.poll() is None  # the producer has not finished, and neither has vitattn
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0


@pytest.mark.subprocess
def test_an_endless_producer_streams(tmp_path: Path) -> None:
    picture(tmp_path / "img.png", 61)
    yes = subprocess.Popen(["yes", "img.png"], cwd=tmp_path, stdout=subprocess.PIPE)
    proc = subprocess.Popen(
        heatmap_command("-", "-o", "out", *MODEL, "--json"),
        cwd=tmp_path,
        env=ENV,
        stdin=yes.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    got = [json.loads(proc.stdout.readline()) for _ in range(500)]
    proc.kill()
    yes.kill()
    proc.wait(timeout=60)
    yes.wait(timeout=60)
    assert got[0]["status"] == "ok"
    assert all(r["status"] == "skipped" and r["duplicate_of"] == "img.png" for r in got[1:])
