"""Thumbnails of stored items, read from their `uri` metadata, only under the configured image
roots: a path that leaves a root (`..`, a symbolic link pointing out of it), a file that is not an
image, or a missing one is refused. Thumbnails are cached in memory, keyed by file and mtime."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from moco_retrieval.images import ImageDecodeError, decode_image, is_image_path

THUMBNAIL_PX = 160


class ThumbnailRefused(Exception):
    """The uri is not an image file under an image root (the message says why, for the log)."""


def resolve(uri: str, roots: list[Path]) -> Path:
    """The real path of an item's image: a file:// URI (of this host) or a path, inside one of the
    roots after every symbolic link is followed. A relative path is looked up under each root in
    turn: the first root that holds it as an image file wins."""
    if not uri:
        raise ThumbnailRefused("the item has no uri")
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or (parsed.scheme and parsed.netloc not in ("", "localhost")):
        raise ThumbnailRefused(f"not a local file: {uri!r}")
    path = Path(unquote(parsed.path) if parsed.scheme else uri)
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    problems = []
    for candidate in candidates:
        try:  # a NUL, a name longer than the OS allows, a loop of links: not a file it can read
            real = candidate.resolve()
            if not any(real.is_relative_to(root) for root in roots):
                problems.append(f"outside the image roots: {uri!r}")
            elif not is_image_path(real):
                problems.append(f"not an image file: {uri!r}")
            elif not real.is_file():
                problems.append(f"no such file: {uri!r}")
            else:
                return real
        except (OSError, ValueError, RuntimeError) as exc:
            problems.append(f"not a usable path: {uri!r} ({exc})")
    raise ThumbnailRefused(
        next((p for p in problems if "outside" not in p), None) or f"outside the image roots: {uri!r}"
    )


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
