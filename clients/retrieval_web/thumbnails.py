"""Thumbnails of stored items, read from their `uri` metadata, only under the configured image
roots: a path that leaves a root (`..`, a symbolic link pointing out of it), a file that is not an
image, or a missing one is refused. Thumbnails are cached in memory, keyed by file and mtime."""

from __future__ import annotations

import functools
import io
from pathlib import Path

from PIL import Image

from moco_retrieval.images import ImageDecodeError, decode_image, is_image_path
from moco_retrieval.uris import UriError, uri_path

THUMBNAIL_PX = 160


class ThumbnailRefused(Exception):
    """The uri is not an image file under an image root (the message says why, for the log)."""


def resolve(uri: str, roots: list[Path]) -> Path:
    """The real path of an item's image, as `retrieval-server migrate` reads it (moco_retrieval.uris:
    a file:// URI of this host or a path, inside one of the roots after every symbolic link is
    followed), and only when it is an existing image file."""
    try:  # a NUL, a name longer than the OS allows, a loop of links: not a file it can read
        real = uri_path(uri, roots)
        if not is_image_path(real):
            raise ThumbnailRefused(f"not an image file: {uri!r}")
        if not real.is_file():
            raise ThumbnailRefused(f"no such file: {uri!r}")
    except UriError as exc:
        raise ThumbnailRefused(str(exc)) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise ThumbnailRefused(f"not a usable path: {uri!r} ({exc})") from exc
    return real


def _jpeg(source: bytes | Path) -> bytes:
    image = decode_image(source)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _thumbnail(path: Path, mtime_ns: int) -> bytes:
    return _jpeg(path)


def thumbnail(uri: str, roots: list[Path]) -> bytes:
    """A JPEG thumbnail of the item's image (ThumbnailRefused when it may not or cannot be read)."""
    path = resolve(uri, roots)
    try:
        return _thumbnail(path, path.stat().st_mtime_ns)
    except (ImageDecodeError, OSError) as exc:
        raise ThumbnailRefused(f"unreadable image: {uri} ({exc})") from exc


def upload_thumbnail(data: bytes) -> bytes:
    """A JPEG thumbnail of uploaded image bytes (ThumbnailRefused when they do not decode)."""
    try:
        return _jpeg(data)
    except ImageDecodeError as exc:
        raise ThumbnailRefused(f"undecodable upload ({exc})") from exc
