"""The system of record: SQLite in WAL mode holding every item (id, labels, metadata, float32
embedding) and the fingerprint of the model that embedded them. FAISS is only a mirror of it.

Durability: journal_mode=WAL with synchronous=FULL, so a commit is fsynced to the WAL before the
call returns and an acknowledged upsert survives a process kill *and* a power loss (NORMAL would
only survive a process kill). Every transaction that changes embeddings takes a new `version`;
changed rows carry it and deleted rows leave a tombstone with it, so an index snapshot taken at
version v is brought up to date with the rows and tombstones after v.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

log = logging.getLogger(__name__)
# Values per `IN (...)` query: well under SQLite's limit on bound parameters.
SQLITE_IN_CHUNK = 500


def _select_in(conn: sqlite3.Connection, select: str, column: str, values: list) -> Iterator[tuple]:
    """The rows of `select WHERE column IN (values)`, queried in chunks of SQLITE_IN_CHUNK."""
    for start in range(0, len(values), SQLITE_IN_CHUNK):
        chunk = values[start : start + SQLITE_IN_CHUNK]
        yield from conn.execute(f"{select} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    row INTEGER PRIMARY KEY AUTOINCREMENT,       -- the FAISS id (int64), never reused
    id TEXT NOT NULL UNIQUE,                     -- the user's id
    label TEXT,                                  -- human label (votes in Classify), NULL if none
    predicted_label TEXT,                        -- kNN proposal, never votes
    predicted_confidence REAL,
    metadata TEXT NOT NULL DEFAULT '{}',         -- JSON object of strings
    embedding BLOB NOT NULL,                     -- float32 little-endian, L2-normalised
    version INTEGER NOT NULL                     -- transaction that last wrote the embedding
);
CREATE INDEX IF NOT EXISTS items_version ON items(version);
CREATE INDEX IF NOT EXISTS items_label ON items(label) WHERE label IS NOT NULL;
-- Info's count of predictions to review reads this small index, not every row's embedding page.
CREATE INDEX IF NOT EXISTS items_to_review ON items(row) WHERE predicted_label IS NOT NULL AND label IS NULL;
CREATE TABLE IF NOT EXISTS tombstones (row INTEGER PRIMARY KEY, version INTEGER NOT NULL);
"""


class StorageError(Exception):
    """A write the storage refused; nothing of it was kept (the transaction rolled back).

    kind: "full" (no space left, or the --store-max-mb quota), "read_only" (the database, its
    directory or filesystem cannot be written, or permission is denied), "conflict" (the write
    contradicts what is stored: retrying cannot help), "io" (another I/O error).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def storage_error(exc: sqlite3.Error | OSError, store: Path) -> StorageError:
    """The StorageError for a failed write of the store at `store`, from SQLite's error code (or errno)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    errno = getattr(exc, "errno", None)
    if name.startswith("SQLITE_FULL") or errno == 28:  # ENOSPC
        kind, what = "full", "no space left for the store"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN", "SQLITE_AUTH")) or errno in (1, 13, 30):
        kind, what = "read_only", "the store cannot be written"  # EPERM, EACCES, EROFS
    else:
        kind, what = "io", "the store had an I/O error"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StorageError(kind, f"{what} ({store}: {detail}); nothing of this write was stored")


class StoreInUse(Exception):
    """Another process holds the store (a running server)."""


class StoreLock:
    """An exclusive advisory lock (flock) on DIR/store.lock, held by a serving process and by a
    restore: one server per store, and no restore under a running server. The kernel drops it
    when the holder exits, however it exits."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "store.lock"
        self._file: IO | None = None

    def acquire(self) -> StoreLock:
        f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StoreInUse(f"{self.path.parent} is in use by another process (a running server?)") from None
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class UnknownIds(KeyError):
    """Some ids are not stored."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids

    def __str__(self) -> str:
        shown = ", ".join(repr(i) for i in self.ids[:5])
        more = f" and {len(self.ids) - 5} more" if len(self.ids) > 5 else ""
        return f"unknown id{'s' if len(self.ids) > 1 else ''}: {shown}{more}"


