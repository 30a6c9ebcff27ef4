"""Prometheus metrics (names are API: dashboards and alerts in deploy/ use them) and the gRPC server
interceptor that counts and times every call, unary or streaming, by method and status code."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from .handlers import rewrap
from .store import StorageError

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """Every metric of one server, in its own registry (plus process/platform collectors)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", rpc, registry=r)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            rpc + ["grpc_code"],
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "RPC handling time until the status is sent.",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "retrieval_batch_size", "Images per model forward.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "retrieval_inference_seconds", "Model forward time per batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.index_search_seconds = Histogram(
            "retrieval_index_search_seconds", "FAISS search time per call.", ["op"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("retrieval_queue_depth", "Images queued or decoding for the model.", registry=r)
        self.queue_capacity = Gauge("retrieval_queue_capacity", "Queue slots (--max-queue).", registry=r)
        self.queue_rejected = Counter(
            "retrieval_queue_rejected_total",
            "Images refused with RESOURCE_EXHAUSTED because the queue was full.",
            registry=r,
        )
        self.index_items = Gauge("retrieval_index_items", "Items in the index.", registry=r)
        self.labelled_items = Gauge("retrieval_labelled_items", "Items with a human label.", registry=r)
        self.store_free_bytes = Gauge(
            "retrieval_store_free_bytes", "Free space on the store's filesystem (read at each scrape).", registry=r
        )
        self.store_size_bytes = Gauge(
            "retrieval_store_size_bytes",
            "Size of the store's database, WAL included (read at each scrape).",
            registry=r,
        )
        self.decode_errors = Counter(
            "retrieval_image_decode_errors_total", "Images that could not be decoded.", registry=r
        )
        self.model_info = Gauge(
            "retrieval_model_info",
            "The served model and index (value 1).",
            ["arch", "fingerprint", "dim", "model_device", "index_device", "index_type", "version"],
            registry=r,
        )
        self.build_info = Gauge(
            "retrieval_build_info",
            "Versions of the server and its libraries (value 1).",
            ["version", "torch", "faiss", "grpc"],
            registry=r,
        )

    def watch_store(self, free_bytes: Callable[[], int], size_bytes: Callable[[], int]) -> None:
        """Read the store's free space and size at each scrape (NaN while they cannot be read)."""
        for gauge, read in ((self.store_free_bytes, free_bytes), (self.store_size_bytes, size_bytes)):
            gauge.set_function(partial(_or_nan, read))

    def watch_counts(self, items: Callable[[], int], labelled: Callable[[], int]) -> None:
        """Read the item counts at each scrape rather than after every write (on Milvus each is a
        count query); NaN while the storage cannot say, so every other metric is still scraped."""
        for gauge, read in ((self.index_items, items), (self.labelled_items, labelled)):
            gauge.set_function(partial(_or_nan, read))

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP server in a daemon thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port


def _or_nan(read: Callable[[], int]) -> float:
    try:
        return float(read())
    except (OSError, StorageError):
        return math.nan


_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if code is None:
        return default.name
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name


class MetricsInterceptor(grpc.ServerInterceptor):
    """grpc_server_{started,handled}_total and grpc_server_handling_seconds, as go-grpc-prometheus."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        kind = _TYPES[(handler.request_streaming, handler.response_streaming)]
        labels = (kind, service, method)
        m = self.m

        def begin() -> float:
            m.started.labels(*labels).inc()
            return time.perf_counter()

        def finish(start: float, context: grpc.ServicerContext, default: grpc.StatusCode) -> None:
            m.handled.labels(*labels, _code_name(context, default)).inc()
            m.handling.labels(*labels).observe(time.perf_counter() - start)

        def unary_response(behavior: Callable) -> Callable:
            def wrapped(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                start = begin()
                default = grpc.StatusCode.UNKNOWN
                try:
                    response = behavior(request_or_iterator, context)
                    default = grpc.StatusCode.OK
                    return response
                finally:
                    finish(start, context, default)

            return wrapped

        def stream_response(behavior: Callable) -> Callable:
            def wrapped(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = begin()
                default = grpc.StatusCode.UNKNOWN
                try:
                    yield from behavior(request_or_iterator, context)
                    default = grpc.StatusCode.OK
                except GeneratorExit:
                    default = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    finish(start, context, default)

            return wrapped

        return rewrap(handler, unary_response, stream_response)
