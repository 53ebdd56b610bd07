"""Problems that would make every input fail are found at model load: exit 3, one line naming the file or value.

Bad ``local-dir:`` model folders are built in tmp_path from the bundled demo model's own files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from vitattn.cli import app
from vitattn.demo import DEMO_MODEL_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
WEIGHTS = "model.safetensors"


def invoke(args: list[str]) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout_bytes, result.stderr


def model_folder(root: Path, name: str, *, config: Callable[[dict[str, Any]], Any] | None = None,
                 weights: Callable[[bytes], bytes] | None = None, raw_config: str | None = None) -> Path:
    """A copy of the demo model's folder, its config.json and weights changed by the given functions."""
    folder = root / name
    folder.mkdir()
    cfg = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    if config is not None:
        config(cfg)
    (folder / "config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg))
    data = (DEMO_MODEL_DIR / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights(data) if weights is not None else data)
    return folder


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (120, 40, 200)).save(path)
    return path


def assert_fatal(args: list[str], out: Path, *names: str) -> str:
    code, stdout, stderr = invoke(["heatmap", *args, "-o", str(out)])
    assert code == 3, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("vitattn: error:")]
    assert len(errors) == 1 and stderr.count("\n") == 1, stderr  # one line, and no per-input failures
    assert "internal error" not in stderr and "Traceback" not in stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert stdout == b"" and not out.exists()  # found before anything is written
    return errors[0]


def _pcfg(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda cfg: cfg["pretrained_cfg"].update(values)


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("mean-length", _pcfg(mean=[0.5, 0.5]), "mean must have one value per channel (3), got [0.5, 0.5]"),
        ("std-zero", _pcfg(std=[0.5, 0.0, 0.5]), "std must be above 0"),
        ("std-nan", _pcfg(std=[0.5, "x", 0.5]), "std must be finite numbers"),
        ("crop-negative", _pcfg(crop_pct=-1), "crop_pct must be a number above 0"),
        ("interpolation", _pcfg(interpolation="cubic-ish"), "unknown interpolation 'cubic-ish'"),
        ("model-args", lambda cfg: cfg["model_args"].update(no_such_arg=1), "no_such_arg"),
        ("architecture", lambda cfg: cfg.update(architecture="vit_tinyy_patch16_224"), "unknown architecture"),
    ],
)
def test_bad_model_config_is_fatal(tmp_path: Path, photo: Path, case: str, change: Any, message: str) -> None:
    folder = model_folder(tmp_path, case, config=change)
    line = assert_fatal(["-m", f"local-dir:{folder}", str(photo)], tmp_path / "out", message)
    assert str(folder) in line  # the model named


def test_invalid_config_json_names_the_file(tmp_path: Path, photo: Path) -> None:
    folder = model_folder(tmp_path, "badjson", raw_config='{"architecture": "vit_tiny_patch16_224",')
    line = f"{folder / 'config.json'}: not valid JSON"
    assert_fatal(["-m", f"local-dir:{folder}", str(photo)], tmp_path / "out", line)


