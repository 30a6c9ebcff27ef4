"""Robust decoding of odd images: every mode becomes RGB, EXIF orientation is applied, junk is refused."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moco_retrieval.images import ImageDecodeError, ImageTooLargeError, decode_image, is_image_path


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def test_rgb_jpeg_and_bytes(tmp_path):
    path = save(Image.new("RGB", (8, 6), (200, 10, 10)), tmp_path / "a.jpg")
    for source in (path, str(path), path.read_bytes()):
        img = decode_image(source)
        assert img.mode == "RGB" and img.size == (8, 6)


def test_png_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img = decode_image(save(rgba, tmp_path / "a.png"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_palette_gif_first_frame(tmp_path):
    frames = [Image.new("P", (5, 5), i) for i in (1, 2)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    img = decode_image(path)
    assert img.mode == "RGB" and img.size == (5, 5)


def test_16bit_png(tmp_path):
    arr = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000
    img = decode_image(save(Image.fromarray(arr), tmp_path / "deep.png"))
    assert img.mode == "RGB"
    assert img.getpixel((3, 3))[0] == 60000 // 256


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img = decode_image(save(Image.new("RGB", (10, 4)), tmp_path / "rot.jpg", exif=exif))
    assert img.size == (4, 10)


def test_cmyk_jpeg_and_tiff(tmp_path):
    cmyk = decode_image(save(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert cmyk.mode == "RGB" and cmyk.getpixel((2, 2))[0] > 200
    tiff = decode_image(save(Image.new("RGB", (6, 6), (1, 2, 3)), tmp_path / "a.tiff"))
    assert tiff.getpixel((0, 0)) == (1, 2, 3)


def test_junk_is_refused(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (64, 64)).save(good, format="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good.getvalue()[:200])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("trunc.jpg", "empty.jpg", "text.jpg", "missing.jpg"):
        with pytest.raises(ImageDecodeError):
            decode_image(tmp_path / name)
    with pytest.raises(ImageDecodeError):
        decode_image(b"")
    with pytest.raises(ImageTooLargeError):
        decode_image(good.getvalue(), max_pixels=100)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no image data): enough for Image.open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_an_image_above_pils_own_limit_is_too_large_not_undecodable():
    """50,000 x 50,000 px is past 2x PIL's MAX_IMAGE_PIXELS, where PIL refuses inside Image.open,
    before our limit is checked: still ImageTooLargeError (the server's RESOURCE_EXHAUSTED)."""
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(png_header(50_000, 50_000), max_pixels=10**12)


def test_image_extensions():
    assert is_image_path("a/B.JPEG") and is_image_path("x.webp") and is_image_path("x.tif")
    assert not is_image_path("notes.txt")


def test_decode_error_message_names_no_buffer_object():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"definitely not an image")
    assert "BytesIO" not in str(info.value) and "cannot identify image file" in str(info.value)
