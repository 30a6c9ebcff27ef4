"""Switching a serving system to a new model without failing a call, under load: an embedded server
switched by SwitchModel, and two Milvus replicas following their alias when `migrate --alias` moves
it. Client threads search, classify, embed and write throughout; every call must succeed, answers
come from the old model before the switch and from the new one after it, and every acknowledged
write is in the new store, embedded by the new model."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from pymilvus import MilvusClient

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from retrieval_client import RetrievalClient, RetrievalError, UpsertItem
from retrieval_server.store import StoreInUse, StoreLock
from tests.retrieval_server.calls import expect
from tests.retrieval_server.upgrades import HUMAN, MilvusServer, make_corpus, migrate, source_store
from tests.server_harness import ServerProcess, make_export, png_bytes

PROBE = png_bytes(1234)  # embedded by every load thread: which model answered


@dataclass
class Load:
    """Client threads calling a server (or several) until stopped: what they saw."""

    addresses: list[str]
    root: Path  # where written images go (their uri: a switch re-embeds them from there)
    token: str | None = None
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    models: list[tuple[float, str]] = field(default_factory=list)  # (time the call began, model)
    written: dict[str, bytes] = field(default_factory=dict)  # acknowledged writes: id -> image
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, probes: dict[str, np.ndarray], readers: int = 3) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._read, args=(n, probes)) for n in range(readers)]
        threads.append(threading.Thread(target=self._write))
        for t in threads:
            t.start()
        self._threads = threads
        return threads

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _call(self, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except RetrievalError as exc:
            with self._lock:
                self.failures.append(str(exc))
            return None
        with self._lock:
            self.calls += 1
        return result

    def _read(self, n: int, probes: dict[str, np.ndarray]) -> None:
        clients = [RetrievalClient(a, token=self.token) for a in self.addresses]
        rng = np.random.default_rng(n)
        while not self._stop.is_set():
            client = clients[int(rng.integers(len(clients)))]
            began = time.monotonic()
            vector = self._call(client.embed, [PROBE])
            if vector is not None:
                model = min(probes, key=lambda name: float(np.abs(probes[name] - vector[0]).max()))
                with self._lock:
                    self.models.append((began, model))
            self._call(client.search, image=png_bytes(int(rng.integers(1000))), k=5)
            self._call(client.classify, vector=rng.standard_normal(512), k=5, neighbors=0)
            self._call(client.classify, id="cat/00.png", k=5)
        for c in clients:
            c.close()

    def _write(self) -> None:
        clients = [RetrievalClient(a, token=self.token) for a in self.addresses]
        n = 0
        (self.root / "written").mkdir(exist_ok=True)
        while not self._stop.is_set():
            item_id, image = f"written/{n}.png", png_bytes(5000 + n)
            (self.root / item_id).write_bytes(image)
            item = UpsertItem(item_id, image=image, metadata={"uri": (self.root / item_id).resolve().as_uri()})
            result = self._call(clients[n % len(clients)].upsert_many, [item])
            if result is not None and result.upserted == 1:
                with self._lock:
                    self.written[item_id] = image
            n += 1
            time.sleep(0.05)
        for c in clients:
            c.close()


def probe_vectors(corpus, directory) -> dict[str, np.ndarray]:
    """The probe's embedding by each export, from servers of each (what tells the models apart)."""
    out = {}
    for name, model in (("old", corpus.old), ("new", corpus.new)):
        with ServerProcess(model, directory / f"probe-{name}") as server, RetrievalClient(server.address) as c:
            out[name] = c.embed([PROBE])[0]
    return out


def assert_switched(load: Load, began: float, ended: float) -> None:
    """No call failed; the calls made before the switch began were answered by the old model, those
    made after it ended by the new one."""
    assert load.failures == [] and load.calls > 50, (load.failures[:5], load.calls)
    before = {model for start, model in load.models if start < began}
    after = {model for start, model in load.models if start > ended}
    assert before == {"old"} and after == {"new"}, (before, after)


