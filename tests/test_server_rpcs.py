"""Every RPC, every bad input (status + message, store unchanged), health, reflection, dynamic
batching and metrics, against one real `retrieval-server serve` child process on 127.0.0.1."""
from __future__ import annotations

import io
import math
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from moco_retrieval.api.v1 import retrieval_pb2 as pb

from server_harness import ServerProcess, make_export, png_bytes

MAX_QUEUE, MAX_K, MAX_PIXELS = 16, 64, 4096
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rpcs")
    model = make_export(root)
    args = ["--max-queue", MAX_QUEUE, "--max-k", MAX_K, "--default-k", 20, "--max-image-pixels", MAX_PIXELS,
            "--max-message-mb", 1, "--max-queue-delay-ms", 50, "--decode-threads", 2]
    with ServerProcess(model, root / "store", *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    channel = server.channel()
    yield server.stub(channel)
    channel.close()


def scrape(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the /metrics page."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= set(lab))


def upsert(stub, *batches: list[pb.Item]) -> list[pb.UpsertAck]:
    return list(stub.Upsert(iter([pb.UpsertRequest(items=b) for b in batches])))


def all_ids(stub) -> list[str]:
    """Every stored id (a zero vector is invalid, so search with a fixed random one and k=max)."""
    vector = pb.Vector(values=np.random.default_rng(0).standard_normal(512).tolist())
    return sorted(n.id for n in stub.Search(pb.SearchRequest(query=pb.Query(vector=vector), k=MAX_K)).neighbors)


def state(stub) -> tuple:
    """Everything a bad request must leave unchanged: counts, and every item with its embedding."""
    info = stub.Info(pb.InfoRequest())
    items = stub.Get(pb.GetRequest(ids=all_ids(stub), include_embedding=True)).items
    return info.item_count, dict(info.label_counts), [i.SerializeToString(deterministic=True) for i in items]


def expect(code: grpc.StatusCode, call, *args, match: str = "", **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kwargs)
        if not hasattr(result, "SerializeToString"):
            list(result)  # a response stream: errors surface while reading it
    assert err.value.code() == code, err.value.details()
    assert match.lower() in err.value.details().lower()
    return err.value


@pytest.fixture(scope="module")
def corpus(stub) -> dict[str, bytes]:
    """12 items: a0..a11, labels cat (0-3), dog (4-7), none (8-11); metadata uri."""
    images = {f"a{i}": png_bytes(i) for i in range(12)}
    items = [pb.Item(id=i, image=img, label=("cat" if n < 4 else "dog" if n < 8 else ""), metadata={"uri": f"u/{i}"})
             for n, (i, img) in enumerate(images.items())]
    acks = upsert(stub, items[:5], items[5:])
    assert [(a.sequence, a.upserted, a.failed) for a in acks] == [(0, 5, 0), (1, 7, 0)]
    return images


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


def test_info(stub, server: ServerProcess) -> None:
    info = stub.Info(pb.InfoRequest())
    assert info.arch == "resnet18" and info.dim == 512 and info.input_size == 32
    assert info.model_fingerprint.startswith("sha256:")
    assert (info.index_type, info.index_device, info.index_gpus, info.model_device) == ("Flat", "cpu", 0, "cpu")
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
    assert [(i.id, i.label, i.metadata["uri"]) for i in got] == [("a4", "dog", "u/a4"), ("a0", "cat", "u/a0"),
                                                                 ("a9", "", "u/a9")]
    embedded = stub.Embed(pb.EmbedRequest(images=[corpus["a4"]])).embeddings[0].values
    np.testing.assert_allclose(got[0].embedding.values, embedded, atol=1e-5)
    assert not stub.Get(pb.GetRequest(ids=["a4"])).items[0].HasField("embedding")
    # overwrite a0 by vector without a label: label kept, metadata and embedding replaced
    vector = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    ack, = upsert(stub, [pb.Item(id="a0", embedding=pb.Vector(values=vector.tolist()), metadata={"uri": "new"})])
    assert (ack.upserted, ack.failed) == (1, 0)
    item = stub.Get(pb.GetRequest(ids=["a0"], include_embedding=True)).items[0]
    assert (item.label, dict(item.metadata)) == ("cat", {"uri": "new"})
    np.testing.assert_allclose(item.embedding.values, vector / np.linalg.norm(vector), atol=1e-6)
    assert stub.Info(pb.InfoRequest()).item_count == 12
    top = stub.Search(pb.SearchRequest(query=pb.Query(vector=pb.Vector(values=vector.tolist())), k=1)).neighbors[0]
    assert top.id == "a0" and math.isclose(top.score, 1.0, abs_tol=1e-5)
    ack, = upsert(stub, [pb.Item(id="a0", image=corpus["a0"], metadata={"uri": "u/a0"})])
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
    stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="a10", label="fish", confidence=0.5)],
                                       source=pb.PREDICTED))
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


