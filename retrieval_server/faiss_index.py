"""One FAISS index over L2-normalised float32 vectors addressed by int64 store rows: the CPU index
is the source of truth, with an optional GPU replica (re-cloned after removals, which GPU indexes
handle poorly), and factories that need training (IVF, PQ) serve from an exact flat stand-in until
enough vectors arrive to train them."""

from __future__ import annotations

import logging

import faiss
import numpy as np

log = logging.getLogger(__name__)
# FAISS GPU indexes cannot return more neighbours than this.
GPU_MAX_K = 2048
# Searches of at least this many queries (LabelCorpus chunks, batch searches) use every core (see _threads).
PARALLEL_QUERIES = 16
MAX_THREADS = faiss.omp_get_max_threads()


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
        self.cpu.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64)
        )
        if self._gpu is not None and not self._gpu_stale:
            self._gpu.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64)
            )
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

    def search(
        self, queries: np.ndarray, k: int, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, rows (Q, k) int64 with -1 padding). GPU replica when there is one
        and no selector is needed (GPU indexes take no IDSelector)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if params is None and self.gpus > 0:
            return self._replica().search(queries, k)  # the caller keeps k <= GPU_MAX_K
        faiss.omp_set_num_threads(self._threads(len(queries)))
        if params is None:
            return self.cpu.search(queries, k)
        return self.cpu.search(queries, k, params=params)

    @staticmethod
    def _threads(queries: int) -> int:
        """OpenMP threads for this search (set for the calling gRPC worker thread only): all cores for
        a batch of queries, one for a few. Concurrent searches already share the cores, and one query
        split across threads was slower at every size measured, alone or not (in-process FAISS at
        10k / 100k / 1M vectors: 0.08 / 1.5 / 21 ms on one thread, 0.28 / 5.6 / 55 ms on all;
        bench/results/server_bench*.json)."""
        return MAX_THREADS if queries >= PARALLEL_QUERIES else 1

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
