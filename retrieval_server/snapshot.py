"""Index snapshots: the items index written with faiss.write_index (atomically) and a pointer file
naming it and the store version it covers, so a restart loads it and replays only the rows and
tombstones after that version. A snapshot is only a start-up speed-up: a missing, foreign or corrupt
one is ignored and the index is rebuilt from the store."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss

from moco_retrieval.fileio import atomic_open, atomic_write

log = logging.getLogger(__name__)
SNAPSHOT_POINTER = "snapshot.json"


@dataclass(frozen=True)
class SnapshotPointer:
    version: int  # the store version the snapshot covers
    file: str  # items-v<version>.faiss beside the pointer
    store_id: str  # the store's history it belongs to
    factory: str  # the --index-factory it was built with
    dim: int


@contextlib.contextmanager
def snapshot_writer(directory: Path, pointer: SnapshotPointer) -> Iterator[Callable[[faiss.Index], None]]:
    """`with snapshot_writer(d, p) as write: write(index)`: the index file, then the pointer (each
    atomic), then older index files are removed. Only write(index) needs the index held still; the
    fsyncs and renames come after it, when the block ends, so the caller can hold its index lock
    for the copy into the page cache alone (writers wait for that, not for the disk)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".items-v*.faiss.*.tmp"):  # left by a kill during an earlier write
        stale.unlink(missing_ok=True)
    with atomic_open(directory / pointer.file) as f:
        yield lambda index: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    atomic_write(directory / SNAPSHOT_POINTER, lambda f: f.write(json.dumps(asdict(pointer)).encode()))
    for old in directory.glob("items-v*.faiss"):
        if old.name != pointer.file:
            old.unlink(missing_ok=True)


def read_snapshot(
    directory: Path, *, store_id: str, factory: str, dim: int, max_version: int
) -> tuple[int, faiss.Index] | None:
    """(version, CPU index) of a usable snapshot, or None (missing, of another store or factory, corrupt)."""
    pointer_path = directory / SNAPSHOT_POINTER
    try:
        pointer = SnapshotPointer(**json.loads(pointer_path.read_text()))
        if (pointer.store_id, pointer.factory, pointer.dim) != (store_id, factory, dim):
            return None
        if pointer.version > max_version:
            return None
        return pointer.version, faiss.read_index(str(directory / pointer.file))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        if pointer_path.exists():
            log.warning("ignoring index snapshot: %s", exc)
        return None