def test_label_corpus(stub, corpus) -> None:
    proposals = list(stub.LabelCorpus(pb.LabelCorpusRequest(k=4, tau=0.07)))
    assert [p.id for p in proposals] == ["a10", "a11", "a8", "a9"]  # every unlabelled item, by id
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
    ack, = upsert(stub, [pb.Item(id="gone", image=png_bytes(999), label="cat")])
    assert ack.upserted == 1
    assert stub.Delete(pb.DeleteRequest(ids=["gone"])).deleted == 1
    expect(Code.NOT_FOUND, stub.Get, pb.GetRequest(ids=["gone"]), match="gone")
    assert "gone" not in all_ids(stub)
    assert stub.Info(pb.InfoRequest()).labelled_count == 8
    assert stub.Delete(pb.DeleteRequest(ids=["gone"], ignore_missing=True)).deleted == 0
    assert stub.Get(pb.GetRequest(ids=["gone", "a1"], ignore_missing=True)).items[0].id == "a1"


def _png_truncated() -> bytes:
    data = png_bytes(7)
    return data[: len(data) // 2]


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")  # 10,000 px > --max-image-pixels 4096
    return buf.getvalue()


def test_bad_inputs_leave_store_unchanged(stub, corpus, server: ServerProcess) -> None:
    before_metrics = scrape(server)
    before = state(stub)
    q = lambda **kw: pb.Query(**kw)  # noqa: E731
    vec = lambda values: pb.Query(vector=pb.Vector(values=values))  # noqa: E731
    good = np.ones(512).tolist()
    # images
    expect(Code.INVALID_ARGUMENT, stub.Embed, pb.EmbedRequest(images=[b"not an image"]), match="image 0")
    expect(Code.INVALID_ARGUMENT, stub.Embed, pb.EmbedRequest(images=[png_bytes(1), _png_truncated()]),
           match="image 1")
    expect(Code.INVALID_ARGUMENT, stub.Embed, pb.EmbedRequest(images=[b""]), match="empty")
    expect(Code.RESOURCE_EXHAUSTED, stub.Embed, pb.EmbedRequest(images=[_bomb()]), match="exceeds the limit")
    expect(Code.INVALID_ARGUMENT, stub.Embed, pb.EmbedRequest(), match="no images")
    # queries and k
    expect(Code.INVALID_ARGUMENT, stub.Search, pb.SearchRequest(query=vec([0.1] * 511)), match="dimension 511")
    expect(Code.INVALID_ARGUMENT, stub.Search, pb.SearchRequest(query=vec([math.nan] + good[1:])), match="NaN")
    expect(Code.INVALID_ARGUMENT, stub.Search, pb.SearchRequest(query=vec([0.0] * 512)), match="zeros")
    expect(Code.INVALID_ARGUMENT, stub.Search, pb.SearchRequest(query=q()), match="empty query")
    expect(Code.INVALID_ARGUMENT, stub.Search, pb.SearchRequest(query=vec(good), k=0), match="k must be positive")
    expect(Code.INVALID_ARGUMENT, stub.Classify, pb.ClassifyRequest(query=vec(good), k=-3), match="k must be")
    expect(Code.OUT_OF_RANGE, stub.Search, pb.SearchRequest(query=vec(good), k=MAX_K + 1), match="max_k")
    expect(Code.OUT_OF_RANGE, stub.Classify, pb.ClassifyRequest(query=vec(good), k=MAX_K + 1), match="max_k")
    expect(Code.INVALID_ARGUMENT, stub.Classify, pb.ClassifyRequest(query=vec(good), tau=0.0), match="tau")
    expect(Code.INVALID_ARGUMENT, stub.Classify, pb.ClassifyRequest(query=q(image=b"\x89PNG")), match="query image")
    expect(Code.RESOURCE_EXHAUSTED, stub.Search, pb.SearchRequest(query=q(image=_bomb())), match="pixels")
    expect(Code.NOT_FOUND, stub.Search, pb.SearchRequest(query=q(id="nope")), match="nope")
    expect(Code.NOT_FOUND, stub.Classify, pb.ClassifyRequest(query=q(id="nope")), match="nope")
    expect(Code.INVALID_ARGUMENT, stub.LabelCorpus, pb.LabelCorpusRequest(k=0), match="k must be")
    # unknown ids: all-or-nothing
    expect(Code.NOT_FOUND, stub.Get, pb.GetRequest(ids=["a1", "nope"]), match="nope")
    expect(Code.NOT_FOUND, stub.Delete, pb.DeleteRequest(ids=["a1", "nope"]), match="nothing deleted")
    expect(Code.NOT_FOUND, stub.SetLabels,
           pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="a1", label="x"),
                                            pb.LabelAssignment(id="nope", label="x")]), match="nope")
    expect(Code.INVALID_ARGUMENT, stub.SetLabels,
           pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="a1", label="x")] * 2), match="twice")
    # limits: message size and queue
    expect(Code.RESOURCE_EXHAUSTED, stub.Embed, pb.EmbedRequest(images=[b"\0" * (1024 * 1024 + 10)]))
    expect(Code.RESOURCE_EXHAUSTED, stub.Embed, pb.EmbedRequest(images=[png_bytes(i) for i in range(MAX_QUEUE + 1)]),
           match="queue full")
    # a deadline that already passed: not run
    forwards = metric(scrape(server), "retrieval_batch_size_count")
    expect(Code.DEADLINE_EXCEEDED, stub.Embed, pb.EmbedRequest(images=[png_bytes(3)]), timeout=1e-6)
    assert metric(scrape(server), "retrieval_batch_size_count") == forwards
    # bad upsert items fail alone; nothing of them is stored
    bad_items = [pb.Item(id="", image=png_bytes(1)), pb.Item(id="x" * 513, image=png_bytes(1)),
                 pb.Item(id="b-none"), pb.Item(id="b-dim", embedding=pb.Vector(values=[1.0] * 3)),
                 pb.Item(id="b-nan", embedding=pb.Vector(values=[math.inf] * 512)),
                 pb.Item(id="b-img", image=b"garbage"), pb.Item(id="b-bomb", image=_bomb()),
                 pb.Item(id="b-trunc", image=_png_truncated())]
    ack, = upsert(stub, bad_items)
    assert (ack.upserted, ack.failed) == (0, len(bad_items))
    codes = [(e.index, Code.INVALID_ARGUMENT.value[0] if e.code == 3 else e.code) for e in ack.errors]
    assert [i for i, _ in codes] == list(range(len(bad_items)))
    assert ack.errors[6].code == Code.RESOURCE_EXHAUSTED.value[0]
    assert all(e.code == Code.INVALID_ARGUMENT.value[0] for e in ack.errors if e.index != 6)
    assert state(stub) == before
    dup, = upsert(stub, [pb.Item(id="dup", image=png_bytes(5))] * 2)  # the first one goes in, not the second
    assert (dup.upserted, dup.failed, dup.errors[0].index) == (1, 1, 1) and "duplicate" in dup.errors[0].message
    assert stub.Delete(pb.DeleteRequest(ids=["dup"])).deleted == 1
    # more images than queue slots: those items fail with RESOURCE_EXHAUSTED, the vector item goes in
    crowd = [pb.Item(id=f"q{i}", image=png_bytes(i)) for i in range(MAX_QUEUE + 1)]
    full, = upsert(stub, crowd + [pb.Item(id="vec", embedding=pb.Vector(values=good))])
    assert (full.upserted, full.failed) == (1, MAX_QUEUE + 1)
    assert {e.code for e in full.errors} == {Code.RESOURCE_EXHAUSTED.value[0]} and "queue full" in full.errors[0].message
    assert stub.Delete(pb.DeleteRequest(ids=["vec"])).deleted == 1
    assert state(stub) == before
    # the server keeps serving, and the errors were counted
    assert stub.Info(pb.InfoRequest()).item_count == before[0]
    after = scrape(server)
    assert metric(after, "grpc_server_handled_total", grpc_method="Embed", grpc_code="INVALID_ARGUMENT") >= 4 + \
        metric(before_metrics, "grpc_server_handled_total", grpc_method="Embed", grpc_code="INVALID_ARGUMENT")
    assert metric(after, "retrieval_queue_rejected_total") >= MAX_QUEUE + 1
    assert metric(after, "retrieval_image_decode_errors_total") > metric(before_metrics,
                                                                        "retrieval_image_decode_errors_total")


