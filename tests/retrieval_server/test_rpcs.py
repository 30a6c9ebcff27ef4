"""Every RPC, health, reflection, dynamic batching and metrics, against one real `retrieval-server
serve` child process on 127.0.0.1 (every bad input is in test_validation.py, in-process)."""

from __future__ import annotations

import math
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from tests.retrieval_server.calls import (
    LIMITS,
    MAX_K,
    MAX_QUEUE,
    all_ids,
    expect,
    load_corpus,
    metric,
    samples,
    state,
    upsert,
)
from tests.server_harness import BACKENDS, ServerProcess, backend_args, make_export, png_bytes

Code = grpc.StatusCode


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(f"rpcs-{request.param}")
    args = [arg for name, value in LIMITS.items() for arg in (f"--{name.replace('_', '-')}", value)]
    with ServerProcess(make_export(root), root / "store", *args, *backend_args(request.param, root)) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    channel = server.channel()
    yield server.stub(channel)
    channel.close()


def scrape(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    return samples(urllib.request.urlopen(server.metrics_url, timeout=10).read().decode())


@pytest.fixture(scope="module")
def corpus(stub) -> dict[str, bytes]:
    return load_corpus(stub)


def test_health_and_reflection(server: ServerProcess) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "retrieval.v1.Retrieval"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"retrieval.v1.Retrieval", "grpc.health.v1.Health"} <= names


INDEX_TYPE = {"embedded": "Flat", "milvus": "milvus:FLAT"}


def test_info(stub, request) -> None:
    info = stub.Info(pb.InfoRequest())
    assert info.arch == "resnet18" and info.dim == 512 and info.input_size == 32
    assert info.model_fingerprint.startswith("sha256:")
    index_type = INDEX_TYPE[request.node.callspec.params["server"]]
    assert (info.index_type, info.index_device, info.index_gpus, info.model_device) == (index_type, "cpu", 0, "cpu")
    assert (info.max_k, info.default_k, info.max_batch_size) == (MAX_K, 20, 64)
    assert math.isclose(info.default_tau, 0.07, rel_tol=1e-6)
    assert info.max_message_bytes == 1024 * 1024


def test_embed_is_normalised_and_ordered(stub) -> None:
    a, b = png_bytes(100), png_bytes(101)
    ab = stub.Embed(pb.EmbedRequest(images=[a, b]))
    ba = stub.Embed(pb.EmbedRequest(images=[b, a]))
    assert ab.dim == 512 and len(ab.embeddings) == 2
    va, vb = (np.array(e.values) for e in ab.embeddings)
    assert np.isclose(np.linalg.norm(va), 1.0, atol=1e-5) and not np.allclose(va, vb)
    np.testing.assert_allclose(va, ba.embeddings[1].values, atol=1e-5)
    np.testing.assert_allclose(vb, ba.embeddings[0].values, atol=1e-5)


def test_concurrent_embeds_share_forwards(stub, server: ServerProcess) -> None:
    before = scrape(server)
    images = [png_bytes(200 + i) for i in range(12)]
    alone = [np.array(stub.Embed(pb.EmbedRequest(images=[img])).embeddings[0].values) for img in images]
    results: list = [None] * len(images)
    barrier = threading.Barrier(len(images))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = np.array(stub.Embed(pb.EmbedRequest(images=[images[i]])).embeddings[0].values)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, alone):  # each caller gets its own image's embedding back
        np.testing.assert_allclose(got, want, atol=1e-4)
    after = scrape(server)
    forwards = metric(after, "retrieval_batch_size_count") - metric(before, "retrieval_batch_size_count")
    embedded = metric(after, "retrieval_batch_size_sum") - metric(before, "retrieval_batch_size_sum")
    assert embedded == 2 * len(images)
    assert forwards < 2 * len(images), "no forward batched two concurrent calls"


