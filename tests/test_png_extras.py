"""PNG corners: a 16-bit grey tRNS key is composited like an 8-bit one; large metadata chunks are a warning."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitattn.decoding import BACKGROUND, load_image


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(width: int, height: int, depth: int, colour_type: int, rows: bytes, before_idat: bytes = b"",
        after_idat: bytes = b"") -> bytes:
    """A PNG written by hand (no encoder involved): each row of ``rows`` already starts with its filter byte."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header), before_idat, chunk(b"IDAT", zlib.compress(rows)),
                     after_idat, chunk(b"IEND", b"")))


def grey_rows(values: np.ndarray, depth: int) -> bytes:
    fmt = ">" + ("H" if depth == 16 else "B") * values.shape[1]
    return b"".join(b"\x00" + struct.pack(fmt, *map(int, row)) for row in values)


def test_16_bit_grey_with_a_transparency_key_is_composited_like_8_bit(tmp_path: Path) -> None:
    grey8 = np.array([[0, 50, 100], [150, 200, 50]], dtype=np.uint16)
    key8 = 50
    eight = tmp_path / "g8.png"
    eight.write_bytes(png(3, 2, 8, 0, grey_rows(grey8, 8), chunk(b"tRNS", struct.pack(">H", key8))))
    sixteen = tmp_path / "g16.png"
    grey16 = grey8 * 257  # the same levels in 16 bits (v * 257 maps 0..255 onto 0..65535 exactly)
    sixteen.write_bytes(png(3, 2, 16, 0, grey_rows(grey16, 16), chunk(b"tRNS", struct.pack(">H", key8 * 257))))
    with Image.open(sixteen) as im:
        assert im.mode.startswith("I") and im.info["transparency"] == key8 * 257  # what Pillow leaves to us
    got8 = np.asarray(load_image(str(eight)).image)
    got16 = np.asarray(load_image(str(sixteen)).image)
    # written out: keyed pixels are the background, the others their grey level
    expected = np.where((grey8 == key8)[..., None], np.array(BACKGROUND), grey8[..., None]).astype(np.uint8)
    np.testing.assert_array_equal(got8, expected)
    np.testing.assert_array_equal(got16, expected)


def test_16_bit_grey_key_that_matches_nothing_changes_nothing(tmp_path: Path) -> None:
    values = np.array([[0, 65535]], dtype=np.uint16)
    path = tmp_path / "g.png"
    path.write_bytes(png(2, 1, 16, 0, grey_rows(values, 16), chunk(b"tRNS", struct.pack(">H", 1234))))
    np.testing.assert_array_equal(np.asarray(load_image(str(path)).image), [[[0, 0, 0], [255, 255, 255]]])


@pytest.mark.parametrize(
    ("kind", "payload", "where"),
    [
        (b"iCCP", b"profile\0\0" + zlib.compress(b"\0" * (3 << 20)), "before"),  # a 3 MB colour profile
        (b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (3 << 20)), "before"),
        (b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (3 << 20)), "after"),
        (b"iTXt", b"Comment\0\1\0\0\0" + zlib.compress(b"a" * (3 << 20)), "before"),
    ],
)
def test_large_metadata_is_a_warning_not_a_failure(tmp_path: Path, kind: bytes, payload: bytes, where: str) -> None:
    pixels = np.array([[[10, 20, 30], [200, 100, 0]]], dtype=np.uint8)
    rows = b"\x00" + pixels.tobytes()
    extra = chunk(kind, payload)
    path = tmp_path / "big-metadata.png"
    path.write_bytes(png(2, 1, 8, 2, rows, **({"before_idat": extra} if where == "before" else {"after_idat": extra})))
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK"), Image.open(path) as im:  # what Pillow does with it
        im.load()
    loaded = load_image(str(path))
    np.testing.assert_array_equal(np.asarray(loaded.image), pixels)
    assert loaded.warnings == [f"large metadata ignored ({kind.decode()} chunks over Pillow's size limit)"]


def test_large_metadata_end_to_end_is_a_warning(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vitattn.cli import app

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    path = tmp_path / "p.png"
    path.write_bytes(png(64, 64, 8, 2, rows, chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * (2 << 20)))))
    result = CliRunner().invoke(app, ["heatmap", str(path), "-o", str(tmp_path / "o"), "-m", "demo"])
    assert result.exit_code == 0, result.stderr
    assert f"vitattn: warning: {path}: large metadata ignored (iCCP chunks" in result.stderr