def test_classify_without_labels_is_failed_precondition(stub, corpus) -> None:
    labelled = [i for i in stub.Get(pb.GetRequest(ids=all_ids(stub))).items if i.label]
    stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=i.id) for i in labelled]))
    try:
        before = state(stub)
        expect(Code.FAILED_PRECONDITION, stub.Classify, pb.ClassifyRequest(query=pb.Query(id="a1")),
               match="no labelled items")
        expect(Code.FAILED_PRECONDITION, stub.LabelCorpus, pb.LabelCorpusRequest(apply=True), match="no labelled")
        assert state(stub) == before
    finally:
        stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=i.id, label=i.label) for i in labelled]))
    assert stub.Info(pb.InfoRequest()).labelled_count == len(labelled)


def test_metrics_move(stub, corpus, server: ServerProcess) -> None:
    before = scrape(server)
    stub.Search(pb.SearchRequest(query=pb.Query(id="a1"), k=3))
    stub.Classify(pb.ClassifyRequest(query=pb.Query(image=corpus["a2"]), k=3))
    list(stub.LabelCorpus(pb.LabelCorpusRequest(k=3)))
    upsert(stub, [pb.Item(id="m1", image=png_bytes(500))])
    after = scrape(server)
    moved = lambda name, **lab: metric(after, name, **lab) - metric(before, name, **lab)  # noqa: E731
    assert moved("grpc_server_started_total", grpc_method="Search", grpc_type="unary") == 1
    assert moved("grpc_server_handled_total", grpc_method="Search", grpc_code="OK",
                 grpc_service="retrieval.v1.Retrieval") == 1
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
    assert metric(after, "retrieval_model_info", arch="resnet18", fingerprint=info.model_fingerprint, dim="512",
                  model_device="cpu", index_device="cpu", index_type="Flat") == 1
    assert metric(after, "retrieval_build_info", version=info.server_version) == 1
    assert metric(after, "process_resident_memory_bytes") > 0
