"""Wiring: bind gRPC (health NOT_SERVING) and /metrics first, then load model, store and index,
then serve; SIGTERM drains (health NOT_SERVING, no new calls, grace for in-flight ones), writes an
index snapshot, closes the store and returns 0."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc
from moco_retrieval.devices import DeviceError
from moco_retrieval.export import ExportError
from moco_retrieval.fileio import atomic_write
from moco_retrieval.labels import label_problem

from . import __version__
from .auth import AuthInterceptor
from .backend import Backend
from .backup import BackupError
from .batcher import DynamicBatcher
from .config import ServerConfig
from .embedded import EmbeddedBackend
from .encoder import Encoder
from .faiss_index import resolve_gpus
from .index import ItemIndex
from .metrics import MetricsInterceptor, ServerMetrics
from .service import RetrievalService
from .serving import Router, Serving
from .store import StorageError, Store, StoreInUse, StoreLock
from .switch import AliasFollower, Switcher, initial_export

log = logging.getLogger("retrieval_server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name


class StartupError(Exception):
    """A configuration or data problem that stops the server before it serves (one line to stderr)."""


def _write_ready_file(path: Path, port: int, metrics_port: int) -> None:
    info = {"port": port, "metrics_port": metrics_port, "pid": os.getpid()}
    atomic_write(path, lambda f: f.write(json.dumps(info).encode()))


def _bind(server: grpc.Server, cfg: ServerConfig) -> int:
    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except (OSError, RuntimeError) as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise StartupError(f"cannot listen on {address}")
    return port


def embedded_backend(cfg: ServerConfig, fingerprint: str, dim: int) -> EmbeddedBackend:
    """The store (bound to the model's fingerprint, locked to this process) and its FAISS index."""
    try:
        Path(cfg.store).mkdir(parents=True, exist_ok=True)
        lock = StoreLock(cfg.store).acquire()  # held until the backend closes
        store = Store(cfg.store, max_mb=cfg.store_max_mb)
        other = store.bind_model(fingerprint, dim, reset=cfg.reset_store)
    except StoreInUse as exc:
        raise StartupError(str(exc)) from exc
    except (sqlite3.Error, OSError, StorageError) as exc:
        raise StartupError(f"store {cfg.store}: {exc}") from exc
    if other is not None:
        raise StartupError(
            f"FAILED_PRECONDITION: store {cfg.store} holds embeddings of model {other}, not of the served model "
            f"{fingerprint}; use another --store or --reset-store to drop its items"
        )
    try:
        gpus = resolve_gpus(cfg.index_gpus)
        index = ItemIndex(dim, cfg.index_factory, gpus)
    except RuntimeError as exc:
        raise StartupError(f"index: {exc}") from exc
    how = index.load(store, cfg.store)
    log.info(
        "index %s (%s) on %s: %d items, %d labelled",
        cfg.index_factory,
        how,
        index.device,
        index.item_count,
        index.labelled_count,
    )
    return EmbeddedBackend(store, index, cfg.store, cfg.snapshot_every, lock)


def load_service(cfg: ServerConfig, metrics: ServerMetrics) -> RetrievalService:
    """The encoder, the backend (bound to the model's fingerprint) and the batcher."""
    try:
        encoder = Encoder(cfg.model, cfg.device, cfg.max_image_pixels, runtime=cfg.encoder)
    except (ExportError, DeviceError, FileNotFoundError, RuntimeError) as exc:
        raise StartupError(str(exc)) from exc
    meta = encoder.meta
    if cfg.backend == "milvus":
        from .milvus_backend import MilvusBackend, MilvusError  # pymilvus only when asked for

        try:
            backend = MilvusBackend.open(cfg, meta.fingerprint, meta.feature_dim)
        except MilvusError as exc:
            raise StartupError(str(exc)) from exc
    else:
        backend = embedded_backend(cfg, meta.fingerprint, meta.feature_dim)
    batcher = DynamicBatcher(
        encoder,
        metrics,
        max_batch_size=cfg.max_batch_size,
        max_delay_s=cfg.max_queue_delay_ms / 1000.0,
        capacity=cfg.max_queue,
        decode_threads=cfg.decode_threads,
    )
    report_stored_labels(backend)
    return RetrievalService(cfg, encoder, batcher, backend, metrics)


def report_stored_labels(backend: Backend) -> None:
    """Warn about stored human labels that the label rule refuses (written under a laxer rule
    before): they are kept and served, never dropped; SetLabels refuses them from now on."""
    _, counts, _ = backend.counts()
    broken = {label: (count, label_problem(label)) for label, count in counts.items() if label_problem(label)}
    if broken:
        shown = "; ".join(f"{label!r} on {n} items: {problem}" for label, (n, problem) in list(broken.items())[:5])
        log.warning(
            "%d stored labels break the label rule (%s%s): they are kept and served, but SetLabels refuses "
            "them; relabel those items (`retrieval-client labels export` lists them)",
            len(broken),
            shown,
            "; ..." if len(broken) > 5 else "",
        )


def publish_model_info(metrics: ServerMetrics, service: RetrievalService) -> None:
    """retrieval_model_info of the served model and store (one series: a switch replaces it)."""
    meta = service.encoder.meta
    metrics.model_info.clear()
    metrics.model_info.labels(
        meta.arch,
        meta.fingerprint,
        str(meta.feature_dim),
        service.encoder.device,
        service.backend.device,
        service.backend.index_type,
        __version__,
    ).set(1)


class GrpcServer:
    """The gRPC server with every service registered and bound, health NOT_SERVING and the Retrieval
    service answering UNAVAILABLE until `attach` hands it the loaded service. `serve` runs it as a
    process; tests run the same wiring in-process."""

    def __init__(self, cfg: ServerConfig, metrics: ServerMetrics, workers: int = 64) -> None:
        interceptors: list[grpc.ServerInterceptor] = [MetricsInterceptor(metrics)]
        if cfg.auth_token:
            interceptors.append(AuthInterceptor(cfg.auth_token, cfg.read_only_token))
        size = cfg.max_message_bytes
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.cfg, self.metrics = cfg, metrics
        self.follower: AliasFollower | None = None
        self.serving = Serving()
        self.router = Router(self.serving)
        pb_grpc.add_RetrievalServicer_to_server(self.router, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = _bind(self.server, cfg)
        self.server.start()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def attach(self, service: RetrievalService) -> None:
        """Serve `service`; from now on SwitchModel (embedded) or the alias follower (milvus with
        --follow-models) may replace it (switch.py)."""
        self.serving.start(service)
        self.watch(service)

        def load(cfg: ServerConfig) -> RetrievalService:
            return load_service(cfg, self.metrics)

        self.router.switch = Switcher(self.cfg, self.serving, load, self.watch)
        if self.cfg.backend == "milvus" and self.cfg.follow_models:
            self.follower = AliasFollower(self.cfg, self.serving, load, self.watch)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def watch(self, service: RetrievalService) -> None:
        """Point the model and store metrics at a service that is (or is about to be) served."""
        publish_model_info(self.metrics, service)
        self.metrics.watch_counts(lambda: service.backend.item_count, lambda: service.backend.labelled_count)
        if isinstance(service.backend, EmbeddedBackend):
            self.metrics.watch_store(service.backend.store.free_bytes, service.backend.store.size_bytes)


def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = ServerMetrics()
    metrics.build_info.labels(__version__, torch.__version__, faiss.__version__, grpc.__version__).set(1)
    try:
        http_server, metrics_port = metrics.serve(cfg.host, cfg.metrics_port)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port}: {exc}") from exc
    if cfg.backend == "milvus" and cfg.follow_models:
        from pymilvus import MilvusException  # pymilvus only when asked for

        try:
            cfg = initial_export(cfg)
        except (BackupError, MilvusException) as exc:
            http_server.shutdown()
            raise StartupError(f"--follow-models: {exc}") from exc
    grpc_server = GrpcServer(cfg, metrics)
    server, port = grpc_server.server, grpc_server.port
    try:
        service = load_service(cfg, metrics)
    except BaseException:
        server.stop(0)
        http_server.shutdown()
        raise
    grpc_server.attach(service)
    if cfg.ready_file:
        _write_ready_file(cfg.ready_file, port, metrics_port)
    log.info(
        "serving %s on %s:%d (%s), metrics on :%d",
        SERVICE_NAME,
        cfg.host,
        port,
        "TLS" if cfg.tls_cert else "plaintext",
        metrics_port,
    )
    while not stop.wait(1.0):
        pass
    log.info("shutting down: draining in-flight calls for up to %.0fs", cfg.grace_s)
    grpc_server.health.enter_graceful_shutdown()
    if grpc_server.follower is not None:
        grpc_server.follower.close()
    server.stop(cfg.grace_s).wait()
    closed = grpc_server.serving.current.close()
    http_server.shutdown()
    log.info("stopped cleanly (%s)", closed)
    return 0