def test_upsert_get_and_overwrite(stub, corpus) -> None:
    got = stub.Get(pb.GetRequest(ids=["a4", "a0", "a9"], include_embedding=True)).items
    assert [(i.id, i.label, i.metadata["uri"]) for i in got] == [
        ("a4", "dog", "u/a4"),
        ("a0", "cat", "u/a0"),
        ("a9", "", "u/a9"),
    ]
    embedded = stub.Embed(pb.EmbedRequest(images=[corpus["a4"]])).embeddings[0].values
    np.testing.assert_allclose(got[0].embedding.values, embedded, atol=1e-5)
    assert not stub.Get(pb.GetRequest(ids=["a4"])).items[0].HasField("embedding")
    # overwrite a0 by vector without a label: label kept, metadata and embedding replaced
    vector = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    (ack,) = upsert(stub, [pb.Item(id="a0", embedding=pb.Vector(values=vector.tolist()), metadata={"uri": "new"})])
    assert (ack.upserted, ack.failed) == (1, 0)
    item = stub.Get(pb.GetRequest(ids=["a0"], include_embedding=True)).items[0]
    assert (item.label, dict(item.metadata)) == ("cat", {"uri": "new"})
    np.testing.assert_allclose(item.embedding.values, vector / np.linalg.norm(vector), atol=1e-6)
    assert stub.Info(pb.InfoRequest()).item_count == 12
    top = stub.Search(pb.SearchRequest(query=pb.Query(vector=pb.Vector(values=vector.tolist())), k=1)).neighbors[0]
    assert top.id == "a0" and math.isclose(top.score, 1.0, abs_tol=1e-5)
    (ack,) = upsert(stub, [pb.Item(id="a0", image=corpus["a0"], metadata={"uri": "u/a0"})])
    assert ack.upserted == 1


def test_search(stub, corpus) -> None:
    res = stub.Search(pb.SearchRequest(query=pb.Query(id="a1"), k=5)).neighbors
    assert len(res) == 5 and "a1" not in [n.id for n in res]
    scores = [n.score for n in res]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    assert all(n.metadata["uri"] == f"u/{n.id}" for n in res)
    by_image = stub.Search(pb.SearchRequest(query=pb.Query(image=corpus["a1"]), k=1)).neighbors[0]
    assert by_image.id == "a1" and by_image.score > 0.9999
    default_k = stub.Search(pb.SearchRequest(query=pb.Query(id="a1"))).neighbors
    assert len(default_k) == 10
    dogs = stub.Search(pb.SearchRequest(query=pb.Query(id="a1"), k=10, labels=["dog"])).neighbors
    assert sorted(n.id for n in dogs) == ["a4", "a5", "a6", "a7"] and {n.label for n in dogs} == {"dog"}
    cut = res[2].score
    above = stub.Search(pb.SearchRequest(query=pb.Query(id="a1"), k=5, min_score=cut)).neighbors
    assert [n.id for n in above] == [n.id for n in res if n.score >= cut]


def test_classify_and_set_labels(stub, corpus) -> None:
    reply = stub.Classify(pb.ClassifyRequest(query=pb.Query(image=corpus["a9"]), k=3, tau=0.1))
    assert reply.label in ("cat", "dog") and len(reply.neighbors) == 3
    assert {n.label for n in reply.neighbors} <= {"cat", "dog"}  # only human-labelled items vote
    assert math.isclose(sum(s.score for s in reply.scores), 1.0, abs_tol=1e-5)
    assert reply.scores[0].label == reply.label and math.isclose(reply.confidence, reply.scores[0].score)
    # a query by a labelled id leaves itself out
    own = stub.Classify(pb.ClassifyRequest(query=pb.Query(id="a0"), k=8))
    assert "a0" not in [n.id for n in own.neighbors] and len(own.neighbors) == 7
    # human label on a9, predicted label on a10 (which does not vote)
    stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="a9", label="bird")]))
    stub.SetLabels(
        pb.SetLabelsRequest(
            assignments=[pb.LabelAssignment(id="a10", label="fish", confidence=0.5)], source=pb.PREDICTED
        )
    )
    items = {i.id: i for i in stub.Get(pb.GetRequest(ids=["a9", "a10"])).items}
    assert items["a9"].label == "bird" and items["a10"].label == "" and items["a10"].predicted_label == "fish"
    assert math.isclose(items["a10"].predicted_confidence, 0.5)
    assert dict(stub.Info(pb.InfoRequest()).label_counts) == {"cat": 4, "dog": 4, "bird": 1}
    self_vote = stub.Classify(pb.ClassifyRequest(query=pb.Query(image=corpus["a9"]), k=1))
    assert (self_vote.label, self_vote.neighbors[0].id) == ("bird", "a9")
    everything = stub.Classify(pb.ClassifyRequest(query=pb.Query(image=corpus["a10"]), k=MAX_K))
    assert {s.label for s in everything.scores} == {"cat", "dog", "bird"} and len(everything.neighbors) == 9
    stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="a9", label="")]))
    assert stub.Get(pb.GetRequest(ids=["a9"])).items[0].label == ""
    assert stub.Info(pb.InfoRequest()).labelled_count == 8


