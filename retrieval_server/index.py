"""The FAISS mirror of the store: inner product on L2-normalised float32 vectors, int64 ids = store
rows. Two indexes: every item (the --index-factory type) for Search, and the human-labelled items
(always exact Flat) for Classify, so the kNN vote is exact whatever the main index is.

The CPU indexes are the source of truth; a GPU replica (when GPUs are used) is re-cloned after
removals, which GPU indexes handle poorly. Untrained factories (IVF, PQ) serve from an exact flat
index until enough vectors arrive to train them. Snapshots (faiss.write_index, atomic) record the
store version they cover; at start the rows and tombstones after it are replayed.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from moco_retrieval.fileio import fsync_dir

from .store import Store

log = logging.getLogger(__name__)
SNAPSHOT_POINTER = "snapshot.json"


class RWLock:
    """Many concurrent searches, or one writer (FAISS CPU search is thread-safe, add/remove are not)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class ClassTable:
    """Class index of each labelled row. Classes are the labels in sorted order, as the class
    indices of `moco-train knn` (sorted folder names), so vote ties break the same way."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.names = sorted(set(labels.values()))
        index = {name: c for c, name in enumerate(self.names)}
        self.rows = np.array(sorted(labels), dtype=np.int64)
        self.class_of_row = np.array([index[labels[r]] for r in self.rows.tolist()], dtype=np.int64)

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Class indices of labelled rows (same shape), -1 for FAISS padding (row -1)."""
        if not len(self.rows):
            return np.full(rows.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.rows, rows), 0, len(self.rows) - 1)
        return np.where(rows >= 0, self.class_of_row[pos], -1)


def resolve_gpus(index_gpus: str) -> int:
    available = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if index_gpus == "auto":
        return available
    wanted = int(index_gpus)
    if wanted > available:
        raise RuntimeError(f"--index-gpus {wanted} but FAISS sees {available} GPU(s)")
    return wanted


def _train_size(inner: faiss.Index) -> int:
    """Vectors needed before training: FAISS wants ~39 per k-means centroid (IVF lists, PQ codes)."""
    ivf = faiss.try_extract_index_ivf(inner)
    centroids = ivf.nlist if ivf is not None else 1
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else inner), "pq", None)
    if pq is not None:
        centroids = max(centroids, pq.ksub)
    return 39 * centroids


def _with_ids(inner: faiss.Index) -> faiss.Index:
    """An index addressed by store rows. IVF keeps arbitrary int64 ids itself (and IndexIDMap's
    remove_ids assumes the inner index renumbers like IndexFlat, which IVF does not), so it gets a
    hashtable direct map for reconstruction; everything else is wrapped in IndexIDMap2."""
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return inner
    return faiss.IndexIDMap2(inner)


