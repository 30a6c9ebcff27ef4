"""Where the items live: the interface the service is written against, and the choice of backend.

Everything above it (validation, status codes, the embedding batcher, metrics, auth, the InstDisc
vote's numerics in moco_retrieval.knn) is shared; a backend stores items and finds neighbours:
  embedded  SQLite (system of record) + in-process FAISS, one process per store (embedded.py);
  milvus    a Milvus collection through pymilvus: Milvus Lite in-process, or a Milvus cluster that
            any number of stateless server replicas share (milvus_backend.py).
Items are addressed inside the server by an int64 `row` (SQLite's rowid; for Milvus a hash of the id,
so every replica computes the same one); ids are what the API speaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from .index import Hits, Vote
from .store import EmbeddingChunk, NewItem, Row


class Backend(Protocol):
    """Stored items and the nearest-neighbour search over them. Writes are each all or nothing
    as the proto documents (see each backend for what it can guarantee) and raise UnknownIds for
    ids that must exist; the vote raises NoLabels without labelled items; storage failures raise
    StorageError."""

    kind: str  # "embedded" or "milvus"
    index_type: str  # e.g. "Flat", "IVF1024,Flat" (FAISS factory) or "milvus:HNSW"
    device: str  # where searches run: "cpu" or "gpu"
    gpus: int  # GPUs the index uses (0 on the CPU or when it lives elsewhere)

    @property
    def item_count(self) -> int: ...

    @property
    def labelled_count(self) -> int: ...

    # -- writes -----------------------------------------------------------------------------------
    def upsert(self, items: list[NewItem]) -> int:
        """Insert or overwrite items (an item without a label keeps its stored one); how many."""

    def delete(self, ids: list[str], ignore_missing: bool) -> int:
        """Delete items; how many were stored."""

    def set_labels(self, assignments: list[tuple[str, str | None, float]], predicted: bool) -> int:
        """Set (None: clear) human or predicted labels of (id, label, confidence); how many."""

    def set_predicted_rows(self, proposals: list[tuple[int, str, float]]) -> None:
        """Store LabelCorpus proposals (row, label, confidence); rows deleted meanwhile are skipped."""

    # -- reads ------------------------------------------------------------------------------------
    def get(self, ids: list[str], with_embedding: bool = False) -> dict[str, Row]: ...

    def by_rows(self, rows: Iterable[int]) -> dict[int, Row]: ...

    def encoded(self, rows: Iterable[int]) -> dict[int, bytes]:
        """Each stored row's Neighbor without its score (neighbors.encode_item); rows deleted
        meanwhile are left out."""

    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: set[str],
        excludes: np.ndarray | None,
        min_score: float | None,
        metadata: dict[str, str],
    ) -> list[Hits]:
        """The k nearest items to each normalised query (Q, D), searched together; `labels`: only
        human-labelled items with one of them; `metadata`: only items with each key = value;
        excludes[q]: a row left out of query q's results (-1: none)."""

    def vote(self, queries: np.ndarray, k: int, tau: float, excludes: np.ndarray | None = None) -> Vote:
        """The InstDisc vote of each normalised query (Q, D) among its k nearest labelled items;
        excludes[q]: a row left out of query q's neighbours (-1: none)."""

    def neighbors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), rows (Q, k), -1 padding) of the k nearest items of each query."""

    def embeddings(self, labelled: bool | None = None, chunk: int = 4096) -> Iterator[EmbeddingChunk]:
        """Every item (labelled None), or those with (True) or without (False) a human label."""

    def unlabelled(self, chunk: int) -> Iterator[EmbeddingChunk]:
        """The items without a human label for LabelCorpus, in the order its proto documents,
        holding no read transaction open between chunks (the stream may be slow)."""

    def labelled_items(self, human_only: bool, chunk: int) -> Iterator[list[Row]]:
        """The items with a human label (or, unless human_only, a predicted one), in pages of at
        most `chunk`, in the order ListLabels documents, holding no read transaction between pages."""

    def counts(self) -> tuple[int, dict[str, int], int]:
        """(items, human-labelled items per label, items with a predicted and no human label)."""

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> str:
        """After the last call: persist what speeds up the next start, release the storage; a
        line for the log."""
