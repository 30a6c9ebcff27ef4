"""The Retrieval servicer: validate -> embed (batcher) -> backend (embedded or milvus, backend.py) ->
reply. Status codes are API (see proto/retrieval/v1/retrieval.proto); a failed call changes nothing."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc
from moco_retrieval.images import ImageDecodeError, ImageTooLargeError
from moco_retrieval.labels import label_problem

from . import __version__
from .backend import Backend
from .batcher import DeadlineExceeded, DynamicBatcher, QueueFull
from .coalesce import Coalescer
from .config import ServerConfig
from .duplicates import duplicate_groups
from .encoder import Encoder
from .faiss_index import GPU_MAX_K
from .index import Hits, NoLabels, Vote
from .metrics import ServerMetrics
from .neighbors import neighbor, neighbors_wire
from .store import NewItem, Row, StorageError, UnknownIds
from .suggest import suggest

log = logging.getLogger(__name__)
Code = grpc.StatusCode
MAX_ID_BYTES = 512
DEFAULT_SEARCH_K = 10
LABEL_CORPUS_CHUNK = 1024
LIST_LABELS_CHUNK = 1024
MAX_SUGGESTIONS = 10_000
SUGGEST_SAMPLE = 50_000
SUGGEST_UNCERTAIN_FROM = 20  # labelled items per label
DUPLICATE_NEIGHBORS = 10


class RpcError(Exception):
    """A request error with its gRPC status; turned into context.abort by the handlers."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Storage failures of a write (the store rolled it back) as API: no space may clear up (free space,
# raise --store-max-mb); a store that cannot be written needs an operator; other I/O errors may pass.
STORAGE_STATUS = {
    "full": Code.RESOURCE_EXHAUSTED,
    "read_only": Code.FAILED_PRECONDITION,
    "conflict": Code.FAILED_PRECONDITION,
    "io": Code.UNAVAILABLE,
}


def _abort(context: grpc.ServicerContext, exc: RpcError | StorageError) -> None:
    if isinstance(exc, StorageError):
        log.warning("write refused by the storage: %s", exc)
        context.abort(STORAGE_STATUS[exc.kind], str(exc))
    context.abort(exc.code, exc.message)


def _unary(method: Callable) -> Callable:
    """A method answering one response, whose last argument is the call's context."""

    @functools.wraps(method)
    def wrapped(self: RetrievalService, *args: Any) -> Any:
        context: grpc.ServicerContext = args[-1]
        try:
            _deadline(context)
            return method(self, *args)
        except (RpcError, StorageError) as exc:
            _abort(context, exc)

    return wrapped


