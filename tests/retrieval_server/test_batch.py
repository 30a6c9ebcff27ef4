"""SearchBatch and ClassifyBatch, on both backends: each result equals what Search or Classify
answers for that query alone, whatever the mix of image, id and vector queries; a bad query fails
the whole call naming its index; the query count is bounded by Info.max_queries. And Search's
metadata filter spelled with the characters a filter expression could misread: matched exactly,
or refused with INVALID_ARGUMENT (control characters), never UNAVAILABLE."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from retrieval_server.config import ServerConfig
from tests.retrieval_server.calls import InProcess, expect, load_corpus, upsert
from tests.server_harness import BACKENDS, backend_options, make_export, png_bytes

DIM = 512


# Keys and values a filter expression could misread: quotes, backslashes, JSON-path syntax, an
# attempt to close the literal and widen the filter.
TRICKY = [
    ('say "hi"', "1"),
    ("back\\slash", "2"),
    ("a.b", "3"),
    ('a["b"]', "4"),
    ("$[0]", "5"),
    ("k", 'x" or id != "'),
    ("k", "x\\"),
    ("ünï", "ça'va"),
]


@pytest.fixture(scope="module", params=BACKENDS)
def corpus(request, tmp_path_factory):
    """(stub, images): the 12-item corpus of calls.load_corpus, plus an item t<i> with each TRICKY
    metadata entry and one plain item, served once per backend for the whole module (the tests
    only read)."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = ServerConfig(
        model=make_export(root),
        store=root / "store",
        port=0,
        metrics_port=0,
        coalesce="all",  # Search's coalescer too (the default coalesces Classify only)
        **backend_options(request.param, root),
    )
    server = InProcess(cfg)
    images = load_corpus(server.stub)
    rng = np.random.default_rng(5)
    items = [
        pb.Item(id=f"t{i}", embedding=pb.Vector(data=rng.standard_normal(DIM).astype("<f4").tobytes()), metadata={k: v})
        for i, (k, v) in enumerate(TRICKY)
    ]
    items.append(pb.Item(id="plain", embedding=vector_query(9).vector, metadata={"k": "x", "a": "b"}))
    upsert(server.stub, items)
    yield server.stub, images
    server.close()


def vector_query(seed: int) -> pb.Query:
    return pb.Query(vector=pb.Vector(data=np.random.default_rng(seed).standard_normal(DIM).astype("<f4").tobytes()))


def mixed_queries(images: dict[str, bytes]) -> list[pb.Query]:
    """Vectors, stored ids (which leave themselves out) and images, interleaved."""
    return [
        vector_query(1),
        pb.Query(id="a2"),
        pb.Query(image=images["a9"]),
        pb.Query(id="a6"),
        vector_query(2),
        pb.Query(image=png_bytes(40)),  # not stored
        pb.Query(id="a11"),
    ]


def test_search_batch_equals_one_search_per_query(corpus):
    stub, images = corpus
    queries = mixed_queries(images)
    for options in (
        {},
        {"k": 5},
        {"k": 4, "labels": ["dog"]},
        {"k": 12, "min_score": 0.2},
        {"metadata": {"uri": "u/a3"}},
    ):
        batch = stub.SearchBatch(pb.SearchBatchRequest(queries=queries, **options)).results
        alone = [stub.Search(pb.SearchRequest(query=q, **options)) for q in queries]
        assert len(batch) == len(queries)
        for got, want in zip(batch, alone):
            assert [(n.id, n.label, dict(n.metadata)) for n in got.neighbors] == [
                (n.id, n.label, dict(n.metadata)) for n in want.neighbors
            ], options
            np.testing.assert_allclose([n.score for n in got.neighbors], [n.score for n in want.neighbors], atol=1e-5)
    by_id = stub.SearchBatch(pb.SearchBatchRequest(queries=[pb.Query(id="a2")], k=11)).results[0]
    assert "a2" not in [n.id for n in by_id.neighbors] and len(by_id.neighbors) == 11


def test_classify_batch_equals_one_classify_per_query(corpus):
    stub, images = corpus
    queries = mixed_queries(images)
    for options in ({}, {"k": 3, "tau": 0.5}, {"neighbors": 0}, {"k": 6, "neighbors": 2}):
        batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(queries=queries, **options)).results
        alone = [stub.Classify(pb.ClassifyRequest(query=q, **options)) for q in queries]
        assert len(batch) == len(queries)
        for got, want in zip(batch, alone):
            assert got.label == want.label and [s.label for s in got.scores] == [s.label for s in want.scores]
            assert got.confidence == pytest.approx(want.confidence, abs=1e-5)
            assert [n.id for n in got.neighbors] == [n.id for n in want.neighbors], options
    # a stored labelled item does not vote for itself, in a batch as alone
    cat = stub.ClassifyBatch(pb.ClassifyBatchRequest(queries=[pb.Query(id="a0"), vector_query(3)], k=3)).results[0]
    assert "a0" not in [n.id for n in cat.neighbors] and len(cat.neighbors) == 3


