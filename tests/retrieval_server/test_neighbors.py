"""Neighbours built from encoded items (retrieval_server/neighbors.py) equal the messages built field
by field, and what Search and Classify return follows every write on both backends, even with the
embedded backend's in-memory encodings warm, and with writes racing the reads."""

from __future__ import annotations

import threading

import numpy as np

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from retrieval_server.neighbors import encode_item, neighbor, neighbors_wire
from retrieval_server.store import Row
from tests.retrieval_server.calls import upsert

DIM = 512


def test_wire_bytes_parse_into_the_messages_built_field_by_field():
    rows = [
        Row(1, "a", "cat", None, None, {}),
        Row(2, "b/ü", None, "dog", 0.7, {"uri": "file:///x/b.jpg", "k": 'q"\\'}),
        Row(3, "c" * 300, "x" * 200, None, None, {f"k{i}": "v" * i for i in range(20)}),  # multi-byte lengths
    ]
    scores = [0.999, -0.25, 0.0]
    for message in (pb.SearchResponse, pb.ClassifyResponse):
        parsed = message.FromString(neighbors_wire(message, [encode_item(r) for r in rows], scores))
        expected = message(neighbors=[neighbor(r, s) for r, s in zip(rows, scores)])
        assert parsed == expected


def vector(seed: int) -> pb.Vector:
    return pb.Vector(data=np.random.default_rng(seed).standard_normal(DIM).astype("<f4").tobytes())


def found(stub, k: int = 30) -> dict[str, tuple[str, str, dict]]:
    """id -> (label, predicted label, metadata) of a Search and of a Classify's neighbours."""
    out = {}
    for n in stub.Search(pb.SearchRequest(query=pb.Query(vector=vector(0)), k=k)).neighbors:
        out[n.id] = (n.label, n.predicted_label, dict(n.metadata))
    for n in stub.Classify(pb.ClassifyRequest(query=pb.Query(vector=vector(0)), k=k)).neighbors:
        assert out.get(n.id, (n.label, n.predicted_label, dict(n.metadata))) == (
            n.label,
            n.predicted_label,
            dict(n.metadata),
        )
    return out


def test_results_follow_every_kind_of_write(served):
    stub = served.stub
    upsert(stub, [pb.Item(id=f"i{i}", embedding=vector(i), label="cat" if i < 10 else "") for i in range(30)])
    assert found(stub)["i0"] == ("cat", "", {})  # warm
    stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="i0", label="dog")]))
    assert found(stub)["i0"] == ("dog", "", {})
    stub.SetLabels(
        pb.SetLabelsRequest(
            assignments=[pb.LabelAssignment(id="i20", label="cat", confidence=0.5)], source=pb.PREDICTED
        )
    )
    assert found(stub)["i20"] == ("", "cat", {})
    list(stub.LabelCorpus(pb.LabelCorpusRequest(k=3, apply=True)))  # predicted labels by row
    predicted = {p.id: p.label for p in stub.LabelCorpus(pb.LabelCorpusRequest(k=3))}
    assert found(stub)["i25"] == ("", predicted["i25"], {})
    upsert(stub, [pb.Item(id="i25", embedding=vector(25), metadata={"uri": "u/25"})])  # metadata changes
    assert found(stub)["i25"] == ("", predicted["i25"], {"uri": "u/25"})
    stub.Delete(pb.DeleteRequest(ids=["i5"]))
    assert "i5" not in found(stub)


def test_writes_racing_searches_leave_no_stale_neighbour(served):
    stub = served.stub
    ids = [f"r{i}" for i in range(20)]
    upsert(stub, [pb.Item(id=i, embedding=vector(100 + n), label="a") for n, i in enumerate(ids)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def search() -> None:
        while not stop.is_set():
            try:  # answers mid-race may hold either label: only the final state is checked
                stub.Search(pb.SearchRequest(query=pb.Query(vector=vector(0)), k=20))
                stub.Classify(pb.ClassifyRequest(query=pb.Query(vector=vector(0)), k=20))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    readers = [threading.Thread(target=search) for _ in range(4)]
    for t in readers:
        t.start()
    for round_ in range(30):
        label = "ab"[round_ % 2]
        stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=i, label=label) for i in ids]))
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert {i: v[0] for i, v in found(stub, k=20).items()} == dict.fromkeys(ids, "b")
