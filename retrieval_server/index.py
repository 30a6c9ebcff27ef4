"""The FAISS mirror of the store, as one object that takes its own locks: inner product on
L2-normalised float32 vectors, int64 ids = store rows. Two indexes: every item (the --index-factory
type) for Search, and the human-labelled items (always exact Flat) for Classify, so the kNN vote is
exact whatever the main index is. Callers write with apply_* (in store-version order) and read with
search and vote; snapshots are in snapshot.py, the FAISS wrapper in faiss_index.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from moco_retrieval.knn import knn_vote

from .faiss_index import GPU_MAX_K, FaissIndex
from .rwlock import RWLock
from .snapshot import SnapshotPointer, read_snapshot, snapshot_writer
from .store import Store


class NoLabels(LookupError):
    """The vote needs human-labelled items and there are none."""


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


@dataclass(frozen=True)
class Hits:
    """Nearest items of one query, best first."""

    scores: np.ndarray  # (n,) float32 cosine similarities
    rows: np.ndarray  # (n,) int64 store rows


@dataclass(frozen=True)
class Vote:
    """InstDisc votes of Q queries among the labelled items (moco_retrieval.knn.knn_vote)."""

    classes: list[str]  # C class names, sorted
    shares: np.ndarray  # (Q, C) float64 vote shares, each row sums to 1
    scores: np.ndarray  # (Q, k) float32 similarities of the voting neighbours, best first
    rows: np.ndarray  # (Q, k) int64 their store rows (-1: padding when fewer than k are labelled)

    def proposals(self) -> tuple[list[str], np.ndarray]:
        """Each query's label and its share: LabelCorpus's proposals, and the predicted labels a
        migration recomputes. The first maximum wins (ties go to the first label in sorted order);
        shares are float32, as LabelProposal carries them, so a threshold taken from one holds."""
        best = self.shares.argmax(axis=1)
        return [self.classes[b] for b in best.tolist()], self.shares[np.arange(len(best)), best].astype(np.float32)


def hits_of(scores: np.ndarray, rows: np.ndarray, keep: np.ndarray, k: int) -> list[Hits]:
    """Per query (a row of the (Q, n) arrays), the first k neighbours where `keep` holds."""
    return [Hits(s[m][:k], r[m][:k]) for s, r, m in zip(scores, rows, keep)]


def leave_out(scores: np.ndarray, rows: np.ndarray, excludes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) neighbours with each query's own row (excludes[q]; -1: none) left out, order kept,
    padded as FAISS pads (row -1) where fewer than k remain."""
    keep = (rows != excludes[:, None]) & (rows >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept neighbours first, in order
    kept = np.take_along_axis(keep, order, axis=1)
    out_scores = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf).astype(np.float32)
    return out_scores, np.where(kept, np.take_along_axis(rows, order, axis=1), -1)


def any_excluded(excludes: np.ndarray | None) -> bool:
    """Whether a query leaves its own row out (then one more neighbour is searched for)."""
    return excludes is not None and bool((excludes >= 0).any())


