"""RetrievalClient: typed access to every RPC of retrieval.v1, results as dataclasses and numpy.

One channel per client, reused by every call. Every gRPC failure surfaces as RetrievalError
carrying the status code and message. Bulk ingestion (`upsert_many`) streams batches over the
bidirectional Upsert RPC, keeps at most `max_in_flight` unacknowledged batches, reports per-item
failures without stopping, and on UNAVAILABLE reconnects with exponential backoff and resends only
the batches the server has not acknowledged.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# Bytes reserved for the UpsertRequest framing around the items when packing a batch.
_MESSAGE_OVERHEAD = 1024
_GET_CHUNK = 500


class RetrievalError(Exception):
    """A failed call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str, address: str = ""):
        self.code = code
        self.message = message
        self.address = address
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return f"cannot reach server at {self.address} ({self.message})"
        if self.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"server at {self.address} did not answer in time ({self.message})"
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc(cls, err: grpc.RpcError, address: str) -> RetrievalError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", address)


@dataclass(frozen=True)
class Neighbor:
    id: str
    score: float
    label: str
    predicted_label: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class StoredItem:
    id: str
    label: str
    predicted_label: str
    predicted_confidence: float
    metadata: dict[str, str]
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    scores: list[tuple[str, float]]
    neighbors: list[Neighbor]


@dataclass(frozen=True)
class Suggestion:
    """An item to label next: reason "typical" (of a cluster with no label yet) or "uncertain" (its
    vote is split), the vote's label and margin when labels exist, and its metadata."""

    id: str
    reason: str
    score: float
    predicted_label: str
    margin: float
    metadata: dict[str, str]


@dataclass(frozen=True)
class Proposal:
    id: str
    label: str
    confidence: float


@dataclass(frozen=True)
class ServerInfo:
    model_fingerprint: str
    arch: str
    dim: int
    input_size: int
    index_type: str
    index_device: str
    index_gpus: int
    item_count: int
    labelled_count: int
    label_counts: dict[str, int]
    max_k: int
    default_k: int
    default_tau: float
    max_batch_size: int
    max_message_bytes: int
    server_version: str
    model_device: str
    max_suggestions: int = 0
    predicted_count: int = 0
    max_queries: int = 0


@dataclass(frozen=True)
class Switched:
    """What SwitchModel did: the fingerprints before and after, the items changed since the
    migration that it carried, those of them whose image is missing (id, uri, reason), and the
    items the new store holds."""

    previous_fingerprint: str
    model_fingerprint: str
    carried: int
    missing: list[tuple[str, str, str]]
    item_count: int


@dataclass
class UpsertItem:
    """One item to store: exactly one of `image` (encoded bytes) or `embedding`."""

    id: str
    image: bytes | None = None
    embedding: np.ndarray | Sequence[float] | None = None
    label: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemFailure:
    """An item that was not stored; `index` is its position in the input of upsert_many."""

    index: int
    id: str
    code: grpc.StatusCode
    message: str


@dataclass
class UpsertResult:
    upserted: int = 0
    failures: list[ItemFailure] = field(default_factory=list)


@dataclass(eq=False)
class _Batch:
    indices: list[int]  # positions of its items in the input of upsert_many
    request: pb.UpsertRequest
    stream: int = 0  # number of the last stream that sent it


class _Stream:
    """One Upsert stream: the batch each sequence number carries, until acknowledged."""

    def __init__(self, number: int):
        self.number = number
        self.sent: dict[int, _Batch] = {}
        self.next_sequence = 0
        self.source_error: list[Exception] = []  # raised by the caller's item iterator


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _vector(values: np.ndarray | Sequence[float]) -> pb.Vector:
    """Sent packed: little-endian float32 bytes (Vector.data), no per-element conversion."""
    return pb.Vector(data=np.ascontiguousarray(values, dtype="<f4").reshape(-1).tobytes())


def _array(vec: pb.Vector) -> np.ndarray:
    """Vector.data or Vector.values (a server predating packed vectors) as a float32 array."""
    if vec.data:
        return np.frombuffer(vec.data, dtype="<f4").astype(np.float32)
    return np.asarray(vec.values, dtype=np.float32)


