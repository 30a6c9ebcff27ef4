"""Switching a running server to a new model and its store without failing a call; serving.Serving
does the swap itself (a call finishes on the service it started on).

- Embedded (SwitchModel, the full token): the store `retrieval-server migrate` wrote from the served
  store is loaded with the new export beside the served ones. A first catch-up carries the writes
  made to the served store since the migration (its listing is in STORE/migration/); then writes
  wait while a last one carries those made during the first, and the new service takes over.
- Milvus (AliasFollower, --follow-models): a replica serves the collection its --milvus-collection
  alias points at, with the export of that collection's fingerprint. Every --follow-interval-s it
  looks at the alias; once `migrate --alias` has moved it, the replica loads the new collection and
  export beside the served ones and swaps. Until then it keeps answering from the old collection,
  which the migration leaves intact; migrate's last catch-up carries what it wrote there meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from moco_retrieval.api.v1 import retrieval_pb2 as pb

from .backup import BackupError, model_fingerprint
from .config import ServerConfig
from .listing import SourceError, embedded_listing, read_listing
from .migration import LISTING_FILE, MIGRATION_DIR, Carried, MigrationState, Reembedder, carry
from .service import RetrievalService
from .serving import Serving
from .store import StorageError

log = logging.getLogger(__name__)
Code = grpc.StatusCode
Load = Callable[[ServerConfig], RetrievalService]  # server.load_service with the server's metrics
Publish = Callable[[RetrievalService], None]  # point the model and store metrics at a service


class SwitchRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Switcher:
    """SwitchModel: one at a time (ABORTED for a second)."""

    def __init__(self, cfg: ServerConfig, serving: Serving, load: Load, publish: Publish) -> None:
        self.cfg, self.serving, self.load, self.publish = cfg, serving, load, publish
        self._busy = threading.Lock()

    def __call__(self, request: pb.SwitchModelRequest, context: grpc.ServicerContext) -> pb.SwitchModelResponse:
        if not self._busy.acquire(blocking=False):
            context.abort(Code.ABORTED, "another SwitchModel is running; retry once it has finished")
        try:
            return self.switch(request)
        except SwitchRefused as exc:
            context.abort(exc.code, str(exc))
        except (StorageError, SourceError) as exc:
            context.abort(Code.UNAVAILABLE, f"the switch failed and nothing changed: {exc}")
        finally:
            self._busy.release()

    def _check(self, request: pb.SwitchModelRequest, served: RetrievalService) -> MigrationState:
        if self.cfg.backend != "embedded":
            raise SwitchRefused(
                Code.FAILED_PRECONDITION,
                "SwitchModel switches an embedded server; Milvus replicas follow their alias (migrate --alias)",
            )
        if not request.model or not request.store:
            raise SwitchRefused(Code.INVALID_ARGUMENT, "give both model and store")
        store = Path(request.store)
        if not store.is_dir():
            raise SwitchRefused(Code.INVALID_ARGUMENT, f"store {store}: not a directory")
        try:
            fingerprint = model_fingerprint(Path(request.model))
        except BackupError as exc:
            raise SwitchRefused(Code.INVALID_ARGUMENT, str(exc)) from exc
        served_fingerprint = served.encoder.meta.fingerprint
        if fingerprint == served_fingerprint:
            raise SwitchRefused(Code.FAILED_PRECONDITION, f"{request.model} is the model served already")
        state = MigrationState.read(store)
        served_store = served.backend.store
        if state is None or (state.source_store_id, state.source_fingerprint) != (
            served_store.store_id,
            served_fingerprint,
        ):
            raise SwitchRefused(
                Code.FAILED_PRECONDITION,
                f"store {store} was not migrated from the served store {served_store.directory} "
                "(retrieval-server migrate --store SERVED --to NEW writes one)",
            )
        if state.fingerprint != fingerprint:
            raise SwitchRefused(
                Code.FAILED_PRECONDITION,
                f"store {store} holds embeddings of model {state.fingerprint}, not of {request.model} ({fingerprint})",
            )
        if not (store / MIGRATION_DIR / LISTING_FILE).is_file():
            raise SwitchRefused(
                Code.FAILED_PRECONDITION,
                f"store {store}: its migration state is gone, so writes since cannot be carried",
            )
        return state

    def switch(self, request: pb.SwitchModelRequest) -> pb.SwitchModelResponse:
        served = self.serving.current
        state = self._check(request, served)
        store = Path(request.store)
        try:
            new = self.load(dataclasses.replace(self.cfg, model=Path(request.model), store=store, reset_store=False))
        except Exception as exc:  # noqa: BLE001 - StartupError: a store in use, an unreadable one
            raise SwitchRefused(Code.FAILED_PRECONDITION, f"cannot load the new model and store: {exc}") from exc
        source = served.backend.store.directory
        reembedder = Reembedder(new.encoder, [Path(r) for r in state.image_roots], self.cfg.max_batch_size)
        carried: list[Carried] = []

        def catch_up(before: dict) -> dict:
            now = embedded_listing(source).items
            carried.append(carry(new.backend, before, now, reembedder, state.k, state.tau))
            return now

        try:
            now = catch_up(read_listing(store / MIGRATION_DIR / LISTING_FILE))  # while writes go on
            previous = self.serving.replace(new, lambda: catch_up(now))  # writes wait for this one
        except BaseException:
            new.close()
            raise
        self.publish(new)
        (store / MIGRATION_DIR / LISTING_FILE).unlink(missing_ok=True)  # the new store goes its own way now
        self.serving.close_when_idle(previous)
        log.info("switched to model %s and store %s", new.encoder.meta.fingerprint, store)
        return pb.SwitchModelResponse(
            previous_fingerprint=served.encoder.meta.fingerprint,
            model_fingerprint=new.encoder.meta.fingerprint,
            carried=sum(len(c.changes) for c in carried),
            missing=[pb.MissingImage(id=m.id, uri=m.uri, reason=m.reason) for c in carried for m in c.missing],
            item_count=new.backend.item_count,
        )


class AliasFollower:
    """A Milvus replica following its alias (see the module doc)."""

    def __init__(self, cfg: ServerConfig, serving: Serving, load: Load, publish: Publish) -> None:
        from pymilvus import MilvusClient

        self.cfg, self.serving, self.load, self.publish = cfg, serving, load, publish
        self.exports = exports_by_fingerprint(cfg)
        self.client = MilvusClient(uri=cfg.milvus_uri, token=cfg.milvus_token or "")
        self._stop = threading.Event()
        self._unknown: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="alias-follower", daemon=True)
        self._thread.start()

    def check(self) -> bool:
        """Switch when the alias points at another collection; whether it did."""
        from .milvus_backend import served_collection

        collection, fingerprint = served_collection(self.client, self.cfg.milvus_collection)
        if not collection or collection == self.serving.current.backend.collection:
            return False
        export = self.exports.get(fingerprint)
        if export is None:
            if collection not in self._unknown:
                self._unknown.add(collection)
                log.error(
                    "alias %s points at collection %s of model %s, which is not among --model and --follow-models: "
                    "still serving the previous collection",
                    self.cfg.milvus_collection,
                    collection,
                    fingerprint,
                )
            return False
        new = self.load(dataclasses.replace(self.cfg, model=export, milvus_collection=collection))
        self.serving.close_when_idle(self.serving.replace(new))
        self.publish(new)
        log.info("followed alias %s to collection %s (model %s)", self.cfg.milvus_collection, collection, fingerprint)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.follow_interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - Milvus unreachable for a moment: keep serving, look again
                log.exception("checking alias %s failed", self.cfg.milvus_collection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def exports_by_fingerprint(cfg: ServerConfig) -> dict[str, Path]:
    """--model and --follow-models by their fingerprint."""
    return {model_fingerprint(path): path for path in [cfg.model, *cfg.follow_models]}


def initial_export(cfg: ServerConfig) -> ServerConfig:
    """With --follow-models, start on the export of the collection the alias points at now (so a
    replica restarted after a switch serves the new model), else on --model."""
    from pymilvus import MilvusClient

    from .milvus_backend import served_collection

    client = MilvusClient(uri=cfg.milvus_uri, token=cfg.milvus_token or "")
    try:
        _collection, fingerprint = served_collection(client, cfg.milvus_collection)
    finally:
        client.close()
    export = exports_by_fingerprint(cfg).get(fingerprint)
    return dataclasses.replace(cfg, model=export) if export is not None else cfg
