"""Where an item's image lives: its `uri` metadata, as `retrieval-client index` and `moco-train embed`
write it (a file:// URI of this host) or as a user gave it (a path, absolute or relative), resolved
under image roots. What re-embeds a store (`retrieval-server migrate`, SwitchModel's catch-up) reads
an item's image from here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse


class UriError(ValueError):
    """The uri does not name a local file under the image roots (the message says why)."""


def uri_path(uri: str, roots: Sequence[Path]) -> Path:
    """The file `uri` names, after every link is followed, inside one of `roots` (resolved). A
    relative path is looked up under each root in turn; when no root holds it, the path under the
    first root is returned (reading it then reports the file missing)."""
    if not uri:
        raise UriError("the item has no uri")
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or (parsed.scheme and parsed.netloc not in ("", "localhost")):
        raise UriError(f"not a local file: {uri!r}")
    path = Path(unquote(parsed.path) if parsed.scheme else uri)
    real_roots = [Path(root).resolve() for root in roots]
    if not path.is_absolute():
        candidates = [(root / path).resolve() for root in real_roots]
        found = next((c for c in candidates if c.is_file()), candidates[0] if candidates else None)
        if found is None or not any(found.is_relative_to(root) for root in real_roots):
            raise UriError(f"outside the image roots: {uri!r}")
        return found
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in real_roots):
        raise UriError(f"outside the image roots: {uri!r}")
    return real