def _query(
    image: bytes | None = None,
    id: str | None = None,  # noqa: A002 - the proto's Query.id
    vector: np.ndarray | Sequence[float] | None = None,
) -> pb.Query:
    given = [x is not None for x in (image, id, vector)]
    if sum(given) != 1:
        raise ValueError("give exactly one of image, id or vector as the query")
    if image is not None:
        return pb.Query(image=bytes(image))
    if id is not None:
        return pb.Query(id=id)
    return pb.Query(vector=_vector(vector))


def _with(request, **optional: object):
    """`request` with each optional field set that is not None (unset ones take the server's default)."""
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    return request


def _neighbor(n: pb.Neighbor) -> Neighbor:
    return Neighbor(
        id=n.id, score=float(n.score), label=n.label, predicted_label=n.predicted_label, metadata=dict(n.metadata)
    )


def _stored(item: pb.StoredItem) -> StoredItem:
    return StoredItem(
        id=item.id,
        label=item.label,
        predicted_label=item.predicted_label,
        predicted_confidence=float(item.predicted_confidence),
        metadata=dict(item.metadata),
        embedding=_array(item.embedding) if item.HasField("embedding") else None,
    )


def _classification(r: pb.ClassifyResponse) -> Classification:
    return Classification(
        label=r.label,
        confidence=float(r.confidence),
        scores=[(x.label, float(x.score)) for x in r.scores],
        neighbors=[_neighbor(n) for n in r.neighbors],
    )


def _suggestions(r: pb.SuggestResponse) -> list[Suggestion]:
    reasons = {pb.Suggestion.TYPICAL: "typical", pb.Suggestion.UNCERTAIN: "uncertain"}
    return [
        Suggestion(s.id, reasons[s.reason], float(s.score), s.predicted_label, float(s.margin), dict(s.metadata))
        for s in r.suggestions
    ]


def _proposal(p: pb.LabelProposal) -> Proposal:
    return Proposal(id=p.id, label=p.label, confidence=float(p.confidence))


def _switched(r: pb.SwitchModelResponse) -> Switched:
    return Switched(
        previous_fingerprint=r.previous_fingerprint,
        model_fingerprint=r.model_fingerprint,
        carried=r.carried,
        missing=[(m.id, m.uri, m.reason) for m in r.missing],
        item_count=r.item_count,
    )


def _server_info(r: pb.InfoResponse) -> ServerInfo:
    return ServerInfo(
        model_fingerprint=r.model_fingerprint,
        arch=r.arch,
        dim=r.dim,
        input_size=r.input_size,
        index_type=r.index_type,
        index_device=r.index_device,
        index_gpus=r.index_gpus,
        item_count=r.item_count,
        labelled_count=r.labelled_count,
        label_counts=dict(r.label_counts),
        max_k=r.max_k,
        default_k=r.default_k,
        default_tau=float(r.default_tau),
        max_batch_size=r.max_batch_size,
        max_message_bytes=r.max_message_bytes,
        server_version=r.server_version,
        model_device=r.model_device,
        max_suggestions=r.max_suggestions,
        predicted_count=r.predicted_count,
        max_queries=r.max_queries,
    )


def _item_proto(item: UpsertItem) -> pb.Item:
    if (item.image is None) == (item.embedding is None):
        raise ValueError(f"item {item.id!r}: give exactly one of image or embedding")
    msg = pb.Item(id=item.id, label=item.label, metadata=item.metadata)
    if item.image is not None:
        msg.image = bytes(item.image)
    else:
        msg.embedding.CopyFrom(_vector(item.embedding))
    return msg


def _credentials(tls: bool | str | Path) -> grpc.ChannelCredentials | None:
    if tls is False or tls is None:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())


Op = Generator[tuple[str, Any], Any, Any]  # yields (RPC name, request), receives the response