def test_a_bad_query_fails_the_whole_call_naming_its_index(corpus):
    stub, _ = corpus
    for call, request in ((stub.SearchBatch, pb.SearchBatchRequest), (stub.ClassifyBatch, pb.ClassifyBatchRequest)):
        check_bad_queries(call, request)


def check_bad_queries(call, request) -> None:
    short = pb.Query(vector=pb.Vector(values=[1.0, 2.0]))
    expect(grpc.StatusCode.INVALID_ARGUMENT, call, request(queries=[]), match="no queries")
    expect(grpc.StatusCode.INVALID_ARGUMENT, call, request(queries=[vector_query(1), short]), match="queries[1]: ")
    expect(grpc.StatusCode.INVALID_ARGUMENT, call, request(queries=[vector_query(1), pb.Query()]), match="queries[1]")
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        call,
        request(queries=[pb.Query(id="a1"), vector_query(2), pb.Query(image=b"not an image")]),
        match="queries[2]: query image",
    )
    expect(
        grpc.StatusCode.NOT_FOUND, call, request(queries=[pb.Query(id="a1"), pb.Query(id="nope")]), match="queries[1]"
    )
    expect(grpc.StatusCode.OUT_OF_RANGE, call, request(queries=[vector_query(1)], k=10_000), match="max_k")


def test_more_queries_than_max_queries_is_out_of_range(corpus):
    stub, _ = corpus
    limit = stub.Info(pb.InfoRequest()).max_queries
    assert limit > 0
    vectors = np.random.default_rng(0).standard_normal((limit + 1, DIM)).astype("<f4")
    queries = [pb.Query(vector=pb.Vector(data=v.tobytes())) for v in vectors]
    assert len(stub.SearchBatch(pb.SearchBatchRequest(queries=queries[:limit], k=1)).results) == limit
    expect(grpc.StatusCode.OUT_OF_RANGE, stub.SearchBatch, pb.SearchBatchRequest(queries=queries), match="max_queries")
    expect(
        grpc.StatusCode.OUT_OF_RANGE, stub.ClassifyBatch, pb.ClassifyBatchRequest(queries=queries), match="max_queries"
    )


def test_metadata_filters_match_tricky_keys_and_values_exactly(corpus):
    stub, _ = corpus
    for i, (key, value) in enumerate(TRICKY):
        found = stub.Search(pb.SearchRequest(query=vector_query(1), k=20, metadata={key: value})).neighbors
        assert [n.id for n in found] == [f"t{i}"], (key, value)


def test_filters_with_a_control_character_or_a_label_no_item_can_have_are_invalid_argument(corpus):
    stub, _ = corpus
    for where in ({"k\x00": "v"}, {"k": "v\x00"}, {"k": "line\nbreak"}, {"\x1f": "v"}):
        for call, request in (
            (stub.Search, pb.SearchRequest(query=vector_query(1), metadata=where)),
            (stub.SearchBatch, pb.SearchBatchRequest(queries=[vector_query(1)], metadata=where)),
        ):
            expect(grpc.StatusCode.INVALID_ARGUMENT, call, request, match="control character")
    for bad in ("cat\x00", " cat", ""):
        request = pb.SearchRequest(query=vector_query(1), labels=[bad])
        expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Search, request, match="labels filter")
    assert {n.label for n in stub.Search(pb.SearchRequest(query=vector_query(1), labels=["cat"])).neighbors} == {"cat"}


def test_concurrent_single_queries_answer_as_their_batch_does(corpus):
    """Searches and votes of 8 threads at once (coalesced into shared index calls by the server)
    each get their own query's answer: the one SearchBatch / ClassifyBatch gives for it."""
    stub, images = corpus
    queries = [vector_query(100 + i) for i in range(24)] + [pb.Query(id=f"a{i}") for i in range(12)]
    searched = stub.SearchBatch(pb.SearchBatchRequest(queries=queries, k=5)).results
    voted = stub.ClassifyBatch(pb.ClassifyBatchRequest(queries=queries, k=4, neighbors=2)).results

    def one(i: int) -> tuple[list[str], str, list[str]]:
        found = stub.Search(pb.SearchRequest(query=queries[i], k=5)).neighbors
        vote = stub.Classify(pb.ClassifyRequest(query=queries[i], k=4, neighbors=2))
        return [n.id for n in found], vote.label, [n.id for n in vote.neighbors]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, list(range(len(queries))) * 3))
    for i, (ids, label, voters) in enumerate(answers):
        q = i % len(queries)
        assert ids == [n.id for n in searched[q].neighbors], q
        assert (label, voters) == (voted[q].label, [n.id for n in voted[q].neighbors]), q