class FaissIndex:
    """One CPU index (the truth) with an optional GPU replica and a training fallback."""

    def __init__(self, dim: int, factory: str, gpus: int, cpu: faiss.Index | None = None) -> None:
        self.dim, self.factory, self.gpus = dim, factory, gpus
        self._needs_training = not self._new_inner().is_trained
        self.cpu = cpu if cpu is not None else self._rebuilt(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        self._gpu: faiss.Index | None = None
        self._gpu_stale = True

    def _new_inner(self) -> faiss.Index:
        return faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)

    @property
    def in_fallback(self) -> bool:
        """Serving from the exact flat stand-in because the factory index is not trained yet."""
        if not self._needs_training or not isinstance(self.cpu, faiss.IndexIDMap2):
            return False
        return isinstance(faiss.downcast_index(self.cpu.index), faiss.IndexFlat)

    @property
    def ntotal(self) -> int:
        return self.cpu.ntotal

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self.cpu.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64))
        if self._gpu is not None and not self._gpu_stale:
            self._gpu.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                   np.ascontiguousarray(rows, dtype=np.int64))
        self._maybe_train()

    def remove(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        try:
            self.cpu.remove_ids(rows)  # an array: the selector kind every index (IVF direct map too) accepts
        except RuntimeError:  # e.g. HNSW has no removal: rebuild from the remaining vectors
            keep_rows = faiss.vector_to_array(self.cpu.id_map)
            keep = ~np.isin(keep_rows, rows)
            vectors = self.cpu.reconstruct_batch(keep_rows[keep]) if keep.any() else np.zeros((0, self.dim), "float32")
            self.cpu = self._rebuilt(keep_rows[keep], vectors)
        self._gpu_stale = True

    def _rebuilt(self, rows: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        """A fresh index holding these rows: the factory's (trained on them if it needs training
        and they are enough), else the exact flat stand-in."""
        inner = self._new_inner()
        if not inner.is_trained:
            if len(rows) < _train_size(inner):
                inner = faiss.IndexFlatIP(self.dim)
            else:
                log.info("training %s on %d vectors", self.factory, len(rows))
                inner.train(vectors)
        index = _with_ids(inner)
        if len(rows):
            index.add_with_ids(vectors, rows)
        return index

    def _maybe_train(self) -> None:
        if not self.in_fallback or self.cpu.ntotal < _train_size(self._new_inner()):
            return
        rows = faiss.vector_to_array(self.cpu.id_map).astype(np.int64)
        vectors = np.ascontiguousarray(self.cpu.reconstruct_batch(rows), dtype=np.float32)
        self.cpu = self._rebuilt(rows, vectors)
        self._gpu_stale = True

    def search(self, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, rows (Q, k) int64 with -1 padding). GPU replica when there is one
        and no selector is needed (GPU indexes take no IDSelector)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if params is None and self.gpus > 0:
            return self._replica().search(queries, k)  # the caller keeps k <= 2048 (GPU limit)
        if params is None:
            return self.cpu.search(queries, k)
        return self.cpu.search(queries, k, params=params)

    def _replica(self) -> faiss.Index:
        if self._gpu is None or self._gpu_stale:
            self._gpu = None
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.cpu, ngpu=self.gpus)
            except RuntimeError as exc:  # e.g. HNSW has no GPU version: serve this index from the CPU
                log.warning("%s cannot run on GPU (%s); searching it on the CPU", self.factory, exc)
                self.gpus = 0
                return self.cpu
            self._gpu_stale = False
        return self._gpu


class ItemIndex:
    """Both indexes, the human labels of labelled rows, and the store version they reflect."""

    def __init__(self, dim: int, factory: str, gpus: int) -> None:
        self.dim, self.factory, self.gpus = dim, factory, gpus
        self.items = FaissIndex(dim, factory, gpus)
        self.labelled = FaissIndex(dim, "Flat", gpus)
        self.labels: dict[int, str] = {}
        self._classes: ClassTable | None = None
        self.version = 0
        self.lock = RWLock()
        if gpus:  # GPU indexes are not thread-safe, even for searches
            self.search_lock = self.lock.write
        else:
            self.search_lock = self.lock.read

    @property
    def device(self) -> str:
        return "gpu" if self.items.gpus else "cpu"

    # -- mutations: the caller holds self.lock.write() -------------------------------------------
    def upsert(self, version: int, rows: np.ndarray, vectors: np.ndarray, labels: list[str | None],
               existed: np.ndarray) -> None:
        """New or overwritten rows (existed: bool per row) with their human label after the write."""
        self.items.remove(rows[existed])
        self.items.add(rows, vectors)
        self.labelled.remove(np.array([r for r in rows.tolist() if r in self.labels], dtype=np.int64))
        keep = np.array([lab is not None for lab in labels], dtype=bool)
        self.labelled.add(rows[keep], vectors[keep])
        self._set_labels(rows, labels)
        self.version = version

    def remove(self, version: int, rows: np.ndarray) -> None:
        self.items.remove(rows)
        self.labelled.remove(np.array([r for r in rows.tolist() if r in self.labels], dtype=np.int64))
        self._set_labels(rows, [None] * len(rows))
        self.version = version

    def relabel(self, rows: np.ndarray, labels: list[str | None], store: Store) -> None:
        """Human labels changed: move rows in or out of the labelled index (exact vectors from the store)."""
        new_rows = np.array([r for r, lab in zip(rows.tolist(), labels) if lab is not None and r not in self.labels],
                            dtype=np.int64)
        gone = np.array([r for r, lab in zip(rows.tolist(), labels) if lab is None and r in self.labels],
                        dtype=np.int64)
        self.labelled.remove(gone)
        self.labelled.add(new_rows, store.vectors_of(new_rows))
        self._set_labels(rows, labels)

    def _set_labels(self, rows: np.ndarray, labels: list[str | None]) -> None:
        self._classes = None
        for row, lab in zip(rows.tolist(), labels):
            if lab is None:
                self.labels.pop(row, None)
            else:
                self.labels[row] = lab

    # -- searches: the caller holds self.search_lock() -------------------------------------------
    def classes(self) -> ClassTable:
        """The labelled rows' class indices, cached until a label changes."""
        if self._classes is None:
            self._classes = ClassTable(self.labels)
        return self._classes

    def label_selector(self, allowed: set[str]) -> faiss.SearchParameters:
        rows = np.array([r for r, lab in self.labels.items() if lab in allowed], dtype=np.int64)
        return faiss.SearchParameters(sel=faiss.IDSelectorBatch(rows))

    # -- building --------------------------------------------------------------------------------
    def load(self, store: Store, snapshot_dir: Path) -> str:
        """Fill from a snapshot plus the store rows after it, or from the store alone. Returns how."""
        snap = read_snapshot(snapshot_dir, store_id=store.store_id, factory=self.factory, dim=self.dim,
                             max_version=store.version)
        if snap is None:
            how = "rebuilt from the store"
            for rows, _ids, _labels, vectors in store.embeddings():
                self.items.add(rows, vectors)
        else:
            base, cpu = snap
            self.items = FaissIndex(self.dim, self.factory, self.gpus, cpu=cpu)
            self.items.remove(store.tombstones_after(base))
            for rows, _ids, _labels, vectors in store.embeddings("version > ?", (base,)):
                self.items.remove(rows)
                self.items.add(rows, vectors)
            how = f"snapshot v{base} + {store.version - base} later versions"
        for rows, _ids, labels, vectors in store.embeddings("label IS NOT NULL"):
            self.labelled.add(rows, vectors)
            self._set_labels(rows, labels)
        self.version = store.version
        return how

    def save_snapshot(self, snapshot_dir: Path, store_id: str) -> int:
        """Write the items index atomically with the version it covers; the caller holds a read lock."""
        version = self.version
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        name = f"items-v{version}.faiss"
        for stale in snapshot_dir.glob(".items-v*.faiss.tmp"):  # left by a kill during an earlier write
            stale.unlink(missing_ok=True)
        tmp = snapshot_dir / f".{name}.tmp"
        faiss.write_index(self.items.cpu, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, snapshot_dir / name)
        pointer = {"version": version, "file": name, "store_id": store_id, "factory": self.factory,
                   "dim": self.dim}
        tmp_pointer = snapshot_dir / f".{SNAPSHOT_POINTER}.tmp"
        with open(tmp_pointer, "w") as f:
            json.dump(pointer, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_pointer, snapshot_dir / SNAPSHOT_POINTER)
        fsync_dir(snapshot_dir)
        for old in snapshot_dir.glob("items-v*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)
        return version


def read_snapshot(snapshot_dir: Path, *, store_id: str, factory: str, dim: int,
                  max_version: int) -> tuple[int, faiss.Index] | None:
    """(version, CPU index) of a usable snapshot, or None (missing, of another store or factory, corrupt)."""
    pointer_path = snapshot_dir / SNAPSHOT_POINTER
    try:
        pointer = json.loads(pointer_path.read_text())
        if (pointer["store_id"], pointer["factory"], pointer["dim"]) != (store_id, factory, dim):
            return None
        if pointer["version"] > max_version:
            return None
        index = faiss.read_index(str(snapshot_dir / pointer["file"]))
        return int(pointer["version"]), index
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if pointer_path.exists():
            log.warning("ignoring index snapshot: %s", exc)
        return None
