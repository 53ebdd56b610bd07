"""The CLI contract: names, output layout, JSON records, stdin lists, exit codes, stdout only data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import result_folder
from PIL import Image
from typer.testing import CliRunner

from vitattn.cli import app

MODEL = ["-m", "test_vit", "--no-pretrained"]  # random weights: 6 blocks, 2 heads, 10x10 grid at 160 px


def run(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vitattn", *args], input=stdin, capture_output=True, env=env, timeout=300
    )


def invoke(args: list[str], stdin: bytes | None = None) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(app, args, input=stdin)
    return result.exit_code, result.stdout_bytes, result.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "cats").mkdir()
    Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)).save(root / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (260, 90, 3), dtype=np.uint8)).save(root / "cats" / "tom.PNG")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "cats" / "small.webp")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.subprocess
def test_version_and_help() -> None:
    from vitattn import __version__

    code, out, _ = invoke(["--version"])
    assert code == 0 and out.decode().strip() == f"vitattn {__version__}"
    proc = run(["--help"])
    assert proc.returncode == 0 and b"heatmap" in proc.stdout and b"info" in proc.stdout


@pytest.mark.subprocess
def test_help_does_not_import_torch() -> None:
    code = "import sys, vitattn.cli; assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_folder_run_writes_the_documented_layout(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    code, stdout, stderr = invoke(["heatmap", str(photos), "-r", "-o", str(out), *MODEL, "--npy", "--top-k", "3"])
    assert code == 0, stderr
    folders = stdout.decode().splitlines()
    inputs = ("wide.jpg", "cats/tom.PNG", "cats/small.webp")
    assert sorted(folders) == sorted(str(result_folder(out, photos / r)) for r in inputs)
    folder = result_folder(out, photos / "cats" / "tom.PNG")
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not the lock file
    assert names == sorted(
        ["block5_head0.png", "block5_head1.png", "block5_mean.png", "block5_grid.png", "block5_attn.npy", "meta.json"]
    )
    arr = np.load(folder / "block5_attn.npy")
    assert arr.dtype == np.float32 and arr.shape == (2, 10, 10)
    assert np.all(arr >= 0) and np.all(arr.sum(axis=(1, 2)) <= 1.0 + 1e-5)  # probabilities, prefix excluded
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["blocks"] == [5] and meta["query"] == "cls" and meta["grid"] == [10, 10]
    assert meta["image_size"] == [90, 260]
    assert meta["model"]["prefix_tokens"] == [{"index": 0, "role": "cls"}]
    assert len(meta["top"]) == 3 and meta["top"][0]["label"]  # ImageNet labels from timm
    assert set(meta["files"]) == set(names)
    assert "processed 3, skipped 0, failed 0 (of 3)" in stderr
    with Image.open(folder / "block5_head0.png") as im:
        assert max(im.size) == 512 and im.size[1] > im.size[0]  # portrait photo stays portrait
    assert not any(".vitattn-tmp-" in p.name for p in out.rglob("*"))


def test_json_records_and_stdin_lists(photos: Path, tmp_path: Path) -> None:
    files = [photos / "wide.jpg", photos / "cats" / "tom.PNG", photos / "missing.jpg"]
    out = tmp_path / "o"
    for sep, flag in ((b"\n", []), (b"\0", ["-0"])):
        stdin = sep.join(os.fsencode(f) for f in files) + sep
        code, stdout, stderr = invoke(["heatmap", "-", "--json", "-o", str(out), *MODEL, *flag, "-b", "2"], stdin)
        assert code == 1, stderr  # one input failed
        records = [json.loads(line) for line in stdout.decode().splitlines()]
        assert [r["status"] for r in records] == (
            ["ok", "ok", "error"] if not flag else ["skipped", "skipped", "error"]
        )
        ok = records[0]
        assert set(ok) >= {"input", "status", "model", "block", "query", "grid", "heads", "files", "top"}
        assert ok["block"] == 2 and ok["heads"] == [0, 1] and ok["grid"] == [10, 10]
        assert set(ok["files"]) == {"heads", "mean", "grid", "meta"}
        assert all(Path(p).is_file() for p in [*ok["files"]["heads"], ok["files"]["mean"], ok["files"]["meta"]])
        assert records[2]["error"] == "no such file"
        assert f"vitattn: error: {files[2]}: no such file" in stderr
        assert "failed 1 (of 3)" in stderr


def test_query_heads_and_format_options(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = ["heatmap", str(photos / "wide.jpg"), "-o", str(out), *MODEL, "--heads", "1", "--query", "patch:2,3"]
    code, stdout, stderr = invoke([*args, "--format", "jpg", "--max-side", "0", "--top-k", "0", "--json"])
    assert code == 0, stderr
    rec = json.loads(stdout)
    assert rec["query"] == "patch:2,3" and rec["heads"] == [1] and rec["top"] == []
    with Image.open(rec["files"]["mean"]) as im:
        assert im.format == "JPEG" and im.size == (200, 120)  # --max-side 0: original size


@pytest.mark.parametrize(("max_side", "size"), [("0", (1400, 1000)), ("512", (512, 366)), ("600", (600, 429))])
def test_large_jpeg_overlays_keep_the_asked_resolution(tmp_path: Path, max_side: str, size: tuple[int, int]) -> None:
    # JPEGs are decoded at a reduced scale when that is enough; never below what --max-side asks for.
    rng = np.random.default_rng(0)
    photo = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (1000, 1400, 3), dtype=np.uint8)).save(photo, quality=80)
    out = tmp_path / max_side
    args = ["heatmap", str(photo), "-o", str(out), *MODEL, "--max-side", max_side, "--top-k", "0", "--json"]
    code, stdout, stderr = invoke(args)
    assert code == 0, stderr
    rec = json.loads(stdout)
    for name in [*rec["files"]["heads"], rec["files"]["mean"]]:
        with Image.open(name) as im:
            assert im.size == size  # 0: the photo's own size, not that of a reduced decode


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-b", "6"], 2, "block 6 is out of range"),
        (["--heads", "0,7"], 2, "head 7 is out of range"),
        (["--query", "dist"], 2, "no dist token"),
        (["--query", "patch:0,10"], 2, "outside the 10×10 grid"),
        (["--cmap", "infernoo"], 2, "inferno"),
        (["--format", "gif"], 2, "--format"),
        (["-m", "vit_tiny_patch16_2244"], 2, "did you mean"),
        (["-m", "test_convnext"], 2, "not supported"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nope"], 2, "device"),
        (["--device", "hpu"], 2, "--device: hpu: not a device vitattn runs on"),
        (["--device", "meta"], 2, "--device: meta: not a device vitattn runs on"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(
    photos: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    out = tmp_path / "never"
    base = ["heatmap", str(photos / "wide.jpg"), "-o", str(out), "--no-pretrained"]
    if "-m" not in args:
        base += ["-m", "test_vit"]
    got, stdout, stderr = invoke([*base, *args])
    assert got == code, stderr
    assert message in stderr and stderr.count("vitattn: error:") == 1
    assert stdout == b"" and not out.exists()


@pytest.mark.subprocess
def test_offline_pretrained_weights_name_the_ways_out(photos: Path, tmp_path: Path) -> None:
    proc = run(["heatmap", str(photos / "wide.jpg"), "-o", str(tmp_path / "x"), "-m", "test_vit"])
    assert proc.returncode == 3
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("vitattn: error: cannot fetch pretrained weights for test_vit")
    assert "network" in err and "--weights" in err and "local-dir:" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_weights_file_wrappers_and_mismatch(photos: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("test_vit", pretrained=False)
    state = model.state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    torch.save(timm.create_model("test_vit2", pretrained=False).state_dict(), tmp_path / "other.pth")
    (tmp_path / "junk.bin").write_bytes(b"\x00not a checkpoint")
    arrays = []
    for name in ("w.safetensors", "w.pth"):
        out = tmp_path / name.replace(".", "_")
        args = ["heatmap", str(photos / "wide.jpg"), "-m", "test_vit", "--weights", str(tmp_path / name)]
        code, _, stderr = invoke([*args, "-o", str(out), "--npy"])
        assert code == 0, stderr
        folder = result_folder(out, photos / "wide.jpg")
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["settings"]["weights"] == str(tmp_path / name)
        arrays.append(np.load(folder / "block5_attn.npy"))
    np.testing.assert_array_equal(arrays[0], arrays[1])  # same weights through both wrappers
    code, _, stderr = invoke(
        ["heatmap", str(photos / "wide.jpg"), "-m", "test_vit", "--weights", str(tmp_path / "other.pth")]
    )
    assert code == 3 and "does not fit the model" in stderr and "missing keys" in stderr and "unexpected keys" in stderr
    code, _, stderr = invoke(
        ["heatmap", str(photos / "wide.jpg"), "-m", "test_vit", "--weights", str(tmp_path / "junk.bin")]
    )
    assert code == 3 and "cannot read it" in stderr


def test_info_and_models() -> None:
    code, stdout, stderr = invoke(["info", "vit_small_patch14_reg4_dinov2", "--json"])
    assert code == 0, stderr
    d = json.loads(stdout)
    assert d["grid"] == [37, 37] and d["patch_size"] == [14, 14] and d["depth"] == 12 and d["heads"] == 6
    assert [p["role"] for p in d["prefix_tokens"]] == ["cls", "reg0", "reg1", "reg2", "reg3"]
    assert d["input_size"] == [3, 518, 518] and d["crop_pct"] == 1.0
    code, stdout, _ = invoke(["info", "deit_small_distilled_patch16_224"])
    assert code == 0 and "0:cls, 1:dist" in stdout.decode()
    code, stdout, _ = invoke(["models", "*dinov2*"])
    names = stdout.decode().split()
    assert code == 0 and "vit_small_patch14_reg4_dinov2" in names and all("dinov2" in n for n in names)
    code, stdout, _ = invoke(["models", "convnext*"])
    assert stdout == b""


@pytest.mark.subprocess
def test_no_inputs_with_a_terminal_prints_usage() -> None:
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "vitattn", "heatmap"], stdin=follower, capture_output=True, timeout=60
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 2 and b"Usage" in proc.stderr and proc.stdout == b""


def test_cli_default_model_is_the_library_default() -> None:
    from vitattn import cli, models

    assert cli.DEFAULT_MODEL == models.DEFAULT_MODEL  # kept in cli.py so that --help imports nothing heavy


@pytest.mark.subprocess
def test_stdin_list_with_stdin_closed_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vitattn", "heatmap", "-", "-o", str(tmp_path / "o"), *MODEL],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: os.close(0),  # the child starts with no stdin at all
    )
    assert proc.returncode == 2 and b"stdin is closed" in proc.stderr and not (tmp_path / "o").exists()


def _find(haystack: np.ndarray, needle: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``needle`` (h, w, 3) appears exactly in ``haystack``."""
    h, w = needle.shape[:2]
    ys, xs = np.nonzero((haystack[: 1 - h or None, : 1 - w or None] == needle[0, 0]).all(axis=-1))
    corners = [(int(y), int(x)) for y, x in zip(ys, xs, strict=True)]
    return [(y, x) for y, x in corners if np.array_equal(haystack[y : y + h, x : x + w], needle)]