class _ClientBase:
    """What the blocking and the asyncio clients share: the channel settings and every unary
    method, written once as an Op generator that `_run` drives (blocking here, awaited in aio)."""

    _channels: Any  # the grpc module or grpc.aio: where the channel comes from

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
        tls: bool | str | Path = False,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        credentials = _credentials(tls)
        self._info: ServerInfo | None = None
        if credentials is not None:
            self._channel = self._channels.secure_channel(address, credentials, options)
        else:
            self._channel = self._channels.insecure_channel(address, options)
        self._stub = pb_grpc.RetrievalStub(self._channel)

    def _run(self, op: Op):
        raise NotImplementedError

    def _info_op(self) -> Op:
        self._info = _server_info((yield "Info", pb.InfoRequest()))
        return self._info

    def _limits(self) -> Op:
        """Info (batch and message limits), fetched on first use and kept."""
        return self._info if self._info is not None else (yield from self._info_op())

    @staticmethod
    def _max_payload(info: ServerInfo) -> int:
        """Largest item payload that fits one message; unlimited when the server reports 0."""
        return info.max_message_bytes - _MESSAGE_OVERHEAD if info.max_message_bytes else 1 << 62

    def info(self) -> ServerInfo:
        return self._run(self._info_op())

    def _embed_op(self, images: Sequence[bytes]) -> Op:
        info = yield from self._limits()
        out: list[np.ndarray] = []
        for chunk in _chunks(list(images), info.max_batch_size or 1 << 30, self._max_payload(info), len):
            r = yield "Embed", pb.EmbedRequest(images=[bytes(b) for b in chunk], packed=True)
            out.extend(_array(v) for v in r.embeddings)
        return np.stack(out).astype(np.float32, copy=False) if out else np.zeros((0, info.dim), np.float32)

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, dim) float32 L2-normalised embeddings, in input order; split into requests that
        respect the server's batch and message limits."""
        return self._run(self._embed_op(images))

    def _one(self, method: str, request, convert: Callable) -> Op:
        return convert((yield method, request))

    def delete(self, ids: Sequence[str], ignore_missing: bool = False) -> int:
        return self._run(
            self._one("Delete", pb.DeleteRequest(ids=list(ids), ignore_missing=ignore_missing), lambda r: r.deleted)
        )

    def set_labels(
        self,
        labels: dict[str, str] | Sequence[tuple[str, str]],
        predicted: bool = False,
        confidences: dict[str, float] | None = None,
    ) -> int:
        """Set (or clear, with "") human labels, or predicted ones when `predicted`."""
        pairs = labels.items() if isinstance(labels, dict) else labels
        conf = confidences or {}
        request = pb.SetLabelsRequest(
            assignments=[pb.LabelAssignment(id=i, label=lab, confidence=conf.get(i, 0.0)) for i, lab in pairs],
            source=pb.PREDICTED if predicted else pb.HUMAN,
        )
        return self._run(self._one("SetLabels", request, lambda r: r.updated))

    def _get_op(self, ids: list[str], include_embedding: bool, ignore_missing: bool) -> Op:
        out: list[StoredItem] = []
        for start in range(0, len(ids), _GET_CHUNK):
            r = yield (
                "Get",
                pb.GetRequest(
                    ids=ids[start : start + _GET_CHUNK],
                    include_embedding=include_embedding,
                    ignore_missing=ignore_missing,
                    packed=True,
                ),
            )
            out.extend(_stored(i) for i in r.items)
        return out

    def get(
        self, ids: Sequence[str], include_embedding: bool = False, ignore_missing: bool = False
    ) -> list[StoredItem]:
        """Items in request order (unknown ids left out when `ignore_missing`)."""
        return self._run(self._get_op(list(ids), include_embedding, ignore_missing))

    def search(
        self,
        *,
        image: bytes | None = None,
        id: str | None = None,  # noqa: A002 - the proto's Query.id
        vector: np.ndarray | Sequence[float] | None = None,
        k: int | None = None,
        labels: Sequence[str] = (),
        min_score: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[Neighbor]:
        """Most similar first. Query by exactly one of image bytes, stored id or vector; `metadata`
        keeps only items with each of these key = value pairs."""
        request = _with(
            pb.SearchRequest(query=_query(image, id, vector), labels=list(labels), metadata=metadata or {}),
            k=k,
            min_score=min_score,
        )
        return self._run(self._one("Search", request, lambda r: [_neighbor(n) for n in r.neighbors]))

    def search_many(
        self,
        queries: Sequence[dict],
        k: int | None = None,
        labels: Sequence[str] = (),
        min_score: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[list[Neighbor]]:
        """search() for many queries ({"image": bytes}, {"id": ...} or {"vector": ...}) with the same
        options: one result list per query, in order, from SearchBatch calls of at most the server's
        max_queries (and message size) each."""

        def request(chunk: list[pb.Query]) -> pb.SearchBatchRequest:
            batch = pb.SearchBatchRequest(queries=chunk, labels=list(labels), metadata=metadata or {})
            return _with(batch, k=k, min_score=min_score)

        return self._run(self._batches("SearchBatch", request, queries, lambda r: [_neighbor(n) for n in r.neighbors]))

    def classify(
        self,
        *,
        image: bytes | None = None,
        id: str | None = None,  # noqa: A002 - the proto's Query.id
        vector: np.ndarray | Sequence[float] | None = None,
        k: int | None = None,
        tau: float | None = None,
        neighbors: int | None = None,
    ) -> Classification:
        """InstDisc kNN vote among the human-labelled items. Query by image, stored id or vector.
        `neighbors`: how many voting neighbours to return (None: all k; 0 skips their lookup)."""
        request = _with(pb.ClassifyRequest(query=_query(image, id, vector)), k=k, tau=tau, neighbors=neighbors)
        return self._run(self._one("Classify", request, _classification))

    def classify_many(
        self,
        queries: Sequence[dict],
        k: int | None = None,
        tau: float | None = None,
        neighbors: int | None = None,
    ) -> list[Classification]:
        """classify() for many queries (as search_many's), results in order, from ClassifyBatch calls."""

        def request(chunk: list[pb.Query]) -> pb.ClassifyBatchRequest:
            return _with(pb.ClassifyBatchRequest(queries=chunk), k=k, tau=tau, neighbors=neighbors)

        return self._run(self._batches("ClassifyBatch", request, queries, _classification))

    def _batches(self, method: str, request: Callable[[list[pb.Query]], Any], queries: Sequence[dict], convert) -> Op:
        """The queries in as few batch calls as the server's max_queries and message size allow."""
        protos = [_query(**q) for q in queries]
        if not protos:
            return []
        info = yield from self._limits()
        out = []
        for chunk in _chunks(protos, info.max_queries or 1, self._max_payload(info), lambda q: q.ByteSize()):
            out.extend(convert(r) for r in (yield method, request(chunk)).results)
        return out

    def suggest(
        self,
        n: int,
        seed: int = 0,
        sample: int | None = None,
        k: int | None = None,
        tau: float | None = None,
        uncertain_from: int | None = None,
    ) -> list[Suggestion]:
        """Which unlabelled items to label next (see the proto's Suggest): best first."""
        request = _with(pb.SuggestRequest(n=n, seed=seed), sample=sample, k=k, tau=tau, uncertain_from=uncertain_from)
        return self._run(self._one("Suggest", request, _suggestions))

    def switch_model(self, model: str | Path, store: str | Path) -> Switched:
        """Switch the server to another export and the store `retrieval-server migrate` wrote for it
        (paths on the server's machine); see the proto's SwitchModel. Loading and the catch-up
        take a while: give the client a timeout that allows it."""
        request = pb.SwitchModelRequest(model=str(model), store=str(store))
        return self._run(self._one("SwitchModel", request, _switched))

    def _label_corpus_request(
        self, k: int | None, tau: float | None, min_confidence: float, apply: bool
    ) -> pb.LabelCorpusRequest:
        return _with(pb.LabelCorpusRequest(min_confidence=min_confidence, apply=apply), k=k, tau=tau)


class RetrievalClient(_ClientBase):
    """A blocking connection to a retrieval server (thread-safe; one channel, reused).

    tls: False (plaintext), True (system roots) or the path of a PEM root certificate.
    timeout: deadline in seconds of each unary call; for upsert_many, how long to keep retrying
    a server that is unreachable before giving up.
    """

    _channels = grpc

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _run(self, op: Op):
        try:
            method, request = next(op)
            while True:
                response = getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
                method, request = op.send(response)
        except StopIteration as done:
            return done.value
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    def label_corpus(
        self, k: int | None = None, tau: float | None = None, min_confidence: float = 0.0, apply: bool = False
    ) -> Iterator[Proposal]:
        """Proposals for every item without a human label, ordered by id, streamed as they come."""
        request = self._label_corpus_request(k, tau, min_confidence, apply)
        try:
            for p in self._stub.LabelCorpus(request, metadata=self._metadata):
                yield _proposal(p)
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    def list_labels(self, human_only: bool = False) -> Iterator[StoredItem]:
        """Every item with a human label (or, unless human_only, a predicted one), by id, streamed."""
        try:
            for item in self._stub.ListLabels(pb.ListLabelsRequest(human_only=human_only), metadata=self._metadata):
                yield _stored(item)
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    def duplicates(self, min_score: float, max_neighbors: int | None = None) -> Iterator[list[Neighbor]]:
        """Groups of near-duplicate items (cosine >= min_score, linked), largest first, streamed;
        each member's score is its highest similarity to another member."""
        request = _with(pb.DuplicatesRequest(min_score=min_score), max_neighbors=max_neighbors)
        try:
            for group in self._stub.Duplicates(request, metadata=self._metadata):
                yield [_neighbor(n) for n in group.items]
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    def upsert_many(
        self,
        items: Iterable[UpsertItem],
        batch_size: int = 64,
        max_in_flight: int = 4,
        on_ack: Callable[[int, list[ItemFailure]], None] | None = None,
    ) -> UpsertResult:
        """Store `items` (read lazily) over the Upsert stream; failures sorted by input position.

        Items larger than the server's message limit, or malformed, are reported as failures and
        not sent. `on_ack(stored, failures)` is called once per acknowledged batch (and for items
        refused before sending). An exception raised by `items` is re-raised once the batches sent
        before it are acknowledged (the items of the batch it interrupted are not sent). Raises
        RetrievalError for a stream-level error other than UNAVAILABLE, or when the server stays
        unreachable for `timeout` seconds; every batch acknowledged before that is stored.
        """
        info = self._run(self._limits())
        session = _UpsertSession(_BatchSource(items, batch_size, self._max_payload(info)), on_ack, self)
        while True:
            try:
                session.stream(self._stub, self._metadata, max_in_flight)
                return session.finish()
            except grpc.RpcError as err:
                time.sleep(session.retry_delay(err))


class _UpsertSession:
    """The state of one upsert_many across reconnects, shared by the blocking and asyncio streams.

    Batches taken from the source and not yet acknowledged (`unacked`, oldest first) are what
    every new stream sends before new ones; the retry policy is exponential backoff while the
    server is UNAVAILABLE, giving up after `timeout` seconds without an acknowledgement.
    """

    def __init__(
        self, source: _BatchSource, on_ack: Callable[[int, list[ItemFailure]], None] | None, client: _ClientBase
    ):
        self.source = source
        self.on_ack = on_ack
        self.client = client
        self.result = UpsertResult()
        self.unacked: deque[_Batch] = deque()
        self.lock = threading.Lock()
        self._streams = 0
        self._attempt = 0
        self._last_progress = time.monotonic()

    def report_refused(self) -> None:
        refused = self.source.take_refused()
        if refused:
            self.result.failures.extend(refused)
            if self.on_ack is not None:
                self.on_ack(0, refused)

    def open_stream(self) -> _Stream:
        self._streams += 1
        return _Stream(self._streams)

    def next_request(self, stream: _Stream) -> pb.UpsertRequest | None:
        """The oldest unacknowledged batch this stream has not sent, else a new one; None when the
        source is exhausted (or failed: its error is kept for end_of_stream)."""
        with self.lock:
            batch = next((b for b in self.unacked if b.stream != stream.number), None)
            if batch is not None:
                batch.stream = stream.number
        if batch is None:
            try:
                batch = self.source.next()
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread by end_of_stream
                stream.source_error.append(exc)
                return None
            if batch is None:
                return None
            batch.stream = stream.number
            with self.lock:
                self.unacked.append(batch)
        stream.sent[stream.next_sequence] = batch
        stream.next_sequence += 1
        return batch.request

    def acknowledge(self, stream: _Stream, ack: pb.UpsertAck) -> None:
        self.report_refused()
        batch = stream.sent.pop(ack.sequence)
        with self.lock:
            self.unacked.remove(batch)
        self._attempt, self._last_progress = 0, time.monotonic()
        failures = [
            ItemFailure(
                index=batch.indices[e.index],
                id=e.id,
                code=_CODES.get(e.code, grpc.StatusCode.UNKNOWN),
                message=e.message,
            )
            for e in ack.errors
        ]
        self.result.upserted += ack.upserted
        self.result.failures.extend(failures)
        if self.on_ack is not None:
            self.on_ack(ack.upserted, failures)

    def end_of_stream(self, stream: _Stream) -> None:
        """After the server ended a stream cleanly: re-raise the source's error, or demand a retry
        when something is still unacknowledged."""
        self.report_refused()
        if stream.source_error:
            raise stream.source_error[0]
        if self.unacked:
            raise _StreamClosed(f"the server ended the stream with {len(self.unacked)} batches unacknowledged")

    def finish(self) -> UpsertResult:
        self.result.failures.sort(key=lambda f: f.index)
        return self.result

    def retry_delay(self, err: grpc.RpcError) -> float:
        """Seconds to wait before the next stream, or RetrievalError when giving up."""
        self.report_refused()
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            raise RetrievalError.from_rpc(err, self.client.address) from None
        delay = min(0.1 * 2**self._attempt, 5.0) * (0.5 + random.random() / 2)
        if time.monotonic() + delay - self._last_progress > self.client.timeout:
            raise RetrievalError.from_rpc(err, self.client.address) from None
        self._attempt += 1
        return delay

    def stream(self, stub: pb_grpc.RetrievalStub, metadata, max_in_flight: int) -> None:
        """One blocking Upsert stream with at most `max_in_flight` unacknowledged batches; returns
        when the source is exhausted and everything is acknowledged, raises grpc.RpcError otherwise."""
        stream = self.open_stream()
        slots = threading.Semaphore(max(1, max_in_flight))
        stop = threading.Event()

        def requests() -> Iterator[pb.UpsertRequest]:
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                request = None if stop.is_set() else self.next_request(stream)
                if request is None:
                    return
                yield request

        call = stub.Upsert(requests(), metadata=metadata)
        try:
            for ack in call:
                self.acknowledge(stream, ack)
                slots.release()
        finally:
            stop.set()
            call.cancel()  # no-op once the stream has ended; frees it if we leave early
        self.end_of_stream(stream)


class _StreamClosed(grpc.RpcError):
    def __init__(self, message: str):
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message


class _BatchSource:
    """Packs items into UpsertRequests of at most `batch_size` items and `max_payload` bytes;
    items that cannot be sent are kept as failures, reported from the caller's thread."""

    def __init__(self, items: Iterable[UpsertItem], batch_size: int, max_payload: int):
        self._items = enumerate(items)
        self._batch_size = max(1, batch_size)
        self._max_payload = max_payload
        self._carry: tuple[int, pb.Item] | None = None
        self._refused: list[ItemFailure] = []
        self._lock = threading.Lock()

    def _refuse(self, index: int, item_id: str, code: grpc.StatusCode, message: str) -> None:
        self._refused.append(ItemFailure(index=index, id=item_id, code=code, message=message))

    def take_refused(self) -> list[ItemFailure]:
        with self._lock:
            refused, self._refused = self._refused, []
        return refused

    def next(self) -> _Batch | None:
        with self._lock:
            indices: list[int] = []
            request = pb.UpsertRequest()
            size = 0
            while len(indices) < self._batch_size:
                if self._carry is not None:
                    (index, msg), self._carry = self._carry, None
                else:
                    nxt = next(self._items, None)
                    if nxt is None:
                        break
                    index, item = nxt
                    try:
                        msg = _item_proto(item)
                    except (ValueError, TypeError) as exc:
                        self._refuse(index, item.id, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                        continue
                    if msg.ByteSize() > self._max_payload:
                        self._refuse(
                            index,
                            item.id,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"item is {msg.ByteSize()} bytes, above the server's message limit "
                            f"of {self._max_payload + _MESSAGE_OVERHEAD} bytes",
                        )
                        continue
                item_size = msg.ByteSize() + 16
                if indices and size + item_size > self._max_payload:
                    self._carry = (index, msg)
                    break
                indices.append(index)
                request.items.append(msg)
                size += item_size
            return _Batch(indices, request) if indices else None


def _chunks(values: list, max_items: int, max_bytes: int, size: Callable) -> Iterator[list]:
    chunk: list = []
    total = 0
    for v in values:
        s = size(v) + 16
        if chunk and (len(chunk) >= max_items or total + s > max_bytes):
            yield chunk
            chunk, total = [], 0
        chunk.append(v)
        total += s
    if chunk:
        yield chunk