@pytest.mark.slow
def test_an_embedded_server_switches_under_load_without_failing_a_call(tmp_path):
    corpus = make_corpus(tmp_path)
    store, new_store = tmp_path / "store", tmp_path / "new"
    source_store(corpus, store)
    probes = probe_vectors(corpus, tmp_path)
    tokens = ("--auth-token", "t", "--read-only-token", "r")
    with ServerProcess(corpus.old, store, *tokens) as server:
        load = Load([server.address], corpus.root, token="t")
        load.start(probes)
        time.sleep(1.0)
        status, out, err = migrate(
            "--model", corpus.new, "--store", store, "--to", new_store, "--image-root", corpus.root
        )
        assert status == 1 and "left out: 2 items" in out, err  # the corpus's missing and broken images
        time.sleep(0.5)  # writes made since the migration: what the switch carries
        with RetrievalClient(server.address, token="r") as reader:
            old_fingerprint = reader.info().model_fingerprint
            with pytest.raises(RetrievalError) as denied:
                reader.switch_model(corpus.new, new_store)
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        with RetrievalClient(server.address, token="t", timeout=300) as admin:
            began = time.monotonic()
            switched = admin.switch_model(corpus.new, new_store)
            ended = time.monotonic()
            time.sleep(1.0)
            load.stop()
            new_fingerprint = admin.info().model_fingerprint
            stored = admin.get(sorted(load.written), include_embedding=True)
            again = admin.embed([load.written[s.id] for s in stored])
            labels = {s.id: s.label for s in admin.get(sorted(HUMAN))}
        assert_switched(load, began, ended)
        assert (switched.previous_fingerprint, switched.model_fingerprint) == (old_fingerprint, new_fingerprint)
        assert new_fingerprint != old_fingerprint
        assert switched.carried >= 1 and switched.missing == []
        assert len(stored) == len(load.written) > 0  # every acknowledged write, carried or written after
        np.testing.assert_array_equal(np.stack([s.embedding for s in stored]), again)  # by the new model
        assert labels == HUMAN  # human labels survive the model change
        deadline = time.monotonic() + 30
        while True:  # the old store is closed after its last call: its lock is free again
            try:
                StoreLock(store).acquire().release()
                break
            except StoreInUse:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert server.stop() == 0


@pytest.mark.parametrize("served", ["embedded", "milvus"], indirect=True)
def test_switch_model_refuses_bad_requests(served, tmp_path):
    request = pb.SwitchModelRequest
    other, missing = make_export(tmp_path, seed=7, name="other.pt"), tmp_path / "x.pt"
    (tmp_path / "plain").mkdir()
    if served.grpc.cfg.backend == "milvus":
        expect(grpc.StatusCode.FAILED_PRECONDITION, served.stub.SwitchModel, request(model=str(other), store="x"))
        return
    cases = [
        (grpc.StatusCode.INVALID_ARGUMENT, request(store=str(tmp_path)), "give both"),
        (grpc.StatusCode.INVALID_ARGUMENT, request(model=str(other), store=str(tmp_path / "none")), "not a directory"),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            request(model=str(missing), store=str(tmp_path)),
            "not a readable",
        ),
        (grpc.StatusCode.FAILED_PRECONDITION, request(model=str(served.grpc.cfg.model), store=str(tmp_path)), "served"),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            request(model=str(other), store=str(tmp_path / "plain")),
            "was not migrated from the served store",
        ),
    ]
    for code, req, message in cases:
        expect(code, served.stub.SwitchModel, req, match=message)
    assert served.stub.Info(pb.InfoRequest()).model_fingerprint  # still serving the same model


@pytest.mark.slow
def test_milvus_replicas_follow_their_alias_under_load(tmp_path):
    corpus = make_corpus(tmp_path)
    milvus = MilvusServer(tmp_path / "milvus")
    try:
        backend = ["--backend", "milvus", "--milvus-uri", milvus.uri]
        source_store(corpus, tmp_path / "unused", *backend, "--milvus-collection", "items_v1")
        client = MilvusClient(uri=milvus.uri)
        client.create_alias("items_v1", "items")  # what the replicas serve
        probes = probe_vectors(corpus, tmp_path)
        follow = ("--milvus-collection", "items", "--follow-models", corpus.new, "--follow-interval-s", 0.5)
        with (
            ServerProcess(corpus.old, tmp_path / "a", *backend, *follow) as a,
            ServerProcess(corpus.old, tmp_path / "b", *backend, *follow) as b,
        ):
            load = Load([a.address, b.address], corpus.root)
            load.start(probes, readers=2)
            time.sleep(1.0)
            began = time.monotonic()
            status, out, err = migrate(
                "--model",
                corpus.new,
                *backend,
                "--milvus-collection",
                "items",
                "--to",
                "items_v2",
                "--alias",
                "items",
                "--settle-s",
                10,
                "--image-root",
                corpus.root,
                "--work",
                tmp_path / "work",
            )
            ended = time.monotonic()
            assert status == 1 and "left out: 2 items" in out, err
            time.sleep(1.0)
            load.stop()
            assert_switched(load, began, ended)
            for replica in (a, b):
                with RetrievalClient(replica.address) as c:
                    assert c.embed([PROBE])[0].tolist() == probes["new"].tolist()
                    assert {s.id for s in c.get(sorted(load.written), ignore_missing=True)} == set(load.written)
                    assert {s.id: s.label for s in c.get(sorted(HUMAN))} == HUMAN
            assert client.describe_alias("items")["collection_name"] == "items_v2"
            assert client.has_collection("items_v1")  # the old collection is left for the user to drop
        client.close()
    finally:
        milvus.close()