def test_classify_returns_as_many_neighbours_as_asked(stub, corpus) -> None:
    """neighbors unset: all k (as before the field existed); 0: none; n: the best n. The vote is the same."""
    query = pb.Query(image=corpus["a10"])
    full = stub.Classify(pb.ClassifyRequest(query=query, k=6))
    none = stub.Classify(pb.ClassifyRequest(query=query, k=6, neighbors=0))
    two = stub.Classify(pb.ClassifyRequest(query=query, k=6, neighbors=2))
    assert len(full.neighbors) == 6 and len(none.neighbors) == 0
    assert [n.id for n in two.neighbors] == [n.id for n in full.neighbors[:2]]
    for reply in (none, two):
        assert (reply.label, list(reply.scores)) == (full.label, list(full.scores))


def test_packed_vectors_equal_repeated_floats(stub, corpus) -> None:
    """Vector.data (little-endian float32 bytes) carries the same numbers as Vector.values, both ways."""
    images = [corpus["a1"], corpus["a2"]]
    plain = stub.Embed(pb.EmbedRequest(images=images)).embeddings
    packed = stub.Embed(pb.EmbedRequest(images=images, packed=True)).embeddings
    for p, v in zip(packed, plain):
        assert not p.values and np.array_equal(np.frombuffer(p.data, "<f4"), np.array(v.values, np.float32))
    (got,) = stub.Get(pb.GetRequest(ids=["a3"], include_embedding=True, packed=True)).items
    (ref,) = stub.Get(pb.GetRequest(ids=["a3"], include_embedding=True)).items
    assert np.array_equal(np.frombuffer(got.embedding.data, "<f4"), np.array(ref.embedding.values, np.float32))
    by_data = stub.Search(pb.SearchRequest(query=pb.Query(vector=pb.Vector(data=got.embedding.data)), k=4))
    by_values = stub.Search(pb.SearchRequest(query=pb.Query(vector=ref.embedding), k=4))
    assert [n.id for n in by_data.neighbors] == [n.id for n in by_values.neighbors] and by_data.neighbors[0].id == "a3"
    (ack,) = upsert(stub, [pb.Item(id="packed", embedding=pb.Vector(data=got.embedding.data))])
    assert ack.upserted == 1
    (stored,) = stub.Get(pb.GetRequest(ids=["packed"], include_embedding=True, packed=True)).items
    assert stored.embedding.data == got.embedding.data  # a normalised vector is stored as sent
    assert stub.Delete(pb.DeleteRequest(ids=["packed"])).deleted == 1


def test_label_corpus(stub, corpus, request) -> None:
    proposals = list(stub.LabelCorpus(pb.LabelCorpusRequest(k=4, tau=0.07)))
    ids = [p.id for p in proposals]
    assert sorted(ids) == ["a10", "a11", "a8", "a9"]  # every unlabelled item once
    if request.node.callspec.params["server"] == "embedded":
        assert ids == sorted(ids)  # by id (Milvus: in its key order)
    for p in proposals:
        alone = stub.Classify(pb.ClassifyRequest(query=pb.Query(id=p.id), k=4, tau=0.07))
        assert p.label == alone.label and math.isclose(p.confidence, alone.confidence, rel_tol=1e-5)
    previous = {i.id: i.predicted_label for i in stub.Get(pb.GetRequest(ids=[p.id for p in proposals])).items}
    assert previous["a8"] == ""  # not applied
    cut = sorted(p.confidence for p in proposals)[1]
    applied = list(stub.LabelCorpus(pb.LabelCorpusRequest(k=4, tau=0.07, min_confidence=cut, apply=True)))
    assert {p.id for p in applied} == {p.id for p in proposals if p.confidence >= cut}
    stored = {i.id: i for i in stub.Get(pb.GetRequest(ids=[p.id for p in proposals])).items}
    for p in proposals:
        assert stored[p.id].predicted_label == (p.label if p.confidence >= cut else previous[p.id])
        assert stored[p.id].label == ""