@dataclass(frozen=True)
class Written:
    """One upserted item: its store row, its human label after the write (an upsert without a
    label keeps the stored one), and whether its id was stored before."""

    row: int
    label: str | None
    existed: bool


@dataclass(frozen=True)
class Upserted:
    version: int  # the transaction's store version
    items: list[Written]  # in the order of the upserted items


@dataclass(frozen=True)
class Deleted:
    version: int
    rows: list[int]  # the deleted store rows, sorted


@dataclass(frozen=True)
class LabelChange:
    row: int
    label: str | None  # None: cleared


@dataclass(frozen=True)
class EmbeddingChunk:
    """Consecutive stored items, for rebuilding the index and LabelCorpus."""

    rows: np.ndarray  # (n,) int64
    ids: list[str]
    labels: list[str | None]  # human labels
    vectors: np.ndarray  # (n, D) float32, C-contiguous


@dataclass
class NewItem:
    id: str
    embedding: np.ndarray  # (D,) float32, normalised
    label: str | None  # None keeps the stored label
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Row:
    row: int
    id: str
    label: str | None
    predicted_label: str | None
    predicted_confidence: float | None
    metadata: dict[str, str]
    embedding: np.ndarray | None = None


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _row(r: tuple, with_embedding: bool) -> Row:
    return Row(
        row=r[0],
        id=r[1],
        label=r[2],
        predicted_label=r[3],
        predicted_confidence=r[4],
        metadata=json.loads(r[5]) if r[5] != "{}" else {},  # most items have none: skip the parser
        embedding=np.frombuffer(r[6], dtype="<f4") if with_embedding else None,
    )


