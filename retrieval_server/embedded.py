"""The embedded backend: SQLite as the system of record (store.py) and its in-process FAISS mirror
(index.py), one server process per store directory (StoreLock). Writes commit to SQLite first and
then update FAISS, both under one lock so the index applies them in store-version order; a FAISS
snapshot is written in the background every --snapshot-every changed items and at shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .index import Hits, ItemIndex, Vote
from .neighbors import encode_item
from .store import EmbeddingChunk, NewItem, Row, StorageError, Store, StoreLock

log = logging.getLogger(__name__)
SNAPSHOT_FRACTION = 10  # a snapshot at most once per 1/10 of the stored items changed


class EmbeddedBackend:
    kind = "embedded"

    def __init__(self, store: Store, index: ItemIndex, directory: Path, snapshot_every: int, lock: StoreLock) -> None:
        self.store, self.index, self.directory, self.snapshot_every = store, index, directory, snapshot_every
        self.index_type, self.gpus = index.factory, index.gpus
        self._lock = lock
        self._writes = threading.Lock()  # store commit + index update, in version order
        self._changed_since_snapshot = 0
        self._snapshot_lock = threading.Lock()
        # Each item's Neighbor encoding (neighbors.encode_item), kept from the first time a search
        # returns it until a write changes it: the in-memory row table of Search and Classify.
        self._encoded: dict[int, bytes] = {}
        self._encoded_lock = threading.Lock()
        self._writes_seen = 0  # bumped with every forget, so a read racing a write caches nothing

    @property
    def device(self) -> str:
        return self.index.device

    @property
    def item_count(self) -> int:
        return self.index.item_count

    @property
    def labelled_count(self) -> int:
        return self.index.labelled_count

    # -- writes -----------------------------------------------------------------------------------
    def upsert(self, items: list[NewItem]) -> int:
        with self._writes:
            done = self.store.upsert(items)
            self.index.apply_upsert(
                done.version,
                np.array([w.row for w in done.items], dtype=np.int64),
                np.stack([it.embedding for it in items]),
                [w.label for w in done.items],
                np.array([w.existed for w in done.items], dtype=bool),
            )
            self._forget([w.row for w in done.items])
            self._after_write(len(items))
        return len(items)

    def delete(self, ids: list[str], ignore_missing: bool) -> int:
        with self._writes:
            done = self.store.delete(ids, ignore_missing)
            self.index.apply_delete(done.version, np.array(done.rows, dtype=np.int64))
            self._forget(done.rows)
            self._after_write(len(done.rows))
        return len(done.rows)

    def set_labels(self, assignments: list[tuple[str, str | None, float]], predicted: bool) -> int:
        with self._writes:
            changed = self.store.set_labels(assignments, predicted)
            self._forget([c.row for c in changed])
            if not predicted:
                rows = np.array([c.row for c in changed], dtype=np.int64)
                labelled = rows[[c.label is not None for c in changed]]
                self.index.apply_labels(rows, [c.label for c in changed], self.store.vectors_of(labelled))
        return len(changed)

    def set_predicted_rows(self, proposals: list[tuple[int, str, float]]) -> None:
        with self._writes:
            self.store.set_predicted_rows(proposals)
            self._forget([row for row, _, _ in proposals])

    def _forget(self, rows: Iterable[int]) -> None:
        """After a commit: these rows' encodings are stale."""
        with self._encoded_lock:
            for row in rows:
                self._encoded.pop(row, None)
            self._writes_seen += 1

    def _after_write(self, changed: int) -> None:
        """A background snapshot every --snapshot-every changes, and at most once per tenth of the
        stored items changed; under self._writes. A snapshot writes the whole index, so a fixed
        period made the snapshots of a growing store quadratic (ingest fell from 51k to 40k items/s
        by 300k items; with the tenth, start-up replays at most a tenth of the store)."""
        self._changed_since_snapshot += changed
        period = max(self.snapshot_every, self.index.item_count // SNAPSHOT_FRACTION)
        if self.snapshot_every and self._changed_since_snapshot >= period:
            if self._snapshot_lock.acquire(blocking=False):  # one at a time, in the background
                self._changed_since_snapshot = 0
                threading.Thread(target=self._snapshot_locked, name="snapshot", daemon=True).start()

    # -- reads ------------------------------------------------------------------------------------
    def get(self, ids: list[str], with_embedding: bool = False) -> dict[str, Row]:
        return self.store.get(ids, with_embedding)

    def by_rows(self, rows: Iterable[int]) -> dict[int, Row]:
        return self.store.by_rows(rows)

    def encoded(self, rows: Iterable[int]) -> dict[int, bytes]:
        rows = [int(r) for r in rows]
        found = {r: e for r in rows if (e := self._encoded.get(r)) is not None}
        missing = [r for r in rows if r not in found]
        if missing:
            seen = self._writes_seen
            fetched = {r: encode_item(row) for r, row in self.store.by_rows(missing).items()}
            with self._encoded_lock:
                if seen == self._writes_seen:  # no write committed since the read: still current
                    self._encoded.update(fetched)
            found.update(fetched)
        return found

    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: set[str],
        excludes: np.ndarray | None,
        min_score: float | None,
        metadata: dict[str, str],
    ) -> list[Hits]:
        among = self.store.rows_with_metadata(metadata) if metadata else None
        return self.index.search(queries, k, labels=labels, excludes=excludes, min_score=min_score, among=among)

    def vote(self, queries: np.ndarray, k: int, tau: float, excludes: np.ndarray | None = None) -> Vote:
        return self.index.vote(queries, k, tau, excludes)

    def neighbors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.neighbors(queries, k)

    def embeddings(self, labelled: bool | None = None, chunk: int = 4096) -> Iterator[EmbeddingChunk]:
        where = {None: "1", True: "label IS NOT NULL", False: "label IS NULL"}[labelled]
        return self.store.embeddings(where, chunk=chunk)

    def unlabelled(self, chunk: int) -> Iterator[EmbeddingChunk]:
        last_id = None
        while (found := self.store.unlabelled_after(last_id, chunk)) is not None:
            yield found
            last_id = found.ids[-1]

    def labelled_items(self, human_only: bool, chunk: int) -> Iterator[list[Row]]:
        last_id = None
        while page := self.store.labelled_after(last_id, chunk, human_only):
            yield page
            last_id = page[-1].id

    def counts(self) -> tuple[int, dict[str, int], int]:
        total, label_counts = self.store.counts()
        return total, label_counts, self.store.predicted_count()

    # -- snapshots and lifetime -------------------------------------------------------------------
    def snapshot(self) -> int | None:
        """Write the index snapshot now and drop the tombstones it covers; its store version, or
        None when it could not be written (logged: it only speeds up the next start)."""
        with self._snapshot_lock:
            return self._snapshot()

    def _snapshot_locked(self) -> None:
        try:
            self._snapshot()
        finally:
            self._snapshot_lock.release()

    def _snapshot(self) -> int | None:
        try:
            version = self.index.save_snapshot(self.directory, self.store.store_id)
            self.store.prune_tombstones(version)
        except (OSError, RuntimeError, StorageError) as exc:  # a full or read-only disk, FAISS I/O
            log.warning("index snapshot skipped: %s (the next start rebuilds the index from the store)", exc)
            return None
        return version

    def close(self) -> str:
        version = self.snapshot()
        self.store.close()
        self._lock.release()
        return f"index snapshot at store version {version}" if version else "no index snapshot"
