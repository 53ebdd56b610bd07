"""``vitattn stats``: the report files, errors and exit codes, resume after SIGINT, --merge, the statistics
against ``vitattn heatmap --npy`` arrays and timm's unfused attention, the plots, and the demo model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from reference import recorded_attention
from typer.testing import CliRunner

from vitattn.cli import app

MODEL = ["-m", "test_vit", "--no-pretrained"]  # random weights: 6 blocks, 2 heads, 10x10 grid at 160 px
FAST = [*MODEL, "--no-plots"]
DEPTH, HEADS, GRID = 6, 2, (10, 10)


def invoke(args: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args, input=stdin)
    return result.exit_code, result.stdout, result.stderr


def stats_of(report: Path) -> dict[str, Any]:
    return json.loads((report / "stats.json").read_text())  # type: ignore[no-any-return]


def values(report: Path) -> dict[tuple[int, int, str], tuple[float, float]]:
    """(block, head, statistic) -> (mean, std) from stats.json."""
    out = {}
    for b in stats_of(report)["blocks"]:
        for h in b["heads"]:
            for name, v in h.items():
                if isinstance(v, dict) and "mean" in v:
                    out[(b["block"], h["head"], name)] = (v["mean"], v["std"])
                elif name == "sink":
                    out[(b["block"], h["head"], "sink")] = (v["share"], 0.0)
    return out


def assert_same_report(a: Path, b: Path, tol: float = 1e-6) -> None:
    va, vb = values(a), values(b)
    assert va.keys() == vb.keys() and va
    for k in va:
        assert va[k] == pytest.approx(vb[k], abs=tol), k
    sa, sb = stats_of(a), stats_of(b)
    assert sa["images"] == sb["images"]
    ca = {(c["class"], c["images"]): np.array(c["map"]) for c in sa["class_maps"]}
    cb = {(c["class"], c["images"]): np.array(c["map"]) for c in sb["class_maps"]}
    assert ca.keys() == cb.keys()
    for k in ca:
        np.testing.assert_allclose(ca[k], cb[k], atol=tol)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("stats-photos")
    rng = np.random.default_rng(7)
    paths = []
    for i in range(8):
        p = root / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (120 + 10 * i, 170 - 5 * i, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_report_files_counts_and_exit_code(photos: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for p in photos[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    out = tmp_path / "report"
    code, stdout, stderr = invoke(["stats", str(folder), "-o", str(out), *MODEL, "--batch-size", "3", "--json"])
    assert code == 1, stderr  # one input failed, the others are counted
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [r["status"] for r in lines[:-1]].count("ok") == 4
    assert next(r for r in lines[:-1] if r["status"] == "error")["error"] == "not an image"
    report = lines[-1]
    assert report["images"] == 4 and report["report"] == str(out)
    errors = [ln for ln in stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert stderr.splitlines()[-1] == "processed 4, skipped 0, failed 1 (of 5)"
    for name, path in report["files"].items():
        assert Path(path).is_file(), name
    csv_lines = Path(report["files"]["heads"]).read_text().splitlines()
    assert len(csv_lines) == 1 + DEPTH * HEADS
    header = csv_lines[0].split(",")
    assert header[:2] == ["block", "head"]
    assert {"distance_px_mean", "distance_px_std", "entropy_mean", "prefix_mass_mean", "sink_share"} <= set(header)
    stats = stats_of(out)
    assert stats["images"] == 4 and stats["failed"] == 1
    assert stats["settings"]["blocks"] == list(range(DEPTH)) and stats["model"]["grid"] == list(GRID)
    assert stats["class_maps"][0]["label"] == "all images" and stats["class_maps"][0]["images"] == 4
    assert sum(c["images"] for c in stats["class_maps"][1:]) == 4  # top-1 of each image, at most 20 shown
    assert "Dosovitskiy" in stats["definitions"]["distance_px"]

    # a rerun counts nothing twice: every input is skipped, the numbers stay
    before = values(out)
    code, stdout, stderr = invoke(["stats", str(folder), "-o", str(out), *FAST])
    assert code == 1 and "processed 0, skipped 4, failed 1 (of 5)" in stderr
    assert values(out) == before and stdout.strip() == str(out)

    # other settings into the same report: a usage error naming what differs
    code, _, stderr = invoke(["stats", str(folder), "-o", str(out), *FAST, "-b", "-1"])
    assert code == 2 and "blocks" in stderr and len(stderr.strip().splitlines()) == 1
    # --overwrite starts afresh with the new settings
    code, _, stderr = invoke(["stats", str(folder), "-o", str(out), *FAST, "-b", "-1", "--overwrite"])
    assert code == 1 and "processed 4, skipped 0, failed 1 (of 5)" in stderr
    assert stats_of(out)["settings"]["blocks"] == [DEPTH - 1] and stats_of(out)["images"] == 4
    assert len(list((out / "partial").glob("part-*.json"))) == 1


def test_a_second_run_into_a_busy_report_fails_at_once(photos: list[Path], tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "report"
    (out / "partial").mkdir(parents=True)
    with open(out / "partial" / ".lock", "w") as held:  # another run holds the report
        fcntl.flock(held, fcntl.LOCK_EX)
        code, _, stderr = invoke(["stats", str(photos[0]), "-o", str(out), *FAST])
    assert code == 3 and "another vitattn stats run" in stderr
    assert not list((out / "partial").glob("part-*.json"))
    assert invoke(["stats", str(photos[0]), "-o", str(out), *FAST])[0] == 0  # released: it runs


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    code, _, stderr = invoke(["stats", "--merge", "-o", str(tmp_path / "r")])
    assert code == 2 and "no inputs" in stderr
    code, _, stderr = invoke(["stats", "--merge", str(tmp_path), "-o", str(tmp_path / "r")])
    assert code == 2 and "no statistics" in stderr
    code, _, stderr = invoke(["stats", str(tmp_path), "-o", str(tmp_path / "r"), *MODEL, "-b", "9"])
    assert code == 2 and "--block" in stderr and "0..5" in stderr


def test_merge_of_two_reports_equals_one_run(photos: list[Path], tmp_path: Path) -> None:
    names = [str(p) for p in photos]
    whole, a, b, merged = (tmp_path / n for n in ("whole", "a", "b", "merged"))
    assert invoke(["stats", *names, "-o", str(whole), *FAST, "--batch-size", "3"])[0] == 0
    assert invoke(["stats", *names[:5], "-o", str(a), *FAST, "--batch-size", "3"])[0] == 0
    assert invoke(["stats", *names[5:], "-o", str(b), *FAST, "--batch-size", "3"])[0] == 0
    code, stdout, stderr = invoke(["stats", "--merge", str(a), str(b), "-o", str(merged), "--json"])
    assert code == 0, stderr
    assert json.loads(stdout)["images"] == 8
    assert_same_report(whole, merged)
    assert (merged / "class_maps.png").is_file()
    # merging a report with one that counts the same inputs would count them twice: refused
    code, _, stderr = invoke(["stats", "--merge", str(a), str(whole), "-o", str(tmp_path / "twice")])
    assert code == 2 and "twice" in stderr
    # the merged report merges on: it holds the inputs it counts
    code, _, stderr = invoke(["stats", "--merge", str(merged), str(a), "-o", str(tmp_path / "again")])
    assert code == 2 and "twice" in stderr


@pytest.mark.subprocess
def test_sigint_then_resume_equals_an_uninterrupted_run(photos: list[Path], tmp_path: Path) -> None:
    many = []
    for i in range(3):  # 24 distinct files
        for p in photos:
            q = tmp_path / "in" / f"{i}-{p.name}"
            q.parent.mkdir(exist_ok=True)
            q.write_bytes(p.read_bytes())
            many.append(q)
    listing = b"".join(os.fsencode(p) + b"\n" for p in many)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["stats", "-", "-o", str(tmp_path / "cut"), *FAST, "--batch-size", "2", "--json"]
    cmd = [sys.executable, "-m", "vitattn", *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    # half the list, then the run waits for more paths: interrupt it there, mid-run
    proc.stdin.write(listing[: len(listing) // 2])
    proc.stdin.flush()
    done = 0
    deadline = time.monotonic() + 240
    while done < 4 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else b""
        done += json.loads(line)["status"] == "ok"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()
    assert b"interrupted" in stderr
    parts = list((tmp_path / "cut" / "partial").glob("part-*.json"))
    counted = sum(len(json.loads(p.read_text())["inputs"]) for p in parts)
    assert counted >= 4 and not (tmp_path / "cut" / "stats.json").exists()

    code, _, stderr_text = invoke(args, stdin=listing)  # the same command again: resumes
    assert code == 0, stderr_text
    assert f"skipped {counted}, failed 0 (of 24)" in stderr_text
    code, _, stderr_text = invoke([*args[:3], str(tmp_path / "whole"), *args[4:]], stdin=listing)
    assert code == 0, stderr_text
    assert stats_of(tmp_path / "cut")["images"] == 24
    assert_same_report(tmp_path / "cut", tmp_path / "whole")


def _npy_arrays(stdout: str) -> list[dict[int, np.ndarray]]:
    """Per input (in order): block -> the (heads, gh, gw) array its JSON record names."""
    arrays = []
    for line in stdout.splitlines():
        rec = json.loads(line)
        arrays.append({b["block"]: np.load(b["files"]["npy"]).astype(np.float64) for b in rec["blocks"]})
    return arrays


def test_statistics_equal_heatmap_npy_arrays_and_unfused_attention(photos: list[Path], tmp_path: Path) -> None:
    names = [str(p) for p in photos[:5]]
    report = tmp_path / "report"
    assert invoke(["stats", *names, "-o", str(report), *FAST, "--top-k", "0"])[0] == 0
    got = values(report)
    n = len(names)
    # the second path: heatmap's arrays of the class token's row, and of the mean patch query's row
    code, cls_out, err = invoke(
        ["heatmap", *names, "-o", str(tmp_path / "cls"), *MODEL, "--npy", "-b", "all", "--json", "--top-k", "0"]
    )
    assert code == 0, err
    code, pm_out, err = invoke(
        [
            "heatmap",
            *names,
            "-o",
            str(tmp_path / "pm"),
            *MODEL,
            "--npy",
            "-b",
            "all",
            "--json",
            "--top-k",
            "0",
            "--query",
            "patch-mean",
        ]
    )
    assert code == 0, err
    cls_rows, pm_rows = _npy_arrays(cls_out), _npy_arrays(pm_out)
    assert len(cls_rows) == len(pm_rows) == n
    m = GRID[0] * GRID[1]
    for b in range(DEPTH):
        cls = np.stack([r[b].reshape(HEADS, m) for r in cls_rows])  # (n, H, M)
        pm = np.stack([r[b].reshape(HEADS, m) for r in pm_rows])  # (n, H, M)
        q = cls / cls.sum(axis=-1, keepdims=True)
        entropy = -(q * np.log(q)).sum(axis=-1) / np.log(m)  # (n, H)
        query_prefix = 1.0 - cls.sum(axis=-1)
        prefix = 1.0 - pm.sum(axis=-1)
        peaks = cls.argmax(axis=-1)  # (n, H)
        for h in range(HEADS):
            assert got[(b, h, "entropy")] == pytest.approx((entropy[:, h].mean(), entropy[:, h].std()), abs=1e-6)
            assert got[(b, h, "query_prefix_mass")][0] == pytest.approx(query_prefix[:, h].mean(), abs=1e-6)
            assert got[(b, h, "prefix_mass")][0] == pytest.approx(prefix[:, h].mean(), abs=1e-6)
            assert got[(b, h, "sink")][0] == np.bincount(peaks[:, h]).max() / n

    # distance needs every patch query's full row: timm's own unfused attention on the same model input
    from vitattn.decoding import load_image
    from vitattn.models import load_model
    from vitattn.preprocess import photo_tensor, tensor_transform

    loaded = load_model("test_vit", pretrained=False, device="cpu")
    fast = tensor_transform(loaded.transform)
    assert fast is not None
    x = torch.stack([fast(photo_tensor(load_image(p).image)) for p in names])  # type: ignore[misc]
    with torch.inference_mode():
        ref = recorded_attention(loaded.model, x, grad=False)[1]
    rr, cc = np.divmod(np.arange(m), GRID[1])
    ps = loaded.layout.patch_size
    dist = np.hypot((rr[:, None] - rr[None]) * ps[0], (cc[:, None] - cc[None]) * ps[1])  # (M, M) pixels
    for b, attn in enumerate(ref):
        pp = attn.double().numpy()[:, :, 1:, 1:]  # (n, H, M, M)
        pp = pp / pp.sum(axis=-1, keepdims=True)
        d = (pp * dist).sum(axis=-1).mean(axis=-1)  # (n, H)
        for h in range(HEADS):
            assert got[(b, h, "distance_px")] == pytest.approx((d[:, h].mean(), d[:, h].std()), rel=1e-4, abs=1e-5)
            assert got[(b, h, "distance_patches")][0] == pytest.approx(d[:, h].mean() / ps[0], rel=1e-4)


def test_python_api_returns_what_the_cli_writes(photos: list[Path], tmp_path: Path) -> None:
    from vitattn.models import load_model
    from vitattn.stats_run import dataset_stats

    out = tmp_path / "report"
    assert invoke(["stats", *map(str, photos[:4]), "-o", str(out), *FAST, "--batch-size", "2"])[0] == 0
    written = stats_of(out)
    got = dataset_stats(load_model("test_vit", pretrained=False, device="cpu"), photos[:4], batch_size=2).to_json()
    assert got["settings"] == written["settings"] and got["images"] == written["images"] == 4
    assert got["model"] == written["model"]
    for b_got, b_written in zip(got["blocks"], written["blocks"], strict=True):
        for h_got, h_written in zip(b_got["heads"], b_written["heads"], strict=True):
            for name, v in h_written.items():
                if isinstance(v, dict) and "mean" in v:
                    assert h_got[name]["mean"] == pytest.approx(v["mean"], abs=1e-7), name
            assert h_got["sink"] == h_written["sink"]
    assert [(c["class"], c["images"]) for c in got["class_maps"]] == [
        (c["class"], c["images"]) for c in written["class_maps"]
    ]


def test_plots_open_have_their_size_and_are_not_blank(photos: list[Path], tmp_path: Path) -> None:
    from vitattn.stats_plots import CLASS_COLUMNS, CLASS_TILE, DISTANCE_SIZE, DPI, TABLE_PANEL

    out = tmp_path / "report"
    assert invoke(["stats", *map(str, photos[:3]), "-o", str(out), *MODEL])[0] == 0
    shown = len(stats_of(out)["class_maps"])
    cols = min(CLASS_COLUMNS, shown)
    rows = -(-shown // cols)
    sizes = {
        "attention_distance.png": (DISTANCE_SIZE[0] * DPI, DISTANCE_SIZE[1] * DPI),
        "entropy.png": (TABLE_PANEL[0] * DPI, TABLE_PANEL[1] * DPI),
        "prefix_mass.png": (TABLE_PANEL[0] * DPI, TABLE_PANEL[1] * DPI),  # class token only: one table
        "class_maps.png": ((CLASS_TILE * cols + 0.6) * DPI, (CLASS_TILE * rows + 0.9) * DPI),
    }
    for name, (w, h) in sizes.items():
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == (round(w), round(h)), name
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        assert pixels.std() > 10, f"{name} is blank"
        assert (pixels.reshape(-1, 3) < 200).any(axis=1).mean() > 0.01, f"{name}: almost nothing drawn"


@pytest.mark.slow
def test_demo_class_maps_peak_on_the_objects_more_than_random_weights() -> None:
    from vitattn.demo.synthetic import HELDOUT_SEED_BASE, make_picture
    from vitattn.models import load_model
    from vitattn.stats_run import dataset_stats

    pictures = [make_picture(HELDOUT_SEED_BASE + 7000 + i) for i in range(160)]
    side = pictures[0].image.width
    results = {}
    for pretrained in (True, False):
        loaded = load_model("demo", pretrained=pretrained, device="cpu")
        gh, gw = loaded.grid
        hits = []
        for quadrant in range(4):  # objects centred in one quadrant: a region the average map can show
            chosen = []
            for p in pictures:
                left, top, right, bottom = p.box
                q = 2 * ((top + bottom) / 2 >= side / 2) + ((left + right) / 2 >= side / 2)
                if q == quadrant:
                    chosen.append(p)
            coverage = np.mean([p.mask for p in chosen], axis=0)  # (H, W) share of pictures with object there
            cells = coverage.reshape(gh, side // gh, gw, side // gw).mean(axis=(1, 3))  # (gh, gw)
            stats = dataset_stats(loaded, [p.image for p in chosen])
            for entry in stats.class_maps():
                peak = np.unravel_index(int(np.argmax(entry["map"])), entry["map"].shape)
                hits.append(bool(cells[peak] >= 0.5))  # the peak lies in the average object region
        results[pretrained] = float(np.mean(hits))
    assert results[True] >= 0.8, results
    assert results[True] > results[False] + 0.15, results


def test_the_same_file_twice_is_counted_once(photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["stats", str(photos[0]), str(photos[1]), str(photos[0]), "-o", str(out), *FAST, "--json"]
    code, stdout, stderr = invoke(args)
    assert code == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["status"], r.get("duplicate_of")) for r in lines[:-1]] == [
        ("ok", None),
        ("ok", None),
        ("skipped", str(photos[0])),
    ]
    assert lines[-1]["images"] == 2 and stats_of(out)["images"] == 2


def test_families_beyond_plain_vit_read_their_self_attention_blocks_or_are_refused(
    photos: list[Path], tmp_path: Path
) -> None:
    # test_vit3: 9 self-attention blocks, then an attention-pool head (its own query, over another token set)
    out = tmp_path / "pool"
    code, _, stderr = invoke(
        ["stats", str(photos[0]), "-o", str(out), "-m", "test_vit3", "--no-pretrained", "--no-plots"]
    )
    assert code == 0, stderr
    report = stats_of(out)
    assert [b["block"] for b in report["blocks"]] == list(range(9))  # the pool head is not a self-attention block
    assert report["settings"]["query"] == "patch-mean"  # no class token: the mean patch query
    code, _, stderr = invoke(
        ["stats", str(photos[0]), "-o", str(tmp_path / "p2"), "-m", "test_vit3", "--no-pretrained", "-b", "9"]
    )
    assert code == 2 and "block 9 is a pool-attention block" in stderr, stderr