def _streaming(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapped(self: RetrievalService, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            _deadline(context)
            yield from method(self, request, context)
        except (RpcError, StorageError) as exc:
            _abort(context, exc)

    return wrapped


def to_vector(x: np.ndarray, packed: bool) -> pb.Vector:
    """A float32 vector as Vector.data (little-endian bytes) or Vector.values."""
    if packed:
        return pb.Vector(data=np.ascontiguousarray(x, dtype="<f4").tobytes())
    return pb.Vector(values=x.tolist())


def stored_item(row: Row, packed: bool = False) -> pb.StoredItem:
    """A stored item as the API returns it (with its embedding when the row holds one)."""
    item = pb.StoredItem(
        id=row.id,
        label=row.label or "",
        predicted_label=row.predicted_label or "",
        predicted_confidence=row.predicted_confidence or 0.0,
        metadata=row.metadata,
    )
    if row.embedding is not None:
        item.embedding.CopyFrom(to_vector(row.embedding, packed))
    return item


def image_status(exc: ImageDecodeError) -> grpc.StatusCode:
    return Code.RESOURCE_EXHAUSTED if isinstance(exc, ImageTooLargeError) else Code.INVALID_ARGUMENT


def _deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic(), None without one; DEADLINE_EXCEEDED once passed
    (a call whose deadline passed is not run)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    if remaining <= 0:
        raise RpcError(Code.DEADLINE_EXCEEDED, "deadline passed before the call was run")
    return time.monotonic() + remaining


class RetrievalService(pb_grpc.RetrievalServicer):
    def __init__(
        self,
        cfg: ServerConfig,
        encoder: Encoder,
        batcher: DynamicBatcher,
        backend: Backend,
        metrics: ServerMetrics,
    ) -> None:
        self.cfg, self.encoder, self.batcher, self.backend, self.m = cfg, encoder, batcher, backend, metrics
        self.dim = encoder.dim
        self.max_k = min(cfg.max_k, GPU_MAX_K) if backend.gpus else cfg.max_k
        # Concurrent single-query calls share index calls (coalesce.py), batches of a call do not.
        self._coalesced_search = Coalescer(self._search_index, cfg.max_queries)
        self._coalesced_vote = Coalescer(self._vote_index, cfg.max_queries)

    # -- validation -------------------------------------------------------------------------------
    def _vector(self, v: pb.Vector, what: str = "vector") -> np.ndarray:
        if v.data and len(v.values):
            raise RpcError(Code.INVALID_ARGUMENT, f"{what} sets both values and data; set one")
        if v.data:
            if len(v.data) % 4:
                raise RpcError(Code.INVALID_ARGUMENT, f"{what} data is {len(v.data)} bytes, not float32s")
            x = np.frombuffer(v.data, dtype="<f4")
        else:
            x = np.asarray(v.values, dtype=np.float32)
        if x.shape != (self.dim,):
            raise RpcError(Code.INVALID_ARGUMENT, f"{what} has dimension {x.size}, the model's is {self.dim}")
        if not np.isfinite(x).all():
            raise RpcError(Code.INVALID_ARGUMENT, f"{what} contains NaN or Inf")
        norm = float(np.linalg.norm(x.astype(np.float64)))
        if norm == 0.0:
            raise RpcError(Code.INVALID_ARGUMENT, f"{what} is all zeros (cannot be normalised)")
        return (x / norm).astype(np.float32)

    @staticmethod
    def _count(request: Any, field: str, default: int) -> int:
        """An optional count field: `default` when unset; negative is INVALID_ARGUMENT."""
        if not request.HasField(field):
            return default
        value = getattr(request, field)
        if value < 0:
            raise RpcError(Code.INVALID_ARGUMENT, f"{field} must not be negative, got {value}")
        return value

    def _k(self, request: Any, default: int) -> int:
        if not request.HasField("k"):
            return default
        if request.k <= 0:
            raise RpcError(Code.INVALID_ARGUMENT, f"k must be positive, got {request.k}")
        if request.k > self.max_k:
            raise RpcError(Code.OUT_OF_RANGE, f"k={request.k} is above the server's max_k={self.max_k}")
        return request.k

    def _tau(self, request: Any) -> float:
        if not request.HasField("tau"):
            return self.cfg.default_tau
        if not math.isfinite(request.tau) or request.tau <= 0:
            raise RpcError(Code.INVALID_ARGUMENT, f"tau must be a positive number, got {request.tau}")
        return float(request.tau)

    @staticmethod
    def _check_id(item_id: str) -> None:
        if not 1 <= len(item_id.encode()) <= MAX_ID_BYTES:
            raise RpcError(
                Code.INVALID_ARGUMENT, f"id must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {len(item_id.encode())}"
            )

    @staticmethod
    def _check_label(item_id: str, label: str) -> None:
        """A non-empty label follows the shared rule (moco_retrieval.labels); "" means clear or keep."""
        problem = label and label_problem(label)
        if problem:
            raise RpcError(Code.INVALID_ARGUMENT, f"label of {item_id!r}: {problem}")

    def _embed(self, images: list[bytes], context: grpc.ServicerContext) -> list[np.ndarray | ImageDecodeError]:
        try:
            return self.batcher.embed(images, _deadline(context))
        except QueueFull as exc:
            raise RpcError(Code.RESOURCE_EXHAUSTED, str(exc)) from exc
        except DeadlineExceeded as exc:
            raise RpcError(Code.DEADLINE_EXCEEDED, str(exc)) from exc

    def _queries(
        self, queries: Sequence[pb.Query], context: grpc.ServicerContext, batch: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(normalised query vectors (Q, D), each query's store row to leave out of its results,
        -1 for none). The images are embedded in one batcher call and the ids read in one lookup;
        in a batch the first bad query fails the call, named by its index."""
        if batch and not queries:
            raise RpcError(Code.INVALID_ARGUMENT, "no queries")
        if len(queries) > self.cfg.max_queries:
            raise RpcError(
                Code.OUT_OF_RANGE, f"{len(queries)} queries is above the server's max_queries={self.cfg.max_queries}"
            )

        def where(i: int) -> str:
            return f"queries[{i}]: " if batch else ""

        vectors = np.empty((len(queries), self.dim), np.float32)
        excludes = np.full(len(queries), -1, np.int64)
        kinds = [q.WhichOneof("kind") for q in queries]
        for i, (query, kind) in enumerate(zip(queries, kinds)):
            if kind is None:
                raise RpcError(Code.INVALID_ARGUMENT, f"{where(i)}empty query: set image, id or vector")
            if kind == "vector":
                vectors[i] = self._vector(query.vector, f"{where(i)}query vector")
        by_id = [i for i, kind in enumerate(kinds) if kind == "id"]
        if by_id:
            found = self.backend.get([queries[i].id for i in by_id], with_embedding=True)
            for i in by_id:
                row = found.get(queries[i].id)
                if row is None:
                    raise RpcError(Code.NOT_FOUND, f"{where(i)}unknown id: {queries[i].id!r}")
                vectors[i], excludes[i] = row.embedding, row.row
        by_image = [i for i, kind in enumerate(kinds) if kind == "image"]
        if by_image:
            for i, result in zip(by_image, self._embed([queries[i].image for i in by_image], context)):
                if isinstance(result, ImageDecodeError):
                    raise RpcError(image_status(result), f"{where(i)}query image: {result}")
                vectors[i] = result
        return vectors, excludes

    # -- Embed ------------------------------------------------------------------------------------
    @_unary
    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        if not request.images:
            raise RpcError(Code.INVALID_ARGUMENT, "no images")
        results = self._embed(list(request.images), context)
        for i, r in enumerate(results):
            if isinstance(r, ImageDecodeError):
                raise RpcError(image_status(r), f"image {i}: {r}")
        return pb.EmbedResponse(embeddings=[to_vector(r, request.packed) for r in results], dim=self.dim)

    # -- writes -----------------------------------------------------------------------------------
    @_unary
    def upsert_batch(self, sequence: int, request: pb.UpsertRequest, context: grpc.ServicerContext) -> pb.UpsertAck:
        """One message of an Upsert stream (serving.Router streams them, each to the service
        current when it arrives)."""
        errors: list[pb.ItemError] = []
        vectors: dict[int, np.ndarray] = {}
        image_positions: list[int] = []
        seen: set[str] = set()

        def fail(i: int, code: grpc.StatusCode, message: str) -> None:
            errors.append(pb.ItemError(id=request.items[i].id, index=i, code=code.value[0], message=message))

        for i, item in enumerate(request.items):
            try:
                self._check_id(item.id)
                if item.id in seen:
                    raise RpcError(Code.INVALID_ARGUMENT, f"duplicate id {item.id!r} in this batch")
                seen.add(item.id)
                self._check_label(item.id, item.label)
                content = item.WhichOneof("content")
                if content == "embedding":
                    vectors[i] = self._vector(item.embedding, "embedding")
                elif content == "image":
                    image_positions.append(i)
                else:
                    raise RpcError(Code.INVALID_ARGUMENT, "item has neither image nor embedding")
            except RpcError as exc:
                fail(i, exc.code, exc.message)
        if image_positions:
            try:
                embedded = self._embed([request.items[i].image for i in image_positions], context)
            except RpcError as exc:
                if exc.code == Code.DEADLINE_EXCEEDED:
                    raise
                embedded = [exc] * len(image_positions)  # queue full: these items fail, the rest goes in
            for i, result in zip(image_positions, embedded):
                if isinstance(result, RpcError):
                    fail(i, result.code, result.message)
                elif isinstance(result, ImageDecodeError):
                    fail(i, image_status(result), str(result))
                else:
                    vectors[i] = result
        positions = sorted(vectors)
        items = [
            NewItem(
                id=request.items[i].id,
                embedding=vectors[i],
                label=request.items[i].label or None,
                metadata=dict(request.items[i].metadata),
            )
            for i in positions
        ]
        if items:
            self.backend.upsert(items)
        errors.sort(key=lambda e: e.index)
        return pb.UpsertAck(sequence=sequence, upserted=len(items), failed=len(errors), errors=errors)

    @_unary
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        try:
            deleted = self.backend.delete(list(request.ids), request.ignore_missing)
        except UnknownIds as exc:
            raise RpcError(Code.NOT_FOUND, f"{exc}; nothing deleted") from exc
        return pb.DeleteResponse(deleted=deleted)

    @_unary
    def SetLabels(self, request: pb.SetLabelsRequest, context: grpc.ServicerContext) -> pb.SetLabelsResponse:
        predicted = request.source == pb.PREDICTED
        ids = [a.id for a in request.assignments]
        if len(set(ids)) != len(ids):
            raise RpcError(Code.INVALID_ARGUMENT, "an id appears twice in assignments")
        for a in request.assignments:
            self._check_label(a.id, a.label)
            if predicted and not math.isfinite(a.confidence):
                raise RpcError(Code.INVALID_ARGUMENT, f"confidence of {a.id!r} is not a number")
        assignments = [(a.id, a.label or None, float(a.confidence)) for a in request.assignments]
        try:
            updated = self.backend.set_labels(assignments, predicted)
        except UnknownIds as exc:
            raise RpcError(Code.NOT_FOUND, f"{exc}; no label changed") from exc
        return pb.SetLabelsResponse(updated=updated)

    def close(self) -> str:
        """After the last call: stop the batcher, then close the backend; a line for the log."""
        self.batcher.close()
        return self.backend.close()

    # -- reads ------------------------------------------------------------------------------------
    @_unary
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        found = self.backend.get(list(request.ids), with_embedding=request.include_embedding)
        missing = [i for i in request.ids if i not in found]
        if missing and not request.ignore_missing:
            raise RpcError(Code.NOT_FOUND, str(UnknownIds(missing)))
        return pb.GetResponse(items=[stored_item(found[i], request.packed) for i in request.ids if i in found])

    @_streaming
    def ListLabels(self, request: pb.ListLabelsRequest, context: grpc.ServicerContext) -> Iterator[pb.StoredItem]:
        for page in self.backend.labelled_items(request.human_only, LIST_LABELS_CHUNK):
            if not context.is_active():
                return
            yield from (stored_item(row) for row in page)

    def _neighbors(self, found: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[list[bytes], list[float]]]:
        """(encoded items, scores) of each query's (scores, rows), from one backend lookup; rows
        deleted since the search are left out."""
        encoded = self.backend.encoded(np.unique(np.concatenate([rows for _, rows in found])).tolist())
        out = []
        for scores, rows in found:
            kept = [(encoded[r], s) for s, r in zip(scores.tolist(), rows.tolist()) if r in encoded]
            out.append(([item for item, _ in kept], [s for _, s in kept]))
        return out

    def _search(
        self, request: pb.SearchRequest | pb.SearchBatchRequest, queries: Sequence[pb.Query], context, batch: bool
    ) -> list[pb.SearchResponse]:
        k = self._k(request, DEFAULT_SEARCH_K)
        if request.HasField("min_score") and math.isnan(request.min_score):
            raise RpcError(Code.INVALID_ARGUMENT, "min_score is NaN")
        labels, metadata = self._filters(request)
        min_score = request.min_score if request.HasField("min_score") else None
        vectors, excludes = self._queries(queries, context, batch)
        key = (k, frozenset(labels), min_score, tuple(sorted(metadata.items())))
        start = time.perf_counter()
        if len(vectors) == 1 and self.cfg.coalesce == "all":
            hits = [self._coalesced_search(key, vectors[0], int(excludes[0]))]
        else:
            hits = self._search_index(key, vectors, excludes)
        self.m.index_search_seconds.labels("search").observe(time.perf_counter() - start)
        return [
            pb.SearchResponse.FromString(neighbors_wire(pb.SearchResponse, *n))
            for n in self._neighbors([(h.scores, h.rows) for h in hits])
        ]

    def _search_index(self, key: tuple, vectors: np.ndarray, excludes: np.ndarray) -> list[Hits]:
        k, labels, min_score, metadata = key
        return self.backend.search(vectors, k, set(labels), excludes, min_score, dict(metadata))

    @staticmethod
    def _filters(request: pb.SearchRequest | pb.SearchBatchRequest) -> tuple[set[str], dict[str, str]]:
        """The label and metadata filters. Labels follow the label rule (no other label can be
        stored); metadata keys and values may hold no control character, which both backends would
        otherwise match differently (Milvus's filter expressions cannot spell them)."""
        for label in request.labels:
            problem = label_problem(label)
            if problem:
                raise RpcError(Code.INVALID_ARGUMENT, f"labels filter {label[:100]!r}: {problem}")
        for key, value in request.metadata.items():
            for what, text in (("key", key), ("value", value)):
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
                    raise RpcError(
                        Code.INVALID_ARGUMENT, f"metadata filter {what} {text[:100]!r} holds a control character"
                    )
        return set(request.labels), dict(request.metadata)

    @_unary
    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        return self._search(request, [request.query], context, batch=False)[0]

    @_unary
    def SearchBatch(self, request: pb.SearchBatchRequest, context: grpc.ServicerContext) -> pb.SearchBatchResponse:
        return pb.SearchBatchResponse(results=self._search(request, request.queries, context, batch=True))

    def _vote(self, queries: np.ndarray, k: int, tau: float, op: str, excludes: np.ndarray | None = None) -> Vote:
        start = time.perf_counter()
        try:
            if len(queries) == 1 and self.cfg.coalesce != "none":
                vote = self._coalesced_vote((k, tau), queries[0], -1 if excludes is None else int(excludes[0]))
            else:
                vote = self.backend.vote(queries, k, tau, excludes)
        except NoLabels as exc:
            raise RpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        self.m.index_search_seconds.labels(op).observe(time.perf_counter() - start)
        return vote

    def _vote_index(self, key: tuple[int, float], vectors: np.ndarray, excludes: np.ndarray) -> list[Vote]:
        """One vote of the batch, split into one Vote per query."""
        vote = self.backend.vote(vectors, *key, excludes)
        return [
            Vote(vote.classes, vote.shares[q : q + 1], vote.scores[q : q + 1], vote.rows[q : q + 1])
            for q in range(len(vectors))
        ]

    def _classify(
        self, request: pb.ClassifyRequest | pb.ClassifyBatchRequest, queries: Sequence[pb.Query], context, batch: bool
    ) -> list[pb.ClassifyResponse]:
        k = self._k(request, self.cfg.default_k)
        tau = self._tau(request)
        shown = self._count(request, "neighbors", k)
        vectors, excludes = self._queries(queries, context, batch)
        vote = self._vote(vectors, k, tau, "classify", excludes)
        names = vote.classes
        voters = [np.flatnonzero(rows >= 0)[:shown] for rows in vote.rows]
        neighbors = self._neighbors([(vote.scores[q][v], vote.rows[q][v]) for q, v in enumerate(voters)])
        out = []
        for shares, voted_neighbors in zip(vote.shares, neighbors):
            best = int(np.argmax(shares))  # first maximum: ties go to the first label in sorted order
            voted = sorted((c for c in range(len(names)) if shares[c] > 0), key=lambda c: (-shares[c], c))
            response = pb.ClassifyResponse.FromString(neighbors_wire(pb.ClassifyResponse, *voted_neighbors))
            response.label, response.confidence = names[best], float(shares[best])
            response.scores.extend(pb.ClassScore(label=names[c], score=float(shares[c])) for c in voted)
            out.append(response)
        return out

    @_unary
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        return self._classify(request, [request.query], context, batch=False)[0]

    @_unary
    def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        return pb.ClassifyBatchResponse(results=self._classify(request, request.queries, context, batch=True))

    @_streaming
    def LabelCorpus(self, request: pb.LabelCorpusRequest, context: grpc.ServicerContext) -> Iterator[pb.LabelProposal]:
        k = self._k(request, self.cfg.default_k)
        tau = self._tau(request)
        if not self.backend.labelled_count:
            raise RpcError(Code.FAILED_PRECONDITION, "no labelled items: label some with Upsert or SetLabels")
        for chunk in self.backend.unlabelled(LABEL_CORPUS_CHUNK):
            if not context.is_active():
                return
            labels, confidence = self._vote(chunk.vectors, k, tau, "label_corpus").proposals()
            proposals = [
                (row, item_id, lab, c)
                for row, item_id, lab, c in zip(chunk.rows.tolist(), chunk.ids, labels, confidence.tolist())
                if c >= request.min_confidence
            ]
            if request.apply and proposals:
                self.backend.set_predicted_rows([(row, lab, conf) for row, _i, lab, conf in proposals])
            for _row, item_id, lab, conf in proposals:
                yield pb.LabelProposal(id=item_id, label=lab, confidence=conf)

    @_unary
    def Suggest(self, request: pb.SuggestRequest, context: grpc.ServicerContext) -> pb.SuggestResponse:
        if request.n <= 0:
            raise RpcError(Code.INVALID_ARGUMENT, f"n must be positive, got {request.n}")
        if request.n > MAX_SUGGESTIONS:
            raise RpcError(Code.OUT_OF_RANGE, f"n={request.n} is above max_suggestions={MAX_SUGGESTIONS}")
        sample = self._count(request, "sample", SUGGEST_SAMPLE)
        if sample <= 0:
            raise RpcError(Code.INVALID_ARGUMENT, f"sample must be positive, got {sample}")
        uncertain_from = self._count(request, "uncertain_from", SUGGEST_UNCERTAIN_FROM)
        k, tau = self._k(request, self.cfg.default_k), self._tau(request)
        if self.backend.item_count <= self.backend.labelled_count:
            raise RpcError(Code.FAILED_PRECONDITION, "no unlabelled item is stored: nothing to suggest")
        start = time.perf_counter()
        found = suggest(self.backend, min(request.n, sample), request.seed, sample, k, tau, uncertain_from)
        self.m.index_search_seconds.labels("suggest").observe(time.perf_counter() - start)
        stored = self.backend.by_rows([s.row for s in found.items])
        return pb.SuggestResponse(
            suggestions=[
                pb.Suggestion(
                    id=stored[s.row].id,
                    reason=s.reason,
                    score=s.score,
                    predicted_label=s.predicted_label,
                    margin=s.margin,
                    metadata=stored[s.row].metadata,
                )
                for s in found.items
                if s.row in stored  # deleted meanwhile
            ],
            candidates=found.candidates,
            clusters=found.clusters,
        )

    @_streaming
    def Duplicates(self, request: pb.DuplicatesRequest, context: grpc.ServicerContext) -> Iterator[pb.DuplicateGroup]:
        if not 0.0 < request.min_score <= 1.0:
            raise RpcError(Code.INVALID_ARGUMENT, f"min_score must be in (0, 1], got {request.min_score}")
        neighbors = self._count(request, "max_neighbors", DUPLICATE_NEIGHBORS)
        if neighbors <= 0:
            raise RpcError(Code.INVALID_ARGUMENT, f"max_neighbors must be positive, got {neighbors}")
        if neighbors > self.max_k:
            raise RpcError(Code.OUT_OF_RANGE, f"max_neighbors={neighbors} is above the server's max_k={self.max_k}")
        for group in duplicate_groups(self.backend, request.min_score, neighbors):
            if not context.is_active():
                return
            stored = self.backend.by_rows(group.rows)
            members = [
                (r, score)
                for row, score in zip(group.rows.tolist(), group.scores.tolist())
                if (r := stored.get(row)) is not None
            ]
            yield pb.DuplicateGroup(
                items=[neighbor(r, float(score)) for r, score in sorted(members, key=lambda m: m[0].id)]
            )

    @_unary
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        total, label_counts, predicted = self.backend.counts()
        meta = self.encoder.meta
        return pb.InfoResponse(
            model_fingerprint=meta.fingerprint,
            arch=meta.arch,
            dim=self.dim,
            input_size=meta.preprocessing.input_size,
            index_type=self.backend.index_type,
            index_device=self.backend.device,
            index_gpus=self.backend.gpus,
            item_count=total,
            labelled_count=sum(label_counts.values()),
            label_counts=label_counts,
            predicted_count=predicted,
            max_k=self.max_k,
            default_k=self.cfg.default_k,
            default_tau=self.cfg.default_tau,
            max_batch_size=self.cfg.max_batch_size,
            max_message_bytes=self.cfg.max_message_bytes,
            server_version=__version__,
            model_device=self.encoder.device,
            max_suggestions=MAX_SUGGESTIONS,
            max_queries=self.cfg.max_queries,
        )
