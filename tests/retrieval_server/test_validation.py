"""Every bad input of every RPC, one parametrised case each, against the server in this process: the
production wiring (GrpcServer: interceptors, message limits, health) with the real encoder, store,
FAISS index and batcher, called over gRPC on 127.0.0.1. Each case checks its status code and
message, and that nothing stored changed. (The child-process tests cover the wire protocol,
durability and signals.)"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.labels import MAX_LABEL_CHARS
from retrieval_server.config import ServerConfig
from tests.retrieval_server.calls import (
    LIMITS,
    MAX_K,
    MAX_QUEUE,
    InProcess,
    bomb,
    expect,
    load_corpus,
    metric,
    png_truncated,
    state,
    upsert,
)
from tests.server_harness import BACKENDS, backend_options, make_export, png_bytes

Code = grpc.StatusCode
GOOD = np.ones(512).tolist()


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(f"validation-{request.param}")
    options = backend_options(request.param, root)
    server = InProcess(
        ServerConfig(model=make_export(root), store=root / "store", port=0, metrics_port=0, **LIMITS, **options)
    )
    load_corpus(server.stub)
    yield server
    server.close()


def vec(values: list[float]) -> pb.Query:
    return pb.Query(vector=pb.Vector(values=values))


def assignments(*pairs: tuple[str, str]) -> list[pb.LabelAssignment]:
    return [pb.LabelAssignment(id=i, label=label) for i, label in pairs]


# (rpc, request, status, words of the message)
CASES: dict[str, tuple[str, Callable[[], object], grpc.StatusCode, str]] = {
    # images
    "embed-not-an-image": (
        "Embed",
        lambda: pb.EmbedRequest(images=[b"not an image"]),
        Code.INVALID_ARGUMENT,
        "image 0",
    ),
    "embed-truncated": (
        "Embed",
        lambda: pb.EmbedRequest(images=[png_bytes(1), png_truncated()]),
        Code.INVALID_ARGUMENT,
        "image 1",
    ),
    "embed-empty-bytes": ("Embed", lambda: pb.EmbedRequest(images=[b""]), Code.INVALID_ARGUMENT, "empty"),
    "embed-bomb": ("Embed", lambda: pb.EmbedRequest(images=[bomb()]), Code.RESOURCE_EXHAUSTED, "exceeds the limit"),
    "embed-no-images": ("Embed", lambda: pb.EmbedRequest(), Code.INVALID_ARGUMENT, "no images"),
    "embed-message-too-large": (
        "Embed",
        lambda: pb.EmbedRequest(images=[b"\0" * (1024 * 1024 + 10)]),
        Code.RESOURCE_EXHAUSTED,
        "",
    ),
    "embed-queue-full": (
        "Embed",
        lambda: pb.EmbedRequest(images=[png_bytes(i) for i in range(MAX_QUEUE + 1)]),
        Code.RESOURCE_EXHAUSTED,
        "queue full",
    ),
    # queries, k and tau
    "search-wrong-dimension": (
        "Search",
        lambda: pb.SearchRequest(query=vec([0.1] * 511)),
        Code.INVALID_ARGUMENT,
        "dimension 511",
    ),
    "search-nan": ("Search", lambda: pb.SearchRequest(query=vec([math.nan] + GOOD[1:])), Code.INVALID_ARGUMENT, "NaN"),
    "search-zeros": ("Search", lambda: pb.SearchRequest(query=vec([0.0] * 512)), Code.INVALID_ARGUMENT, "zeros"),
    "search-empty-query": ("Search", lambda: pb.SearchRequest(query=pb.Query()), Code.INVALID_ARGUMENT, "empty query"),
    "search-k-zero": (
        "Search",
        lambda: pb.SearchRequest(query=vec(GOOD), k=0),
        Code.INVALID_ARGUMENT,
        "k must be positive",
    ),
    "search-k-above-max": (
        "Search",
        lambda: pb.SearchRequest(query=vec(GOOD), k=MAX_K + 1),
        Code.OUT_OF_RANGE,
        "max_k",
    ),
    "search-nan-min-score": (
        "Search",
        lambda: pb.SearchRequest(query=vec(GOOD), min_score=math.nan),
        Code.INVALID_ARGUMENT,
        "min_score",
    ),
    "search-bomb": (
        "Search",
        lambda: pb.SearchRequest(query=pb.Query(image=bomb())),
        Code.RESOURCE_EXHAUSTED,
        "pixels",
    ),
    "search-unknown-id": ("Search", lambda: pb.SearchRequest(query=pb.Query(id="nope")), Code.NOT_FOUND, "nope"),
    "classify-k-negative": (
        "Classify",
        lambda: pb.ClassifyRequest(query=vec(GOOD), k=-3),
        Code.INVALID_ARGUMENT,
        "k must be",
    ),
    "classify-k-above-max": (
        "Classify",
        lambda: pb.ClassifyRequest(query=vec(GOOD), k=MAX_K + 1),
        Code.OUT_OF_RANGE,
        "max_k",
    ),
    "classify-tau-zero": (
        "Classify",
        lambda: pb.ClassifyRequest(query=vec(GOOD), tau=0.0),
        Code.INVALID_ARGUMENT,
        "tau",
    ),
    "classify-bad-image": (
        "Classify",
        lambda: pb.ClassifyRequest(query=pb.Query(image=b"\x89PNG")),
        Code.INVALID_ARGUMENT,
        "query image",
    ),
    "classify-negative-neighbors": (
        "Classify",
        lambda: pb.ClassifyRequest(query=vec(GOOD), neighbors=-1),
        Code.INVALID_ARGUMENT,
        "neighbors",
    ),
    "search-values-and-data": (
        "Search",
        lambda: pb.SearchRequest(query=pb.Query(vector=pb.Vector(values=GOOD, data=b"\0" * 2048))),
        Code.INVALID_ARGUMENT,
        "both values and data",
    ),
    "search-data-not-float32": (
        "Search",
        lambda: pb.SearchRequest(query=pb.Query(vector=pb.Vector(data=b"\0" * 2047))),
        Code.INVALID_ARGUMENT,
        "not float32",
    ),
    "search-data-wrong-dimension": (
        "Search",
        lambda: pb.SearchRequest(query=pb.Query(vector=pb.Vector(data=b"\0" * 1024))),
        Code.INVALID_ARGUMENT,
        "dimension 256",
    ),
    "classify-unknown-id": ("Classify", lambda: pb.ClassifyRequest(query=pb.Query(id="nope")), Code.NOT_FOUND, "nope"),
    "label-corpus-k-zero": ("LabelCorpus", lambda: pb.LabelCorpusRequest(k=0), Code.INVALID_ARGUMENT, "k must be"),
    "label-corpus-nan-tau": ("LabelCorpus", lambda: pb.LabelCorpusRequest(tau=math.nan), Code.INVALID_ARGUMENT, "tau"),
    # unknown ids: all or nothing
    "get-unknown-id": ("Get", lambda: pb.GetRequest(ids=["a1", "nope"]), Code.NOT_FOUND, "nope"),
    "delete-unknown-id": ("Delete", lambda: pb.DeleteRequest(ids=["a1", "nope"]), Code.NOT_FOUND, "nothing deleted"),
    "set-labels-unknown-id": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a1", "x"), ("nope", "x"))),
        Code.NOT_FOUND,
        "nope",
    ),
    "set-labels-id-twice": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a1", "x"), ("a1", "y"))),
        Code.INVALID_ARGUMENT,
        "twice",
    ),
    # the label rule (moco_retrieval.labels): refused, not trimmed; all or nothing
    "set-labels-untrimmed": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a8", "bird"), ("a9", " cat"))),
        Code.INVALID_ARGUMENT,
        "label of 'a9': a label must not start or end with whitespace",
    ),
    "set-labels-whitespace-only": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a9", "   "))),
        Code.INVALID_ARGUMENT,
        "whitespace",
    ),
    "set-labels-nul": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a9", "c\0at"))),
        Code.INVALID_ARGUMENT,
        "control character (U+0000 at position 1)",
    ),
    "set-labels-newline": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a9", "cat\ndog"))),
        Code.INVALID_ARGUMENT,
        "control character",
    ),
    "set-labels-line-separator": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a9", "cat\u2028dog"))),
        Code.INVALID_ARGUMENT,
        "line separator",
    ),
    "set-labels-too-long": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(assignments=assignments(("a9", "x" * (MAX_LABEL_CHARS + 1)))),
        Code.INVALID_ARGUMENT,
        f"at most {MAX_LABEL_CHARS} characters, got {MAX_LABEL_CHARS + 1}",
    ),
    "set-labels-predicted-with-control": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(
            assignments=[pb.LabelAssignment(id="a9", label="cat\x7f", confidence=0.5)], source=pb.PREDICTED
        ),
        Code.INVALID_ARGUMENT,
        "control character",
    ),
    "set-labels-nan-confidence": (
        "SetLabels",
        lambda: pb.SetLabelsRequest(
            assignments=[pb.LabelAssignment(id="a1", label="x", confidence=math.nan)], source=pb.PREDICTED
        ),
        Code.INVALID_ARGUMENT,
        "confidence",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_request_gets_its_status_and_changes_nothing(served: InProcess, case: str) -> None:
    rpc, request, code, words = CASES[case]
    before = state(served.stub)
    expect(code, getattr(served.stub, rpc), request(), match=words)
    assert state(served.stub) == before


# Upsert items that fail alone, with the status of each (the stream goes on).
BAD_ITEMS: dict[str, tuple[Callable[[], pb.Item], grpc.StatusCode, str]] = {
    "empty-id": (lambda: pb.Item(id="", image=png_bytes(1)), Code.INVALID_ARGUMENT, "id must be"),
    "long-id": (lambda: pb.Item(id="x" * 513, image=png_bytes(1)), Code.INVALID_ARGUMENT, "id must be"),
    "no-content": (lambda: pb.Item(id="b-none"), Code.INVALID_ARGUMENT, "neither image nor embedding"),
    "wrong-dimension": (
        lambda: pb.Item(id="b-dim", embedding=pb.Vector(values=[1.0] * 3)),
        Code.INVALID_ARGUMENT,
        "dimension 3",
    ),
    "infinite": (
        lambda: pb.Item(id="b-inf", embedding=pb.Vector(values=[math.inf] * 512)),
        Code.INVALID_ARGUMENT,
        "NaN or Inf",
    ),
    "not-an-image": (lambda: pb.Item(id="b-img", image=b"garbage"), Code.INVALID_ARGUMENT, ""),
    "bomb": (lambda: pb.Item(id="b-bomb", image=bomb()), Code.RESOURCE_EXHAUSTED, "exceeds the limit"),
    "truncated": (lambda: pb.Item(id="b-trunc", image=png_truncated()), Code.INVALID_ARGUMENT, ""),
    "untrimmed-label": (
        lambda: pb.Item(id="b-lab", embedding=pb.Vector(values=GOOD), label="cat "),
        Code.INVALID_ARGUMENT,
        "label of 'b-lab': a label must not start or end with whitespace",
    ),
    "label-with-nul": (
        lambda: pb.Item(id="b-lab", embedding=pb.Vector(values=GOOD), label="\0"),
        Code.INVALID_ARGUMENT,
        "control character",
    ),
    "long-label": (
        lambda: pb.Item(id="b-lab", embedding=pb.Vector(values=GOOD), label="é" * (MAX_LABEL_CHARS + 1)),
        Code.INVALID_ARGUMENT,
        f"at most {MAX_LABEL_CHARS} characters",
    ),
    "bidi-label": (  # shows as "catone": right-to-left override
        lambda: pb.Item(id="b-lab", embedding=pb.Vector(values=GOOD), label="cat\u202eeno"),
        Code.INVALID_ARGUMENT,
        "invisible format character (a bidi control or zero-width character) (U+202E at position 3)",
    ),
    "zero-width-label": (
        lambda: pb.Item(id="b-lab", embedding=pb.Vector(values=GOOD), label="ca\u200bt"),
        Code.INVALID_ARGUMENT,
        "U+200B at position 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_a_bad_upsert_item_fails_alone(served: InProcess, case: str) -> None:
    item, code, words = BAD_ITEMS[case]
    before = state(served.stub)
    good = pb.Item(id="fine", embedding=pb.Vector(values=GOOD))
    (ack,) = upsert(served.stub, [item(), good])
    assert (ack.upserted, ack.failed, ack.errors[0].index) == (1, 1, 0)
    assert ack.errors[0].code == code.value[0] and words.lower() in ack.errors[0].message.lower()
    assert served.stub.Delete(pb.DeleteRequest(ids=["fine"])).deleted == 1
    assert state(served.stub) == before


@pytest.mark.parametrize(
    "label", ["x" * MAX_LABEL_CHARS, "chat noir", "é" * MAX_LABEL_CHARS, "🐈 cat", "👨\u200d👩\u200d👧"]
)
def test_a_label_that_follows_the_rule_is_stored_as_sent(served: InProcess, label: str) -> None:
    """At the length limit (code points, not bytes), inner spaces, any printable Unicode (an emoji, an
    emoji sequence with zero-width joiners): stored exactly, by SetLabels and by Upsert."""
    assert served.stub.SetLabels(pb.SetLabelsRequest(assignments=assignments(("a9", label)))).updated == 1
    (ack,) = upsert(served.stub, [pb.Item(id="lab", embedding=pb.Vector(values=GOOD), label=label)])
    assert (ack.upserted, ack.failed) == (1, 0)
    items = served.stub.Get(pb.GetRequest(ids=["a9", "lab"])).items
    assert [i.label for i in items] == [label, label]
    served.stub.SetLabels(pb.SetLabelsRequest(assignments=assignments(("a9", ""))))
    assert served.stub.Delete(pb.DeleteRequest(ids=["lab"])).deleted == 1


def test_a_duplicate_id_in_one_batch_fails_the_second(served: InProcess) -> None:
    before = state(served.stub)
    (dup,) = upsert(served.stub, [pb.Item(id="dup", image=png_bytes(5))] * 2)
    assert (dup.upserted, dup.failed, dup.errors[0].index) == (1, 1, 1) and "duplicate" in dup.errors[0].message
    assert served.stub.Delete(pb.DeleteRequest(ids=["dup"])).deleted == 1
    assert state(served.stub) == before


def test_upsert_images_beyond_the_queue_fail_alone(served: InProcess) -> None:
    """More images than queue slots: those items fail with RESOURCE_EXHAUSTED, the vector item goes in."""
    before = state(served.stub)
    crowd = [pb.Item(id=f"q{i}", image=png_bytes(i)) for i in range(MAX_QUEUE + 1)]
    (full,) = upsert(served.stub, crowd + [pb.Item(id="vec", embedding=pb.Vector(values=GOOD))])
    assert (full.upserted, full.failed) == (1, MAX_QUEUE + 1)
    assert {e.code for e in full.errors} == {Code.RESOURCE_EXHAUSTED.value[0]}
    assert "queue full" in full.errors[0].message
    assert served.stub.Delete(pb.DeleteRequest(ids=["vec"])).deleted == 1
    assert state(served.stub) == before


def test_a_passed_deadline_is_not_run(served: InProcess) -> None:
    forwards = metric(served.scrape(), "retrieval_batch_size_count")
    expect(Code.DEADLINE_EXCEEDED, served.stub.Embed, pb.EmbedRequest(images=[png_bytes(3)]), timeout=1e-6)
    assert metric(served.scrape(), "retrieval_batch_size_count") == forwards


def test_failed_calls_are_counted_and_the_server_keeps_serving(served: InProcess) -> None:
    before = served.scrape()
    for request in (pb.EmbedRequest(images=[b"junk"]), pb.EmbedRequest(images=[bomb()])):
        with pytest.raises(grpc.RpcError):
            served.stub.Embed(request)
    after = served.scrape()
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
        handled = {"grpc_method": "Embed", "grpc_code": code}
        assert (
            metric(after, "grpc_server_handled_total", **handled)
            == metric(before, "grpc_server_handled_total", **handled) + 1
        )
    assert metric(after, "retrieval_image_decode_errors_total") > metric(before, "retrieval_image_decode_errors_total")
    assert served.stub.Info(pb.InfoRequest()).item_count == 12


@pytest.mark.parametrize("rpc", ["Upsert", "Delete", "SetLabels", "LabelCorpus"])
def test_writes_to_a_store_that_cannot_be_written_get_failed_precondition(served: InProcess, rpc: str) -> None:
    """SQLite refuses the write (SQLITE_READONLY: here its query_only switch on the server's write
    connection, as a read-only database or filesystem would; a filesystem cannot be remounted
    read-only under files open for writing, see test_storage.py for a read-only directory at start)."""
    requests = {
        "Upsert": lambda: iter([pb.UpsertRequest(items=[pb.Item(id="new", embedding=pb.Vector(values=GOOD))])]),
        "Delete": lambda: pb.DeleteRequest(ids=["a1"]),
        "SetLabels": lambda: pb.SetLabelsRequest(assignments=assignments(("a9", "cat"))),
        "LabelCorpus": lambda: pb.LabelCorpusRequest(apply=True),
    }
    if served.service.backend.kind != "embedded":
        pytest.skip("SQLite's query_only switch exists in the embedded backend only")
    before = state(served.stub)
    writer = served.service.backend.store._writer
    writer.execute("PRAGMA query_only = ON")
    try:
        err = expect(Code.FAILED_PRECONDITION, getattr(served.stub, rpc), requests[rpc](), match="cannot be written")
        assert str(served.service.backend.store.directory) in err.details()
        assert state(served.stub) == before  # reads go on, nothing changed
    finally:
        writer.execute("PRAGMA query_only = OFF")
    list(served.stub.LabelCorpus(pb.LabelCorpusRequest(apply=False)))  # and it serves on
