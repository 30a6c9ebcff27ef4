"""Robust image decoding shared by training data, evaluation and the server."""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Above this many pixels an image is refused before it is decoded (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000
# PIL names the file object in its messages ("<_io.BytesIO object at 0x...>"): noise to a user.
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


class ImageDecodeError(ValueError):
    """The bytes or file are not a decodable image (corrupt, truncated, empty, too large)."""


class ImageTooLargeError(ImageDecodeError):
    """The image header announces more pixels than allowed."""


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_files(folder: str | Path) -> list[Path]:
    """The image files under a folder, at any depth, sorted: what training, indexing and the demo
    all read. Hidden files and folders (a leading dot: .git, .DS_Store, editors' temp files) are
    skipped, and symbolic links to folders are followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_path(f))
    return sorted(found)


def decode_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to an RGB PIL image: EXIF orientation applied, first frame of animations,
    transparency composited on white. Raises ImageDecodeError for anything unusable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty image bytes")
        fp: io.BytesIO | str = io.BytesIO(source)
        name = "image bytes"
    else:
        fp = str(source)
        name = str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own limit
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
                    )
                if width == 0 or height == 0:
                    raise ImageDecodeError(f"{name}: image has zero size")
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, TypeError) as exc:
        reason = _BUFFER_REPR.sub("", str(exc)).strip() or type(exc).__name__
        raise ImageDecodeError(f"{name}: cannot decode image ({reason})") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")
