"""Which loaded model and store answer a call, and how they are replaced without failing one.

gRPC cannot add services once started, so one Router is registered before anything is loaded; it
hands every call to the current RetrievalService (UNAVAILABLE while none is loaded yet). A service
holds one encoder and one backend; switching the model (SwitchModel, or a Milvus replica following
its alias) builds a new service beside the current one, then `Serving.replace` swaps them:

  - a call takes the service that is current when it starts and finishes on it, so a swap never
    fails a call; the old service is closed once its last call has ended (`close_when_idle`);
  - writes (Upsert batch by batch, Delete, SetLabels, LabelCorpus with apply) also hold a shared
    write gate, which a swap takes exclusively: it waits for the writes running, and new writes wait
    (they are not refused) while `before_swap` carries the last changes into the new store; they
    then go to the new service.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc

from .rwlock import RWLock
from .service import RetrievalService

log = logging.getLogger(__name__)
RETRIEVAL = pb.DESCRIPTOR.services_by_name["Retrieval"]


class Serving:
    """The current service, the calls running on each service, and the write gate."""

    def __init__(self) -> None:
        self._current: RetrievalService | None = None
        self._running: dict[int, int] = {}  # id(service) -> calls running on it
        self._cond = threading.Condition()
        self._gate = RWLock()

    @property
    def current(self) -> RetrievalService | None:
        return self._current

    @contextlib.contextmanager
    def use(self, context: grpc.ServicerContext) -> Iterator[RetrievalService]:
        """The current service, for the length of one call."""
        with self._cond:
            service = self._current
            if service is None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its model and index")
            self._running[id(service)] = self._running.get(id(service), 0) + 1
        try:
            yield service
        finally:
            with self._cond:
                self._running[id(service)] -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, context: grpc.ServicerContext) -> Iterator[RetrievalService]:
        """The current service for one write, inside the shared write gate."""
        with self._gate.read(), self.use(context) as service:
            yield service

    def start(self, service: RetrievalService) -> None:
        with self._cond:
            self._current = service

    def replace(self, new: RetrievalService, before_swap: Callable[[], None] = lambda: None) -> RetrievalService:
        """Make `new` current once the running writes are done, after `before_swap` (run while
        writes wait); returns the previous service, which calls already running still use."""
        with self._gate.write():
            before_swap()
            with self._cond:
                old, self._current = self._current, new
        return old

    def close_when_idle(self, service: RetrievalService) -> threading.Thread:
        """Close a replaced service after its last call, in the background; the thread doing it."""

        def close() -> None:
            with self._cond:
                while self._running.get(id(service)):
                    self._cond.wait()
                self._running.pop(id(service), None)
            log.info("closed the previous model and store (%s)", service.close())

        thread = threading.Thread(target=close, name="close-previous", daemon=True)
        thread.start()
        return thread


# How each method reaches the service: a read uses it, a write also holds the write gate.
WRITES = {"Delete", "SetLabels"}
STREAMS = {m.name for m in RETRIEVAL.methods if m.server_streaming}


class Router(pb_grpc.RetrievalServicer):
    """Registered before loading; hands each call to the current service (see the module doc).
    SwitchModel is answered by `switch` (set by the server: it loads models and stores)."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.switch: Callable[[pb.SwitchModelRequest, grpc.ServicerContext], pb.SwitchModelResponse] | None = None

    def Upsert(self, request_iterator: Iterator[pb.UpsertRequest], context: grpc.ServicerContext):
        """Batch by batch: each is committed by the service current when it arrives."""
        for sequence, request in enumerate(request_iterator):
            with self.serving.writing(context) as service:
                ack = service.upsert_batch(sequence, request, context)
            yield ack

    def LabelCorpus(self, request: pb.LabelCorpusRequest, context: grpc.ServicerContext):
        use = self.serving.writing if request.apply else self.serving.use
        with use(context) as service:
            yield from service.LabelCorpus(request, context)

    def SwitchModel(self, request: pb.SwitchModelRequest, context: grpc.ServicerContext) -> pb.SwitchModelResponse:
        if self.switch is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its model and index")
        return self.switch(request, context)


def _routed(name: str) -> Callable:
    def enter(router: Router, context: grpc.ServicerContext) -> contextlib.AbstractContextManager:
        return router.serving.writing(context) if name in WRITES else router.serving.use(context)

    def stream(self: Router, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with enter(self, context) as service:
            yield from getattr(service, name)(request, context)

    def unary(self: Router, request: Any, context: grpc.ServicerContext) -> Any:
        with enter(self, context) as service:
            return getattr(service, name)(request, context)

    method = stream if name in STREAMS else unary
    method.__name__ = name
    return method


for _name in RETRIEVAL.methods_by_name:
    if _name not in vars(Router):
        setattr(Router, _name, _routed(_name))
