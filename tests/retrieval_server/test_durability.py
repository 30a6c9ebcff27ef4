"""Durability and lifecycle of a real server process: SIGKILL in the middle of a bulk upsert loses
no acknowledged item and leaves no half-written batch; restarts replay the index snapshot plus later
rows and deletes; SIGTERM exits 0; start-up errors are one line and a non-zero exit."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc
from moco_retrieval.net import free_port
from retrieval_server.process import serve_command
from retrieval_server.store import Store
from tests.server_harness import REPO, ServerProcess, make_export, png_bytes, run_server_expecting_failure, server_env

pytestmark = pytest.mark.slow

BATCH, DIM = 16, 512


def _batch(seq: int) -> list[pb.Item]:
    rng = np.random.default_rng(seq)
    vectors = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    return [
        pb.Item(
            id=f"s{seq:04d}-{i:02d}",
            embedding=pb.Vector(values=v.tolist()),
            label="even" if i % 2 == 0 else "",
            metadata={"seq": str(seq)},
        )
        for i, v in enumerate(vectors)
    ]


def _expected(item: pb.Item) -> np.ndarray:
    v = np.array(item.embedding.values, dtype=np.float32)
    return v / np.linalg.norm(v)


class BulkUpsert(threading.Thread):
    """Streams batches until the server dies; records which sequences were acknowledged."""

    def __init__(self, stub, batches: int) -> None:
        super().__init__(daemon=True)
        self.stub, self.batches = stub, batches
        self.acked: list[int] = []
        self.sent = 0
        self.error: grpc.RpcError | None = None

    def requests(self):
        for seq in range(self.batches):
            self.sent = seq + 1
            yield pb.UpsertRequest(items=_batch(seq))

    def run(self) -> None:
        try:
            for ack in self.stub.Upsert(self.requests()):
                assert (ack.upserted, ack.failed) == (BATCH, 0)
                self.acked.append(ack.sequence)
        except grpc.RpcError as exc:
            self.error = exc


def _check_consistent(stub, max_sequence: int, must_have: list[int], others: int = 0) -> list[int]:
    """Every batch is all in or all out, acknowledged ones are in, and the index matches the store.
    `others`: labelled items stored besides the batches. Returns the sequences present."""
    present = []
    for seq in range(max_sequence):
        items = _batch(seq)
        got = stub.Get(pb.GetRequest(ids=[i.id for i in items], include_embedding=True, ignore_missing=True)).items
        assert len(got) in (0, BATCH), f"batch {seq} half-written: {len(got)} of {BATCH} items"
        if got:
            present.append(seq)
            for sent, stored in zip(items, got):
                assert stored.id == sent.id and stored.label == sent.label and stored.metadata["seq"] == str(seq)
                np.testing.assert_allclose(stored.embedding.values, _expected(sent), rtol=0, atol=1e-6)
    assert set(must_have) <= set(present), f"acknowledged batches lost: {sorted(set(must_have) - set(present))}"
    info = stub.Info(pb.InfoRequest())
    assert info.item_count == BATCH * len(present) + others
    assert info.labelled_count == BATCH // 2 * len(present) + others
    for seq in present:  # searchable: each item is its own nearest neighbour, in both indexes
        item = _batch(seq)[seq % BATCH]
        query = pb.Query(vector=item.embedding)
        top = stub.Search(pb.SearchRequest(query=query, k=1)).neighbors[0]
        assert top.id == item.id and top.score > 0.9999
        if item.label:
            vote = stub.Classify(pb.ClassifyRequest(query=query, k=1))
            assert vote.neighbors[0].id == item.id
    return present


def test_sigkill_mid_upsert_then_restarts(tmp_path: Path) -> None:
    model = make_export(tmp_path)
    store = tmp_path / "store"
    with ServerProcess(model, store, "--snapshot-every", 100) as server:
        upload = BulkUpsert(server.stub(), batches=100_000)
        upload.start()
        while len(upload.acked) < 40 and upload.is_alive():
            time.sleep(0.01)
        assert upload.is_alive(), f"upload ended early: {upload.error}"
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        upload.join(30)
    assert upload.error is not None and upload.error.code() == grpc.StatusCode.UNAVAILABLE
    acked = list(upload.acked)
    assert acked == list(range(len(acked)))
    assert list(store.glob("items-v*.faiss")), "no index snapshot was written during the upload"

    with ServerProcess(model, store) as server:  # snapshot + rows after it
        stub = server.stub()
        present = _check_consistent(stub, upload.sent, acked)
        print(f"SIGKILL after {len(acked)} acknowledged batches ({upload.sent} sent): {len(present)} present")
        doomed = [i.id for i in _batch(present[0])]
        assert stub.Delete(pb.DeleteRequest(ids=doomed)).deleted == BATCH
        extra = [pb.Item(id="late", image=png_bytes(1), label="late")]
        assert next(stub.Upsert(iter([pb.UpsertRequest(items=extra)]))).upserted == 1
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # the delete is only in the store's tombstones

    with ServerProcess(model, store) as server:
        stub = server.stub()
        _check_consistent(stub, upload.sent, present[1:], others=1)
        assert stub.Get(pb.GetRequest(ids=doomed, ignore_missing=True)).items == []
        assert stub.Classify(pb.ClassifyRequest(query=pb.Query(image=png_bytes(1)), k=1)).label == "late"
        assert server.stop(signal.SIGTERM) == 0
        assert "stopped cleanly" in server.log()


def test_sigterm_finishes_inflight_stream_and_exits_0(tmp_path: Path) -> None:
    model = make_export(tmp_path)
    with ServerProcess(model, tmp_path / "store") as server:
        stub = server.stub()
        release = threading.Event()

        def requests():
            yield pb.UpsertRequest(items=_batch(0))
            release.wait(30)  # SIGTERM arrives while this call is in flight
            yield pb.UpsertRequest(items=_batch(1))

        acks: list[pb.UpsertAck] = []
        reader = threading.Thread(target=lambda: acks.extend(stub.Upsert(requests())))
        reader.start()
        while not acks:
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        with server.channel() as channel:  # wait until the drain starts: health NOT_SERVING, then no new calls
            health = health_pb2_grpc.HealthStub(channel)
            try:
                while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                    time.sleep(0.05)
            except grpc.RpcError:
                pass  # already past NOT_SERVING: the server stopped taking calls
            with pytest.raises(grpc.RpcError) as refused:
                server.stub(channel).Info(pb.InfoRequest(), timeout=10)
            # gRPC refuses calls during server.stop(grace) with UNAVAILABLE or, racing it, CANCELLED
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        release.set()
        reader.join(30)
        assert [a.sequence for a in acks] == [0, 1]
        assert server.proc.wait(60) == 0
    with ServerProcess(model, tmp_path / "store") as server:
        assert server.stub().Info(pb.InfoRequest()).item_count == 2 * BATCH


def test_startup_errors_are_one_line(tmp_path: Path) -> None:
    model_a = make_export(tmp_path, seed=0, name="a.pt")
    model_b = make_export(tmp_path, seed=1, name="b.pt")
    store = tmp_path / "store"
    with ServerProcess(model_a, store) as server:
        stub = server.stub()
        next(stub.Upsert(iter([pb.UpsertRequest(items=_batch(0))])))
        fingerprint_a = stub.Info(pb.InfoRequest()).model_fingerprint
    refused = run_server_expecting_failure(model_b, store)
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (
        "FAILED_PRECONDITION" in refused.stderr
        and fingerprint_a in refused.stderr
        and "--reset-store" in refused.stderr
    )
    assert Store(store).counts() == (BATCH, {"even": BATCH // 2})  # untouched by the refused start
    with ServerProcess(model_b, store, "--reset-store") as server:
        info = server.stub().Info(pb.InfoRequest())
        assert info.item_count == 0 and info.model_fingerprint != fingerprint_a
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    refused = run_server_expecting_failure(bad, tmp_path / "s2")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "retrieval-server: error:" in refused.stderr and "bad.pt" in refused.stderr


def test_not_serving_until_loaded(tmp_path: Path) -> None:
    """While the store is locked by another writer the server cannot load: health says NOT_SERVING
    and calls get UNAVAILABLE; once the lock goes it serves."""
    model = make_export(tmp_path)
    store = tmp_path / "store"
    Store(store).close()
    blocker = sqlite3.connect(store / Store.FILENAME, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    port, ready = free_port(), tmp_path / "ready.json"
    cmd = serve_command(model, store, "--ready-file", ready)
    cmd[cmd.index("--port") + 1] = str(port)
    proc = subprocess.Popen(cmd, env=server_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RetrievalStub(channel).Info(pb.InfoRequest())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
            assert not ready.exists()
            blocker.execute("COMMIT")
            while not ready.exists():
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            assert pb_grpc.RetrievalStub(channel).Info(pb.InfoRequest()).item_count == 0
    finally:
        blocker.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_stored_labels_the_rule_now_refuses_are_named_at_startup_and_kept(tmp_path: Path) -> None:
    """A label written under the laxer rule before (here straight into the store: U+202E shows
    "catone" for "cat" + "eno") is kept and served, named in one warning at start-up, and refused
    from then on."""
    model, store = make_export(tmp_path), tmp_path / "store"
    with ServerProcess(model, store) as server:
        next(server.stub().Upsert(iter([pb.UpsertRequest(items=_batch(0))])))
    spoof = "cat\u202eeno"
    written = Store(store)
    written.set_labels([("s0000-00", spoof, 1.0), ("s0000-01", spoof, 1.0)], predicted=False)
    written.close()
    with ServerProcess(model, store) as server:
        stub = server.stub()
        assert [i.label for i in stub.Get(pb.GetRequest(ids=["s0000-00", "s0000-01"])).items] == [spoof, spoof]
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="s0000-02", label=spoof)]))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "U+202E" in refused.value.details()
        warnings = [line for line in server.log().splitlines() if "break the label rule" in line]
    assert len(warnings) == 1 and "1 stored labels break the label rule ('cat\\u202eeno' on 2 items:" in warnings[0]
    assert "kept and served" in warnings[0]