class Store:
    FILENAME = "items.sqlite3"

    def __init__(self, directory: str | Path, max_mb: float = 0) -> None:
        """Open (or create) the store in `directory`; max_mb > 0 caps the database's size (writes
        beyond it fail as a full disk does)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / self.FILENAME
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        if max_mb > 0:
            page_size = self._writer.execute("PRAGMA page_size").fetchone()[0]
            self._writer.execute(f"PRAGMA max_page_count = {max(1, int(max_mb * 2**20 / page_size))}")
        # Identifies this store's history for index snapshots; replaced when the store is reset.
        self._writer.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @property
    def _reader(self) -> sqlite3.Connection:
        """One read connection per thread: WAL readers see the last commit and never block the writer."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error, so a batch is
        all in or all out; storage failures (full, read-only, I/O) become StorageError."""
        with self._write_lock:
            c = self._writer
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield c
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
                c.execute("COMMIT")
            except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
                if c.in_transaction:  # a failed COMMIT leaves the transaction open
                    c.execute("ROLLBACK")
                raise storage_error(exc, self.directory) from exc

    def close(self) -> None:
        """Fold the WAL into the database (skipped, with a warning, when the disk cannot take it:
        the WAL is replayed on the next open) and close."""
        with self._write_lock:
            try:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("store %s: WAL checkpoint skipped at close (%s)", self.directory, exc)
            self._writer.close()

    def size_bytes(self) -> int:
        """The database with its WAL and shared-memory files."""
        files = [self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")]
        return sum(f.stat().st_size for f in files if f.exists())

    def free_bytes(self) -> int:
        """Space left on the store's filesystem for an unprivileged writer."""
        return shutil.disk_usage(self.directory).free

    # -- meta -------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        r = self._reader.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    @property
    def store_id(self) -> str:
        return self.get_meta("store_id") or ""

    @property
    def version(self) -> int:
        return int(self.get_meta("version") or 0)

    def bind_model(self, fingerprint: str, dim: int, reset: bool) -> str | None:
        """Record the model of an empty store. Returns the other fingerprint if the store belongs to
        another model (and reset is false); with reset, drops every item first. A store already bound
        to this model is not written (so a store on a full disk still starts, and serves reads)."""
        if self.get_meta("fingerprint") == fingerprint:
            return None
        with self._write() as c:
            stored = c.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
            if stored and stored[0] != fingerprint:
                if not reset:
                    return stored[0]
                c.execute("DELETE FROM items")
                c.execute("DELETE FROM tombstones")
                c.execute("UPDATE meta SET value = ? WHERE key = 'store_id'", (uuid.uuid4().hex,))
            c.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('fingerprint', ?), ('dim', ?)", (fingerprint, str(dim))
            )
        return None

    @staticmethod
    def _bump(c: sqlite3.Connection) -> int:
        r = c.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        version = int(r[0]) + 1 if r else 1
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('version', ?)", (str(version),))
        return version

    # -- writes (each one transaction; the caller serialises them with the index) -----------------
    def upsert(self, items: list[NewItem]) -> Upserted:
        """Insert or overwrite items in one transaction."""
        out = []
        with self._write() as c:
            version = self._bump(c)
            existing = self._rows_of(c, [item.id for item in items])
            for item in items:
                r = c.execute(
                    "INSERT INTO items(id, label, metadata, embedding, version) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET embedding = excluded.embedding, metadata = excluded.metadata, "
                    "version = excluded.version, label = COALESCE(excluded.label, items.label) "
                    "RETURNING row, label",
                    (item.id, item.label, json.dumps(item.metadata, sort_keys=True), _blob(item.embedding), version),
                ).fetchone()
                out.append(Written(row=r[0], label=r[1], existed=item.id in existing))
        return Upserted(version, out)

    def delete(self, ids: list[str], ignore_missing: bool) -> Deleted:
        """Delete items (all-or-nothing unless ignore_missing)."""
        with self._write() as c:
            found = self._rows_of(c, ids)
            missing = [i for i in ids if i not in found]
            if missing and not ignore_missing:
                raise UnknownIds(missing)
            rows = sorted(set(found.values()))
            version = self._bump(c)
            c.executemany("DELETE FROM items WHERE row = ?", [(r,) for r in rows])
            c.executemany("INSERT OR REPLACE INTO tombstones(row, version) VALUES (?, ?)", [(r, version) for r in rows])
        return Deleted(version, rows)

    def set_labels(self, assignments: list[tuple[str, str | None, float]], predicted: bool) -> list[LabelChange]:
        """Set (or clear, with None) human or predicted labels of (id, label, confidence), all-or-nothing."""
        with self._write() as c:
            found = self._rows_of(c, [a[0] for a in assignments])
            missing = [a[0] for a in assignments if a[0] not in found]
            if missing:
                raise UnknownIds(missing)
            if predicted:
                c.executemany(
                    "UPDATE items SET predicted_label = ?, predicted_confidence = ? WHERE row = ?",
                    [(lab, conf if lab is not None else None, found[i]) for i, lab, conf in assignments],
                )
            else:
                c.executemany(
                    "UPDATE items SET label = ? WHERE row = ?", [(lab, found[i]) for i, lab, _ in assignments]
                )
        return [LabelChange(found[i], lab) for i, lab, _ in assignments]

    def set_predicted_rows(self, proposals: list[tuple[int, str, float]]) -> None:
        """Store LabelCorpus proposals by row (rows deleted meanwhile are skipped)."""
        with self._write() as c:
            c.executemany(
                "UPDATE items SET predicted_label = ?, predicted_confidence = ? WHERE row = ?",
                [(lab, conf, row) for row, lab, conf in proposals],
            )

    def prune_tombstones(self, up_to_version: int) -> None:
        with self._write() as c:
            c.execute("DELETE FROM tombstones WHERE version <= ?", (up_to_version,))

    @staticmethod
    def _rows_of(c: sqlite3.Connection, ids: list[str]) -> dict[str, int]:
        return dict(_select_in(c, "SELECT id, row FROM items", "id", ids))

    # -- reads ------------------------------------------------------------------------------------
    _COLUMNS = "row, id, label, predicted_label, predicted_confidence, metadata"

    def get(self, ids: list[str], with_embedding: bool = False) -> dict[str, Row]:
        cols = self._COLUMNS + (", embedding" if with_embedding else "")
        return {r[1]: _row(r, with_embedding) for r in _select_in(self._reader, f"SELECT {cols} FROM items", "id", ids)}

    def by_rows(self, rows: Iterable[int]) -> dict[int, Row]:
        rows = [int(r) for r in rows]
        return {
            r[0]: _row(r, False) for r in _select_in(self._reader, f"SELECT {self._COLUMNS} FROM items", "row", rows)
        }

    def embeddings(
        self, where: str = "1", params: tuple = (), chunk: int = 8192, order: str = "row", limit: int | None = None
    ) -> Iterator[EmbeddingChunk]:
        """The items matching `where`, by `order`, in chunks (at most `limit` items in all)."""
        sql = f"SELECT row, id, label, embedding FROM items WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql, params = sql + " LIMIT ?", params + (limit,)
        cur = self._reader.execute(sql, params)
        while batch := cur.fetchmany(chunk):
            rows = np.fromiter((b[0] for b in batch), dtype=np.int64, count=len(batch))
            vectors = np.frombuffer(b"".join(b[3] for b in batch), dtype="<f4").reshape(len(batch), -1)
            yield EmbeddingChunk(
                rows, [b[1] for b in batch], [b[2] for b in batch], np.ascontiguousarray(vectors, dtype=np.float32)
            )

    def rows_with_metadata(self, equals: dict[str, str]) -> np.ndarray:
        """Rows (sorted int64) whose metadata holds every key of `equals` with exactly that value.
        json_each compares the stored JSON keys themselves, so any key text is safe (no JSON path)."""
        clause = "EXISTS (SELECT 1 FROM json_each(items.metadata) WHERE key = ? AND value = ?)"
        where = " AND ".join([clause] * len(equals)) or "1"
        params = [x for pair in sorted(equals.items()) for x in pair]
        cur = self._reader.execute(f"SELECT row FROM items WHERE {where} ORDER BY row", params)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def unlabelled_after(self, last_id: str | None, limit: int) -> EmbeddingChunk | None:
        """The next `limit` items without a human label, by id (keyset paging: no cursor kept
        open), or None after the last."""
        return next(
            self.embeddings("label IS NULL AND id > ?", (last_id or "",), chunk=limit, order="id", limit=limit), None
        )

    def labelled_after(self, last_id: str | None, limit: int, human_only: bool) -> list[Row]:
        """The next `limit` items with a human label (or, unless human_only, a predicted one), by
        id (keyset paging, as unlabelled_after)."""
        which = "label IS NOT NULL" if human_only else "(label IS NOT NULL OR predicted_label IS NOT NULL)"
        cur = self._reader.execute(
            f"SELECT {self._COLUMNS} FROM items WHERE {which} AND id > ? ORDER BY id LIMIT ?", (last_id or "", limit)
        )
        return [_row(r, False) for r in cur]

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings (n, D) float32 of stored rows, in the given order."""
        found = {
            r[0]: np.frombuffer(r[1], dtype="<f4")
            for r in _select_in(self._reader, "SELECT row, embedding FROM items", "row", [int(r) for r in rows])
        }
        dim = int(self.get_meta("dim") or 0)
        return np.array([found[int(r)] for r in rows], dtype=np.float32).reshape(len(rows), dim)

    def tombstones_after(self, version: int) -> np.ndarray:
        rows = self._reader.execute("SELECT row FROM tombstones WHERE version > ?", (version,)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def predicted_count(self) -> int:
        """Items with a predicted label and no human label (what is left to review)."""
        return self._reader.execute(
            "SELECT COUNT(*) FROM items WHERE predicted_label IS NOT NULL AND label IS NULL"
        ).fetchone()[0]

    def counts(self) -> tuple[int, dict[str, int]]:
        total = self._reader.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        labels = dict(
            self._reader.execute("SELECT label, COUNT(*) FROM items WHERE label IS NOT NULL GROUP BY label").fetchall()
        )
        return total, labels
