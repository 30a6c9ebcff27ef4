"""Server configuration: every `serve` flag, also settable as RETRIEVAL_<FLAG> in the environment
(flags win), so the same image runs under docker/k8s without a wrapper script."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from moco_retrieval.images import DEFAULT_MAX_PIXELS
from moco_retrieval.knn import DEFAULT_K, DEFAULT_TAU

ENV_PREFIX = "RETRIEVAL_"
# FAISS GPU indexes cannot return more neighbours than this.
GPU_MAX_K = 2048


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    store: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9100
    ready_file: Path | None = None
    device: str = "auto"
    index_factory: str = "Flat"
    index_gpus: str = "auto"
    max_batch_size: int = 64
    max_queue_delay_ms: float = 5.0
    max_queue: int = 1024
    decode_threads: int = 4
    default_k: int = DEFAULT_K
    default_tau: float = DEFAULT_TAU
    max_k: int = GPU_MAX_K
    max_message_mb: int = 64
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = None
    read_only_token: str | None = None
    snapshot_every: int = 10000
    reset_store: bool = False
    grace_s: float = 10.0

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


class _EnvParser:
    """Adds arguments whose default comes from RETRIEVAL_<FLAG> when that variable is set."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add(self, flag: str, *, type=str, default=None, help: str = "", required: bool = False) -> None:  # noqa: A002
        env = os.environ.get(_env_name(flag))
        if type is bool:
            value = _bool(env) if env is not None else bool(default)
            self.parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                                     help=f"{help} (env {_env_name(flag)})")
            return
        if env is not None:
            default, required = type(env), False
        self.parser.add_argument(flag, type=type, default=default, required=required,
                                 help=f"{help} (env {_env_name(flag)}; default {default})")


def _read_secret(path: str | None, value: str | None, what: str) -> str | None:
    if value and path:
        raise SystemExit(f"error: give --{what} or --{what}-file, not both")
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise SystemExit(f"error: --{what}-file {path} is empty")
        return token
    return value or None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig.__dataclass_fields__
    p = _EnvParser(parser)
    p.add("--model", required=True, help="export written by `moco-train export`")
    p.add("--store", required=True, help="directory of the SQLite store and index snapshots")
    p.add("--host", default=d["host"].default, help="address to bind")
    p.add("--port", type=int, default=d["port"].default, help="gRPC port (0 picks a free one)")
    p.add("--metrics-port", type=int, default=d["metrics_port"].default, help="Prometheus port (0 picks a free one)")
    p.add("--ready-file", help="written atomically as JSON {port, metrics_port, pid} once SERVING")
    p.add("--device", default="auto", help="encoder device: auto|cpu|cuda")
    p.add("--index-factory", default="Flat", help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32, IVF4096,PQ32")
    p.add("--index-gpus", default="auto", help="auto (all GPUs if any), 0 (CPU) or a number of GPUs")
    p.add("--max-batch-size", type=int, default=d["max_batch_size"].default, help="images per model forward")
    p.add("--max-queue-delay-ms", type=float, default=d["max_queue_delay_ms"].default,
          help="how long the first queued image waits for others")
    p.add("--max-queue", type=int, default=d["max_queue"].default, help="queued images before RESOURCE_EXHAUSTED")
    p.add("--decode-threads", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add("--default-k", type=int, default=DEFAULT_K, help="Classify neighbours when the request has no k")
    p.add("--default-tau", type=float, default=DEFAULT_TAU, help="Classify temperature when the request has none")
    p.add("--max-k", type=int, default=GPU_MAX_K, help="largest k a request may ask for")
    p.add("--max-message-mb", type=int, default=d["max_message_mb"].default, help="largest gRPC message, both ways")
    p.add("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="images above this are refused undecoded")
    p.add("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    p.add("--tls-key", help="PEM private key")
    p.add("--auth-token", help="bearer token required on every call except health")
    p.add("--auth-token-file", help="file holding the bearer token")
    p.add("--read-only-token", help="bearer token allowed to read only (PERMISSION_DENIED on writes)")
    p.add("--read-only-token-file", help="file holding the read-only token")
    p.add("--snapshot-every", type=int, default=d["snapshot_every"].default,
          help="write a FAISS snapshot after this many changed items (0: only at shutdown)")
    p.add("--reset-store", type=bool, default=False,
          help="drop a store embedded by another model instead of refusing to start")
    p.add("--grace-s", type=float, default=d["grace_s"].default, help="seconds in-flight calls get on SIGTERM")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Validate the parsed flags into a ServerConfig (SystemExit with one line when invalid)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if args.device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"error: --device must be auto, cpu or cuda, not {args.device!r}")
    if args.index_gpus != "auto" and not args.index_gpus.isdigit():
        raise SystemExit(f"error: --index-gpus must be auto or a number, not {args.index_gpus!r}")
    for flag in ("max_batch_size", "max_queue", "decode_threads", "default_k", "max_k", "max_message_mb",
                 "max_image_pixels"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive")
    if args.default_k > args.max_k:
        raise SystemExit("error: --default-k must not exceed --max-k")
    if args.default_tau <= 0:
        raise SystemExit("error: --default-tau must be positive")
    auth = _read_secret(args.auth_token_file, args.auth_token, "auth-token")
    read_only = _read_secret(args.read_only_token_file, args.read_only_token, "read-only-token")
    if read_only and not auth:
        raise SystemExit("error: --read-only-token needs --auth-token too (otherwise anyone may write)")
    return ServerConfig(
        model=Path(args.model), store=Path(args.store), host=args.host, port=args.port,
        metrics_port=args.metrics_port, ready_file=Path(args.ready_file) if args.ready_file else None,
        device=args.device, index_factory=args.index_factory, index_gpus=args.index_gpus,
        max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
        decode_threads=args.decode_threads, default_k=args.default_k, default_tau=args.default_tau,
        max_k=args.max_k, max_message_mb=args.max_message_mb, max_image_pixels=args.max_image_pixels,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None, tls_key=Path(args.tls_key) if args.tls_key else None,
        auth_token=auth, read_only_token=read_only, snapshot_every=args.snapshot_every,
        reset_store=args.reset_store, grace_s=args.grace_s)