def test_grid_tiles_are_the_written_overlays(tmp_path: Path) -> None:
    """Default size: each grid tile is its overlay file averaged 2x2, pixel for pixel (PNG is lossless).
    Other sizes draw the tiles separately; the grid keeps the same layout."""
    rng = np.random.default_rng(1)
    photo = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo)
    sizes = []
    for max_side in ("512", "300"):
        out = tmp_path / max_side
        code, stdout, stderr = invoke(["heatmap", str(photo), "-o", str(out), *MODEL, "--max-side", max_side,
                                       "--top-k", "0", "--json"])
        assert code == 0, stderr
        rec = json.loads(stdout)
        with Image.open(rec["files"]["grid"]) as im:
            grid = np.asarray(im.convert("RGB"))
        sizes.append(grid.shape)
        for name in [*rec["files"]["heads"], rec["files"]["mean"]]:
            with Image.open(name) as im:
                assert im.size == (int(max_side), int(max_side) * 3 // 4)
                tile = np.asarray(im.reduce(2)) if max_side == "512" else None
            if tile is not None:
                assert len(_find(grid, tile)) == 1, name
    assert sizes[0] == sizes[1]  # 256-px tiles either way


def test_cli_passes_typed_options_to_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI only parses: what it hands the library is typed options, nothing else."""
    import types

    import vitattn.heatmap as heatmap
    from vitattn.options import (
        AttentionOptions,
        HeadFusion,
        ImageFormat,
        InputOptions,
        Method,
        ModelOptions,
        Precision,
        Query,
        QueryKind,
        RenderOptions,
        RunOptions,
    )

    received: dict[str, object] = {}

    def fake_start(**kwargs: object) -> object:
        received.update(kwargs)
        loaded = types.SimpleNamespace(weights="pretrained")
        return types.SimpleNamespace(loaded=loaded, outcomes=lambda: (o for o in ()))

    monkeypatch.setattr(heatmap, "start_heatmap", fake_start)
    args = ["heatmap", "a.jpg", "dir", "-r", "-m", "test_vit", "-b", "3,-1", "-b", "2"]
    args += ["--query", "patch:1,2", "--method", "ROLLOUT", "--fuse", "max", "--discard-ratio", "0.25"]
    args += ["--format", "jpg", "--precision", "bf16", "--cmap", "viridis", "--alpha", "0.3", "--max-side", "0"]
    args += ["-o", str(tmp_path / "o"), "--batch-size", "4", "--top-k", "0", "--max-pixels", "0", "--threshold", "0.5"]
    code, _, stderr = invoke(args)
    assert code == 0, stderr
    assert received["inputs"] == InputOptions(("a.jpg", "dir"), recursive=True)
    assert received["model"] == ModelOptions("test_vit")
    assert received["attention"] == AttentionOptions(
        blocks=(3, -1, 2),
        query=Query(QueryKind.patch, 1, 2),
        method=Method.rollout,
        fuse=HeadFusion.max,
        discard_ratio=0.25,
        top_k=0,
        precision=Precision.bf16,
    )
    assert received["render"] == RenderOptions(
        out=tmp_path / "o", cmap="viridis", alpha=0.3, max_side=0, format=ImageFormat.jpg, threshold=0.5
    )
    assert received["run"] == RunOptions(batch_size=4, max_pixels=None)
    assert received["stdin"] is None


@pytest.mark.subprocess
def test_usage_errors_are_one_line_without_panels() -> None:
    for args in (["heatmap", "x.jpg", "--method", "foo"], ["heatmap", "x.jpg", "--nope"]):
        proc = run(args)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.count("\n") == 1 and err.startswith("vitattn: error: "), err
        assert "╭" not in err


def test_resume_redoes_a_result_with_a_missing_file(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["heatmap", str(photos / "wide.jpg"), "-o", str(out), *MODEL, "--top-k", "0"]
    assert invoke(args)[0] == 0
    gone = result_folder(out, photos / "wide.jpg") / "block5_head1.png"
    gone.unlink()
    code, _, stderr = invoke(args)
    assert code == 0 and "processed 1, skipped 0" in stderr and gone.is_file()
    code, _, stderr = invoke(args)
    assert code == 0 and "processed 0, skipped 1" in stderr


def test_heads_with_rollout_are_refused_and_random_weights_record_their_seed(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "h"
    base = ["heatmap", str(photos / "wide.jpg"), "-o", str(out), *MODEL, "--top-k", "0"]
    code, _, stderr = invoke([*base, "--method", "rollout", "--heads", "0"])
    assert code == 2 and "--heads: choosing heads applies to raw maps only" in stderr and not out.exists()
    code, stdout, stderr = invoke([*base, "--json"])
    assert code == 0, stderr
    meta = json.loads(Path(json.loads(stdout)["files"]["meta"]).read_text())
    assert meta["settings"]["weights"] == "random" and meta["settings"]["seed"] == 0


def test_models_pattern_is_case_insensitive() -> None:
    code, stdout, _ = invoke(["models", "*DINOV2*"])
    names = stdout.decode().split()
    assert code == 0 and names and all("dinov2" in n for n in names)


def test_control_characters_in_error_lines_are_escaped(tmp_path: Path) -> None:
    name = str(tmp_path / "evil\x1b[2Jname\rx.jpg")
    code, _, stderr = invoke(["heatmap", name, "-o", str(tmp_path / "o"), *MODEL])
    assert code == 1 and "\x1b" not in stderr and "\r" not in stderr.replace("\r\n", "\n")
    assert "evil\\x1b[2Jname\\rx.jpg: no such file" in stderr


@pytest.mark.subprocess
def test_offline_hub_specs_fail_fast_in_one_line(tmp_path: Path) -> None:
    import time

    spec = "hf-hub:timm/vit_tiny_patch16_224"
    for args in (["info", spec], ["heatmap", "x.jpg", "-m", spec, "--no-pretrained", "-o", str(tmp_path)]):
        start = time.monotonic()
        proc = run(args)
        took = time.monotonic() - start
        err = proc.stderr.decode()
        assert proc.returncode == 3 and err.count("\n") == 1, err
        assert f"cannot load {spec}: its config and weights come from the Hugging Face hub" in err
        assert took < 30  # an upper bound: the imports alone take a few seconds here; hub retries took ~30 s


def test_debug_shows_the_traceback_of_a_failed_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a")
    for debug, shown in (([], False), (["--debug"], True)):
        code, _, stderr = invoke(["heatmap", str(bad), "-o", str(tmp_path / "o"), *MODEL, *debug])
        assert code == 1 and f"{bad}: corrupt data" in stderr
        assert ("Traceback (most recent call last)" in stderr) is shown, stderr


def test_a_folder_with_sub_folders_without_r_gets_a_hint(photos: Path, tmp_path: Path) -> None:
    args = ["heatmap", str(photos), "-o", str(tmp_path / "o"), *MODEL, "--top-k", "0"]
    code, _, stderr = invoke(args)
    assert code == 0 and f"vitattn: hint: {photos}: 1 sub-folder not searched (descend into them with -r)" in stderr
    code, _, stderr = invoke([*args, "-r"])
    assert code == 0 and "hint" not in stderr


def test_grid_titles_stamp_random_weights() -> None:
    from vitattn.attention import ImageAttention, Prediction
    from vitattn.job import grid_title
    from vitattn.options import Query

    att = ImageAttention(query=Query("cls"), grid=(2, 2), blocks={}, top=[Prediction(3, "tabby", 0.5)])
    assert grid_title("test_vit", "random", 5, att) == "test_vit (RANDOM WEIGHTS) · block 5 · query cls"
    assert grid_title("test_vit", "pretrained", 5, att) == "test_vit · block 5 · query cls · top: tabby (50.0%)"


def test_nan_model_outputs_fail_the_input_by_name_and_json_stays_strict(photos: Path, tmp_path: Path) -> None:
    import vitattn

    loaded = vitattn.load_model("test_vit", pretrained=False, device="cpu")
    with torch.no_grad():
        loaded.model.head.weight.fill_(float("nan"))  # attention stays finite, the class scores do not
    run = vitattn.start_heatmap(
        inputs=vitattn.InputOptions([str(photos / "wide.jpg")]),
        model=loaded,
        render=vitattn.RenderOptions(out=tmp_path),
    )
    [outcome] = list(run.outcomes())
    assert outcome.status == "error" and outcome.record["error"].startswith("non-finite model output")
    from vitattn.outputs import json_line

    assert json.loads(json_line(outcome.record))["status"] == "error"  # strict JSON parses it
    assert not (tmp_path / "wide.jpg").exists()
    with pytest.raises(ValueError):
        json_line({"prob": float("nan")})


def test_models_can_list_only_those_with_pretrained_weights() -> None:
    import timm

    everything = set(invoke(["models", "test_*"])[1].decode().split())
    with_weights = set(invoke(["models", "test_*", "--pretrained"])[1].decode().split())
    expected = {n.split(".")[0] for n in timm.list_models("test_*", pretrained=True)} & everything
    assert with_weights == expected and with_weights < everything  # test_vit4 has no pretrained tag


def test_a_checkpoint_of_another_width_is_named_in_one_short_line(photos: Path, tmp_path: Path) -> None:
    import timm

    other = timm.create_model("test_vit", pretrained=False, embed_dim=48)  # test_vit is 64 wide
    torch.save(other.state_dict(), tmp_path / "narrow.pth")
    args = ["heatmap", str(photos / "wide.jpg"), "-m", "test_vit", "--weights", str(tmp_path / "narrow.pth")]
    code, _, stderr = invoke([*args, "-o", str(tmp_path / "o")])
    lines = [ln for ln in stderr.splitlines() if ln.startswith("vitattn: error:")]
    assert code == 3 and len(lines) == 1 and len(lines[0]) < 300, stderr
    assert "in the file and" in lines[0] and "weights of another model size?" in lines[0]
