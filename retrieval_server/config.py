"""Server configuration: every `serve` option defined once (default, flag, help), also settable as
RETRIEVAL_<NAME> in the environment (flags win), so the same image runs under docker/k8s without a
wrapper script."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from moco_retrieval.images import DEFAULT_MAX_PIXELS
from moco_retrieval.knn import DEFAULT_K, DEFAULT_TAU
from moco_retrieval.options import add_options, from_args, option

from .faiss_index import GPU_MAX_K

ENV_PREFIX = "RETRIEVAL_"


@dataclass(frozen=True)
class StoreOptions:
    """The export and the store it embeds: what `serve` and `migrate` share."""

    model: Path = option(help="export written by `moco-train export`")
    store: Path | None = option(None, help="directory of the SQLite store and index snapshots (--backend embedded)")
    backend: str = option(
        "embedded",
        choices=("embedded", "milvus"),
        help="where items live: embedded (SQLite + in-process FAISS, one process per store) or milvus "
        "(a Milvus collection: stateless replicas can share it)",
    )
    milvus_uri: str | None = option(
        None, help="Milvus to use: a local file (e.g. ./milvus.db, Milvus Lite) or http://host:19530"
    )
    milvus_token: str | None = option(None, help="Milvus token (user:password or an API key), if it needs one")
    milvus_collection: str = option(
        "items", help="Milvus collection of the items, or an alias of it (see --follow-models)"
    )
    milvus_index: str = option(
        "FLAT",
        help="Milvus index type on the embedding (metric IP): FLAT, IVF_FLAT, HNSW, or a GPU_* one on a GPU cluster",
    )
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="encoder device")
    encoder: str = option(
        "auto",
        choices=("auto", "torch", "onnx"),
        help="encoder runtime: torch, or onnx (ONNX Runtime, CPU); auto: onnx on the CPU (faster "
        "than torch's float32 there, see the README), torch on a GPU",
    )
    index_factory: str = option("Flat", help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32, IVF4096,PQ32")
    index_gpus: str = option("auto", help="auto (all GPUs if any), 0 (CPU) or a number of GPUs")


@dataclass(frozen=True)
class ServerConfig(StoreOptions):
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(50051, help="gRPC port (0 picks a free one)")
    metrics_port: int = option(9100, help="Prometheus port (0 picks a free one)")
    ready_file: Path | None = option(None, help="written atomically as JSON {port, metrics_port, pid} once SERVING")
    max_batch_size: int = option(64, help="images per model forward")
    max_queue_delay_ms: float = option(5.0, help="how long the first queued image waits for others")
    max_queue: int = option(1024, help="queued images before RESOURCE_EXHAUSTED")
    decode_threads: int = option(min(8, os.cpu_count() or 1), help="image decoding threads")
    default_k: int = option(DEFAULT_K, help="Classify neighbours when the request has no k")
    default_tau: float = option(DEFAULT_TAU, help="Classify temperature when the request has none")
    max_k: int = option(GPU_MAX_K, help="largest k a request may ask for")
    max_queries: int = option(1024, help="most queries of one SearchBatch or ClassifyBatch call")
    coalesce: str = option(
        "classify",
        choices=("none", "classify", "all"),
        help="which concurrent single-query calls run as one index batch: Classify's votes only (the "
        "default: the vote gains, a flat Search did not on a CPU; see README Results), Search too "
        "(all), or none. A lone call is never delayed (retrieval_server/coalesce.py)",
    )
    max_message_mb: int = option(64, help="largest gRPC message, both ways")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, help="images above this are refused undecoded")
    tls_cert: Path | None = option(None, help="PEM certificate chain (enables TLS with --tls-key)")
    tls_key: Path | None = option(None, help="PEM private key")
    auth_token: str | None = option(None, help="bearer token required on every call except health")
    auth_token_file: Path | None = option(None, help="file holding the bearer token")
    read_only_token: str | None = option(None, help="bearer token allowed to read only (PERMISSION_DENIED on writes)")
    read_only_token_file: Path | None = option(None, help="file holding the read-only token")
    store_max_mb: float = option(
        0,
        help="largest size of the store's database in MiB (0: the disk's); writes beyond it "
        "get RESOURCE_EXHAUSTED, as on a full disk",
    )
    snapshot_every: int = option(
        10000,
        help="after this many changed items, write a FAISS snapshot (embedded: and not before a tenth of the "
        "stored items changed) or flush the Milvus collection (milvus: seals what Milvus Lite searches slowly "
        "while unflushed); 0: only at shutdown",
    )
    reset_store: bool = option(False, help="drop a store embedded by another model instead of refusing to start")
    grace_s: float = option(10.0, help="seconds in-flight calls get on SIGTERM")
    follow_models: list[Path] = option(
        [],
        help="--backend milvus: more exports this replica may serve. When --milvus-collection is an alias and "
        "`retrieval-server migrate --alias` moves it to a collection of one of their fingerprints, the replica "
        "loads that export and the collection beside the served ones and switches to them without failing a call",
    )
    follow_interval_s: float = option(2.0, help="how often a replica with --follow-models checks its alias")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ServerConfig, env_prefix=ENV_PREFIX)


def _read_secret(path: Path | None, value: str | None, what: str) -> str | None:
    if value and path:
        raise SystemExit(f"error: give --{what} or --{what}-file, not both")
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise SystemExit(f"error: --{what}-file {path} is empty")
        return token
    return value or None


def check_store_options(cfg: StoreOptions) -> None:
    """SystemExit with one line when the store options do not go together."""
    if cfg.backend == "embedded" and cfg.store is None:
        raise SystemExit("error: --store is required with --backend embedded")
    if cfg.backend == "milvus" and not cfg.milvus_uri:
        raise SystemExit("error: --milvus-uri is required with --backend milvus")
    if cfg.index_gpus != "auto" and not cfg.index_gpus.isdigit():
        raise SystemExit(f"error: --index-gpus must be auto or a number, not {cfg.index_gpus!r}")


def server_config(options: StoreOptions, **overrides: object) -> ServerConfig:
    """A ServerConfig with these store options (and overrides): how `migrate` opens the stores."""
    shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(StoreOptions)}
    return ServerConfig(**{**shared, **overrides})


@dataclass(frozen=True, kw_only=True)
class MigrateConfig(StoreOptions):
    """`retrieval-server migrate`: the store options name the store to migrate (the source) and the
    new export (--model); the rest says where its images are and where the new store goes."""

    image_root: list[Path] = option(
        help="folders the items' uri metadata point into (file:// URIs or paths; relative ones are looked up "
        "under each root in turn); an item whose uri lies outside every root is refused before anything is written",
        metavar="DIR",
    )
    to: str = option(help="the new store: a directory that does not exist yet (embedded) or a new Milvus collection")
    alias: str | None = option(
        None,
        help="--backend milvus: once the new collection is complete, point this alias at it (created when "
        "missing; it must point at the migrated collection): replicas serving the alias with --follow-models "
        "switch to it without failing a call",
    )
    work: Path | None = option(
        None,
        help="folder of the resumable work (the source's listing, the embedding shards, the report); "
        "default TO.migrate beside an embedded destination, ./migrate-TO for Milvus; on a filesystem all "
        "processes share under torchrun",
    )
    shard_size: int = option(10_000, help="images per shard (the unit of work a rerun skips once done)")
    batch_size: int = option(64, "-b", "--batch-size", help="images per forward")
    workers: int = option(2, "-j", "--workers", help="image decoding processes per process")
    k: int = option(DEFAULT_K, help="neighbours of the vote that recomputes predicted labels")
    tau: float = option(DEFAULT_TAU, help="temperature of that vote")
    settle_s: float = option(
        10.0,
        help="with --alias: seconds given to the replicas to follow it before the last catch-up carries "
        "what they wrote to the old collection meanwhile (more than their --follow-interval-s plus the time "
        "they take to load the new export)",
    )


def migrate_config_from_args(args: argparse.Namespace) -> MigrateConfig:
    cfg = from_args(MigrateConfig, args)
    check_store_options(cfg)
    if cfg.alias and cfg.backend != "milvus":
        raise SystemExit("error: --alias goes with --backend milvus (an embedded server switches with SwitchModel)")
    for name in ("shard_size", "batch_size", "k", "tau"):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    if cfg.workers < 0 or cfg.settle_s < 0:
        raise SystemExit("error: --workers and --settle-s must not be negative")
    return cfg


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Validate the parsed options into a ServerConfig with the tokens read (SystemExit with one
    line when invalid)."""
    cfg = from_args(ServerConfig, args)
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    check_store_options(cfg)
    if cfg.follow_interval_s <= 0:
        raise SystemExit("error: --follow-interval-s must be positive")
    for name in (
        "max_batch_size",
        "max_queue",
        "decode_threads",
        "default_k",
        "max_k",
        "max_queries",
        "max_message_mb",
        "max_image_pixels",
    ):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive")
    if cfg.default_k > cfg.max_k:
        raise SystemExit("error: --default-k must not exceed --max-k")
    if cfg.default_tau <= 0:
        raise SystemExit("error: --default-tau must be positive")
    auth = _read_secret(cfg.auth_token_file, cfg.auth_token, "auth-token")
    read_only = _read_secret(cfg.read_only_token_file, cfg.read_only_token, "read-only-token")
    if read_only and not auth:
        raise SystemExit("error: --read-only-token needs --auth-token too (otherwise anyone may write)")
    return dataclasses.replace(
        cfg, auth_token=auth, read_only_token=read_only, auth_token_file=None, read_only_token_file=None
    )