@pytest.mark.parametrize(
    ("case", "damage", "message"),
    [
        ("truncated", lambda data: data[: len(data) // 2], "damaged safetensors file"),
        ("header-cut", lambda data: data[:40], "truncated safetensors file"),
        ("zeroed-header", lambda data: b"\0" * 64 + data[64:], "not a checkpoint"),
        ("empty", lambda data: b"", "an empty file"),
    ],
)
def test_corrupt_weights_in_a_model_folder_are_fatal(
    tmp_path: Path, photo: Path, case: str, damage: Callable[[bytes], bytes], message: str
) -> None:
    folder = model_folder(tmp_path, case, weights=damage)
    assert_fatal(["-m", f"local-dir:{folder}", str(photo)], tmp_path / "out", str(folder / WEIGHTS), message)


def test_a_non_checkpoint_weights_file_says_so(tmp_path: Path, photo: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    line = f"weights file {text}: not a checkpoint"
    assert_fatal(["-m", "demo", "--weights", str(text), str(photo)], tmp_path / "out", line)
    as_json = tmp_path / "config.safetensors"
    as_json.write_text('{"a": 1}')
    assert_fatal(["-m", "demo", "--weights", str(as_json), str(photo)], tmp_path / "out", "not a checkpoint")


def test_missing_local_dir_and_hub_names(tmp_path: Path, photo: Path) -> None:
    missing = tmp_path / "no" / "model"
    assert_fatal(["-m", f"local-dir:{missing}", str(photo)], tmp_path / "out", f"no such folder {missing}")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_fatal(["-m", f"local-dir:{afile}", str(photo)], tmp_path / "out", "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_fatal(["-m", f"local-dir:{empty}", str(photo)], tmp_path / "out", "no config.json")
    for spec in ("hf-hub:../../x", "hf-hub:a/b/c", "hf-hub:"):
        assert_fatal(["-m", spec, str(photo)], tmp_path / "out", spec, "not a Hugging Face hub repository name")


def test_no_weights_in_a_model_folder(tmp_path: Path, photo: Path) -> None:
    folder = model_folder(tmp_path, "noweights")
    (folder / WEIGHTS).unlink()
    assert_fatal(["-m", f"local-dir:{folder}", str(photo)], tmp_path / "out", "no weights file")
    code, _, stderr = invoke(["heatmap", "-m", f"local-dir:{folder}", "--no-pretrained", str(photo),
                              "-o", str(tmp_path / "random")])
    assert code == 0, stderr  # random weights need no file


def test_data_config_checked_for_a_callers_module() -> None:
    import timm

    import vitattn
    from vitattn.errors import ModelError

    model = timm.create_model("test_vit", pretrained=False)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5, 0.5)}
    with pytest.raises(ModelError, match="mean must have one value per channel"):
        vitattn.wrap_model(model)


@pytest.mark.subprocess
def test_closed_and_full_stdout_are_fatal(tmp_path: Path, photo: Path) -> None:
    base = [sys.executable, "-m", "vitattn", "heatmap", "-m", "demo", str(photo)]
    closed = subprocess.run([*base, "-o", str(tmp_path / "a")], stdout=subprocess.DEVNULL, capture_output=False,
                            stderr=subprocess.PIPE, env=ENV, timeout=120, close_fds=True,
                            preexec_fn=lambda: os.close(1))
    err = closed.stderr.decode()
    assert closed.returncode == 3 and err.count("\n") == 1 and "stdout is closed" in err, err
    assert not (tmp_path / "a").exists()  # refused before the model loads
    if not os.path.exists("/dev/full"):
        return
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*base, "-o", str(tmp_path / "b"), "--json"], stdout=full, stderr=subprocess.PIPE,
                              env=ENV, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 3, err
    assert "vitattn: error: cannot write to stdout: No space left on device" in err
    assert "internal error" not in err and "Traceback" not in err
    # the result written before the report failed is counted, not lost
    assert err.splitlines()[-1] == "processed 1, skipped 0, failed 0 (of 1)"


def test_huge_max_side_keeps_the_photo_size(tmp_path: Path, photo: Path) -> None:
    code, stdout, stderr = invoke(["heatmap", "-m", "demo", str(photo), "-o", str(tmp_path / "o"),
                                   "--max-side", "1000000000", "--json"])
    assert code == 0, stderr
    record = json.loads(stdout)
    for name in [*record["files"]["heads"], record["files"]["mean"]]:
        with Image.open(name) as im:
            assert im.size == (64, 64)  # --max-side caps and never enlarges


def test_copy_of_the_demo_folder_still_loads(tmp_path: Path, photo: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    code, _, stderr = invoke(["heatmap", "-m", f"local-dir:{folder}", str(photo), "-o", str(tmp_path / "o")])
    assert code == 0, stderr  # the checks do not refuse a good folder
