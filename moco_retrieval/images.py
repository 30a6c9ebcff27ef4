"""Robust image decoding shared by training data, evaluation and the server."""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CorpusFile:
    """An image of a corpus folder as the service knows it: `retrieval-client index`, `moco-train embed`
    and `retrieval-client import` all name and describe it this way, so their items are interchangeable."""

    path: Path
    rel: str  # path relative to the corpus folder, '/'-separated: the item id (--id-from path)
    folder: str  # the parent folder's name, "" at the top level: the label of --labels-from-folders

    def metadata(self, sha256: str) -> dict[str, str]:
        """The item's metadata: where the file is (thumbnails) and the sha256 of its bytes (indexing
        again skips unchanged files)."""
        return {"uri": self.path.resolve().as_uri(), "sha256": sha256}


def corpus_files(folder: str | Path) -> list[CorpusFile]:
    """image_files(folder) as CorpusFiles, in the same order."""
    root = Path(folder)
    files = []
    for path in image_files(root):
        rel = path.relative_to(root).as_posix()
        files.append(CorpusFile(path, rel, path.parent.name if "/" in rel else ""))
    return files


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
    except Image.DecompressionBombError as exc:  # PIL's own limit (2x its MAX_IMAGE_PIXELS) hit in open()
        raise ImageTooLargeError(f"{name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
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
