"""gRPC retrieval server: a MoCo query encoder, a durable SQLite store mirrored by FAISS, and the
InstDisc kNN vote over human-labelled items."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("moco-retrieval")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
