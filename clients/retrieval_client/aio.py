"""AsyncRetrievalClient: RetrievalClient's API for asyncio (grpc.aio).

The unary methods are the very ones of the blocking client (the shared Op generators of
retrieval_client.client, awaited here), and upsert_many drives the same _UpsertSession (batching, the
message-size check, acknowledgements, resending, backoff); only the transport differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from grpc import aio

from moco_retrieval.api.v1 import retrieval_pb2 as pb

from .client import (
    ItemFailure,
    Neighbor,
    Op,
    Proposal,
    RetrievalError,
    StoredItem,
    UpsertItem,
    UpsertResult,
    _BatchSource,
    _ClientBase,
    _neighbor,
    _proposal,
    _stored,
    _UpsertSession,
    _with,
)


class AsyncRetrievalClient(_ClientBase):
    """`await client.info()`, `await client.search(...)`, ... with the arguments of RetrievalClient.

    `items` of upsert_many is an ordinary iterable, read in a worker thread (it may read files).
    """

    _channels = aio

    async def __aenter__(self) -> AsyncRetrievalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _run(self, op: Op):
        try:
            method, request = next(op)
            while True:
                response = await getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
                method, request = op.send(response)
        except StopIteration as done:
            return done.value
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    async def label_corpus(
        self, k: int | None = None, tau: float | None = None, min_confidence: float = 0.0, apply: bool = False
    ) -> AsyncIterator[Proposal]:
        request = self._label_corpus_request(k, tau, min_confidence, apply)
        try:
            async for p in self._stub.LabelCorpus(request, metadata=self._metadata):
                yield _proposal(p)
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    async def list_labels(self, human_only: bool = False) -> AsyncIterator[StoredItem]:
        """See RetrievalClient.list_labels."""
        try:
            async for item in self._stub.ListLabels(
                pb.ListLabelsRequest(human_only=human_only), metadata=self._metadata
            ):
                yield _stored(item)
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    async def duplicates(self, min_score: float, max_neighbors: int | None = None) -> AsyncIterator[list[Neighbor]]:
        """See RetrievalClient.duplicates."""
        request = _with(pb.DuplicatesRequest(min_score=min_score), max_neighbors=max_neighbors)
        try:
            async for group in self._stub.Duplicates(request, metadata=self._metadata):
                yield [_neighbor(n) for n in group.items]
        except grpc.RpcError as err:
            raise RetrievalError.from_rpc(err, self.address) from None

    async def upsert_many(
        self,
        items: Iterable[UpsertItem],
        batch_size: int = 64,
        max_in_flight: int = 4,
        on_ack: Callable[[int, list[ItemFailure]], None] | None = None,
    ) -> UpsertResult:
        """See RetrievalClient.upsert_many."""
        info = await self._run(self._limits())
        session = _UpsertSession(_BatchSource(items, batch_size, self._max_payload(info)), on_ack, self)
        while True:
            try:
                await self._stream(session, max_in_flight)
                return session.finish()
            except grpc.RpcError as err:
                await asyncio.sleep(session.retry_delay(err))

    async def _stream(self, session: _UpsertSession, max_in_flight: int) -> None:
        stream = session.open_stream()
        call = self._stub.Upsert(metadata=self._metadata)
        slots = asyncio.Semaphore(max(1, max_in_flight))

        async def write() -> None:
            while True:
                await slots.acquire()
                request = await asyncio.to_thread(session.next_request, stream)  # may read files
                if request is None:
                    await call.done_writing()
                    return
                await call.write(request)

        writer = asyncio.create_task(write())
        try:
            while (ack := await call.read()) is not aio.EOF:
                session.acknowledge(stream, ack)
                slots.release()
            await writer
        finally:
            writer.cancel()
            call.cancel()
            await asyncio.gather(writer, return_exceptions=True)  # the stream's error is the one raised
        session.end_of_stream(stream)