class ItemIndex:
    """Both indexes, the human labels of labelled rows, and the store version they reflect."""

    def __init__(self, dim: int, factory: str, gpus: int) -> None:
        self.dim, self.factory, self.gpus = dim, factory, gpus
        self.items = FaissIndex(dim, factory, gpus)
        self.labelled = FaissIndex(dim, "Flat", gpus)
        self.labels: dict[int, str] = {}
        self._classes: ClassTable | None = None
        self.version = 0
        self._lock = RWLock()
        # GPU indexes are not thread-safe, even for searches.
        self._search_lock = self._lock.write if gpus else self._lock.read

    @property
    def device(self) -> str:
        return "gpu" if self.items.gpus else "cpu"

    @property
    def item_count(self) -> int:
        return self.items.ntotal

    @property
    def labelled_count(self) -> int:
        return len(self.labels)

    # -- writes, in store-version order ------------------------------------------------------------
    def apply_upsert(
        self, version: int, rows: np.ndarray, vectors: np.ndarray, labels: list[str | None], existed: np.ndarray
    ) -> None:
        """New or overwritten rows (existed: bool per row) with their human label after the write."""
        with self._lock.write():
            self.items.remove(rows[existed])
            self.items.add(rows, vectors)
            self.labelled.remove(self._labelled_among(rows))
            keep = np.array([lab is not None for lab in labels], dtype=bool)
            self.labelled.add(rows[keep], vectors[keep])
            self._set_labels(rows, labels)
            self.version = version

    def apply_delete(self, version: int, rows: np.ndarray) -> None:
        with self._lock.write():
            self.items.remove(rows)
            self.labelled.remove(self._labelled_among(rows))
            self._set_labels(rows, [None] * len(rows))
            self.version = version

    def apply_labels(self, rows: np.ndarray, labels: list[str | None], vectors: np.ndarray) -> None:
        """Human labels changed (None: cleared); `vectors` are the stored embeddings of the rows
        whose new label is not None, in order (exact, so the labelled index stays exact)."""
        labelled = np.array([lab is not None for lab in labels], dtype=bool)
        with self._lock.write():
            new = np.array([r not in self.labels for r in rows.tolist()], dtype=bool) & labelled
            gone = np.array([r in self.labels for r in rows.tolist()], dtype=bool) & ~labelled
            self.labelled.remove(rows[gone])
            self.labelled.add(rows[new], vectors[new[labelled]])
            self._set_labels(rows, labels)

    def _k_search(self, k: int, excludes: np.ndarray | None) -> int:
        """k, plus one when a query is itself stored (within the GPU limit)."""
        k_search = k + any_excluded(excludes)
        return min(k_search, GPU_MAX_K) if self.gpus else k_search

    def _labelled_among(self, rows: np.ndarray) -> np.ndarray:
        return np.array([r for r in rows.tolist() if r in self.labels], dtype=np.int64)

    def _set_labels(self, rows: np.ndarray, labels: list[str | None]) -> None:
        self._classes = None
        for row, lab in zip(rows.tolist(), labels):
            if lab is None:
                self.labels.pop(row, None)
            else:
                self.labels[row] = lab

    # -- reads ---------------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: set[str] | None = None,
        excludes: np.ndarray | None = None,
        min_score: float | None = None,
        among: np.ndarray | None = None,
    ) -> list[Hits]:
        """The k nearest items to each normalised query (Q, D), in one FAISS search: all items, or
        the human-labelled ones whose label is in `labels`, and only rows of `among` when given (a
        metadata filter's matches); each query's own row (excludes[q], -1: none) and scores below
        min_score left out."""
        k_search = self._k_search(k, excludes)
        with self._search_lock():
            allowed = among
            if labels:
                labelled = np.array([r for r, lab in self.labels.items() if lab in labels], dtype=np.int64)
                allowed = labelled if among is None else np.intersect1d(labelled, among)
            if allowed is None:
                scores, rows = self.items.search(queries, k_search)
            elif not len(allowed):
                return [Hits(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in range(len(queries))]
            else:
                params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
                scores, rows = (self.labelled if labels else self.items).search(queries, k_search, params)
        keep = rows >= 0
        if excludes is not None:
            keep &= rows != excludes[:, None]
        if min_score is not None:
            keep &= scores >= min_score
        return hits_of(scores, rows, keep, k)

    def neighbors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest items of each normalised query (Q, D): (scores (Q, k), rows (Q, k), -1
        padding), for batch work such as near-duplicate search."""
        with self._search_lock():
            return self.items.search(queries, min(k, GPU_MAX_K) if self.gpus else k)

    def vote(self, queries: np.ndarray, k: int, tau: float, excludes: np.ndarray | None = None) -> Vote:
        """The InstDisc vote of each normalised query (Q, D) among its k nearest labelled items;
        excludes[q] (-1: none) leaves a stored query's own row out. Raises NoLabels."""
        with self._search_lock():
            if self._classes is None:
                self._classes = ClassTable(self.labels)
            table = self._classes
            if not table.names:
                raise NoLabels("no labelled items: label some with Upsert or SetLabels")
            scores, rows = self.labelled.search(queries, self._k_search(k, excludes))
        if any_excluded(excludes):
            scores, rows = leave_out(scores, rows, excludes, k)
        classes = table.lookup(rows)
        shares = knn_vote(
            torch.from_numpy(np.ascontiguousarray(scores)), torch.from_numpy(classes), len(table.names), tau
        )
        return Vote(table.names, shares.numpy(), scores, rows)

    # -- building and snapshots ----------------------------------------------------------------------
    def load(self, store: Store, snapshot_dir: Path) -> str:
        """Fill from a snapshot plus the store rows after it, or from the store alone. Returns how."""
        snap = read_snapshot(
            snapshot_dir, store_id=store.store_id, factory=self.factory, dim=self.dim, max_version=store.version
        )
        with self._lock.write():
            if snap is None:
                how = "rebuilt from the store"
                for chunk in store.embeddings():
                    self.items.add(chunk.rows, chunk.vectors)
            else:
                base, cpu = snap
                self.items = FaissIndex(self.dim, self.factory, self.gpus, cpu=cpu)
                self.items.remove(store.tombstones_after(base))
                for chunk in store.embeddings("version > ?", (base,)):
                    self.items.remove(chunk.rows)
                    self.items.add(chunk.rows, chunk.vectors)
                how = f"snapshot v{base} + {store.version - base} later versions"
            for chunk in store.embeddings("label IS NOT NULL"):
                self.labelled.add(chunk.rows, chunk.vectors)
                self._set_labels(chunk.rows, chunk.labels)
            self.version = store.version
        return how

    def save_snapshot(self, snapshot_dir: Path, store_id: str) -> int:
        """Write the items index with the version it covers: copied into the file under the read
        lock (searches go on; writes wait for the copy only), made durable (fsync, rename) after it."""
        with contextlib.ExitStack() as durable:
            with self._lock.read():
                version = self.version
                pointer = SnapshotPointer(
                    version=version,
                    file=f"items-v{version}.faiss",
                    store_id=store_id,
                    factory=self.factory,
                    dim=self.dim,
                )
                durable.enter_context(snapshot_writer(snapshot_dir, pointer))(self.items.cpu)
        return version
