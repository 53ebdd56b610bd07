"""Build tricky input files at test time, so that no binary file is committed.

Every builder writes into a folder given by the caller (a pytest ``tmp_path``) and returns
the path it wrote. Pixel values are chosen so that the tests can assert exact results.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# A 4×2 RGB picture with distinct colours, for the lossless formats.
PIXELS = np.array(
    [
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
        [[0, 0, 0], [10, 20, 30], [200, 100, 50], [128, 128, 128]],
    ],
    dtype=np.uint8,
)
LOSSLESS_FORMATS = {"png": "PNG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}


def write(folder: Path, name: str | bytes, data: bytes) -> Path:
    """Write raw bytes; ``name`` may be bytes (a file name that is not valid UTF-8)."""
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    with open(path, "wb") as handle:
        handle.write(data)
    return Path(os.fsdecode(path))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """An image encoded in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb_picture() -> Image.Image:
    return Image.fromarray(PIXELS)


def lossless(folder: Path, ext: str) -> Path:
    """:data:`PIXELS` as PNG, BMP, TIFF or lossless WebP."""
    options: dict[str, object] = {"lossless": True} if ext == "webp" else {}
    return write(folder, f"rgb.{ext}", encode(rgb_picture(), LOSSLESS_FORMATS[ext], **options))


def noisy_jpeg(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    """A JPEG of random pixels (incompressible, so its scan data is most of the file)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(data), "JPEG", quality=90)


def flat_jpeg(size: tuple[int, int], colour: tuple[int, int, int] = (90, 160, 220)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG", quality=95)


def animated_gif(frames: int = 3) -> bytes:
    """Solid frames: red, green, blue, ... (first frame is pure red)."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (6, 4), colours[i % len(colours)]) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buffer.getvalue()


def multipage_tiff(pages: int = 2) -> bytes:
    images = [Image.new("L", (3, 3), 40 * (i + 1)) for i in range(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="TIFF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 32×20, white, with a red 8×8 block in the stored top-left corner."""
    image = Image.new("RGB", (32, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def jpeg_with_exif_payload(payload: bytes) -> bytes:
    """A small JPEG whose APP1 segment holds ``Exif\\0\\0`` followed by ``payload``."""
    base = flat_jpeg((16, 16))
    segment = b"Exif\0\0" + payload
    app1 = b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    return base[:2] + app1 + base[2:]


# -- hand-made PNGs ------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    checksum = zlib.crc32(kind + data) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header claims ``width × height`` but whose data is a few bytes."""
    return raw_png(width, height, 1, 0, zlib.compress(b"\0" * 64))


def bad_crc_png() -> bytes:
    """A valid PNG of :data:`PIXELS` except that the IDAT checksum is wrong (data intact)."""
    data = bytearray(encode(rgb_picture(), "PNG"))
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4 : at])[0]
    crc_at = at + 4 + length
    data[crc_at : crc_at + 4] = bytes(b ^ 0xFF for b in data[crc_at : crc_at + 4])
    return bytes(data)


def bad_zlib_png() -> bytes:
    """An 8×8 RGB PNG whose chunks all have valid CRCs but whose image data is not zlib."""
    return raw_png(8, 8, 8, 2, b"\x78\x9c" + b"not zlib data " * 8)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def noisy_png(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(data), "PNG")


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    b"newpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n"
)
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