def test_delete(stub, corpus) -> None:
    (ack,) = upsert(stub, [pb.Item(id="gone", image=png_bytes(999), label="cat")])
    assert ack.upserted == 1
    assert stub.Delete(pb.DeleteRequest(ids=["gone"])).deleted == 1
    expect(Code.NOT_FOUND, stub.Get, pb.GetRequest(ids=["gone"]), match="gone")
    assert "gone" not in all_ids(stub)
    assert stub.Info(pb.InfoRequest()).labelled_count == 8
    assert stub.Delete(pb.DeleteRequest(ids=["gone"], ignore_missing=True)).deleted == 0
    assert stub.Get(pb.GetRequest(ids=["gone", "a1"], ignore_missing=True)).items[0].id == "a1"


def test_classify_without_labels_is_failed_precondition(stub, corpus) -> None:
    labelled = [i for i in stub.Get(pb.GetRequest(ids=all_ids(stub))).items if i.label]
    stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=i.id) for i in labelled]))
    try:
        before = state(stub)
        expect(
            Code.FAILED_PRECONDITION,
            stub.Classify,
            pb.ClassifyRequest(query=pb.Query(id="a1")),
            match="no labelled items",
        )
        expect(Code.FAILED_PRECONDITION, stub.LabelCorpus, pb.LabelCorpusRequest(apply=True), match="no labelled")
        assert state(stub) == before
    finally:
        stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=i.id, label=i.label) for i in labelled]))
    assert stub.Info(pb.InfoRequest()).labelled_count == len(labelled)


def test_metrics_move(stub, corpus, server: ServerProcess, request) -> None:
    before = scrape(server)
    stub.Search(pb.SearchRequest(query=pb.Query(id="a1"), k=3))
    stub.Classify(pb.ClassifyRequest(query=pb.Query(image=corpus["a2"]), k=3))
    list(stub.LabelCorpus(pb.LabelCorpusRequest(k=3)))
    upsert(stub, [pb.Item(id="m1", image=png_bytes(500))])
    after = scrape(server)
    moved = lambda name, **lab: metric(after, name, **lab) - metric(before, name, **lab)  # noqa: E731
    assert moved("grpc_server_started_total", grpc_method="Search", grpc_type="unary") == 1
    assert (
        moved("grpc_server_handled_total", grpc_method="Search", grpc_code="OK", grpc_service="retrieval.v1.Retrieval")
        == 1
    )
    assert moved("grpc_server_handled_total", grpc_method="Upsert", grpc_type="bidi_stream", grpc_code="OK") == 1
    assert moved("grpc_server_handled_total", grpc_method="LabelCorpus", grpc_type="server_stream") == 1
    assert moved("grpc_server_handling_seconds_count", grpc_method="Classify") == 1
    assert moved("retrieval_index_search_seconds_count", op="search") == 1
    assert moved("retrieval_index_search_seconds_count", op="classify") == 1
    assert moved("retrieval_index_search_seconds_count", op="label_corpus") >= 1
    assert moved("retrieval_batch_size_sum") == 2 and moved("retrieval_inference_seconds_count") >= 1
    info = stub.Info(pb.InfoRequest())
    assert metric(after, "retrieval_index_items") == info.item_count == 13
    assert metric(after, "retrieval_labelled_items") == info.labelled_count
    assert metric(after, "retrieval_queue_capacity") == MAX_QUEUE and metric(after, "retrieval_queue_depth") == 0
    assert (
        metric(
            after,
            "retrieval_model_info",
            arch="resnet18",
            fingerprint=info.model_fingerprint,
            dim="512",
            model_device="cpu",
            index_device="cpu",
            index_type=INDEX_TYPE[request.node.callspec.params["server"]],
        )
        == 1
    )
    assert metric(after, "retrieval_build_info", version=info.server_version) == 1
    assert metric(after, "process_resident_memory_bytes") > 0
