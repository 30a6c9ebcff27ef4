"""Suggest (which items to label next) and Duplicates (near-duplicate groups), on embeddings with a
known structure, in-process (tests/retrieval_server/calls.py): deterministic, and the contract's
statuses on bad input."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from tests.retrieval_server.calls import expect, upsert

DIM = 512
SIZES = {"a": 60, "b": 50, "c": 40, "d": 30, "e": 20, "f": 10}  # six clusters, largest first
Code = grpc.StatusCode


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


CENTRES = unit(np.random.default_rng(0).standard_normal((len(SIZES), DIM)))


def cluster_items() -> list[pb.Item]:
    """Tight clusters around six random (nearly orthogonal) directions; ids name the cluster."""
    rng = np.random.default_rng(1)
    items = []
    for (name, size), centre in zip(SIZES.items(), CENTRES):
        for i, v in enumerate(unit(centre + 0.15 * rng.standard_normal((size, DIM)) / np.sqrt(DIM) * 8)):
            items.append(pb.Item(id=f"{name}{i:03d}", embedding=pb.Vector(data=v.tobytes())))
    return items


def suggest(stub, n: int, seed: int = 0, **kw) -> pb.SuggestResponse:
    return stub.Suggest(pb.SuggestRequest(n=n, seed=seed, **kw))


def test_without_labels_one_typical_item_per_cluster_largest_first(served):
    upsert(served.stub, cluster_items())
    reply = suggest(served.stub, 6)
    assert [s.id[0] for s in reply.suggestions] == list("abcdef")
    assert all(s.reason == pb.Suggestion.TYPICAL for s in reply.suggestions)
    assert (reply.candidates, reply.clusters) == (210, 6)
    again = suggest(served.stub, 6)  # deterministic for a store and seed
    assert [s.id for s in again.suggestions] == [s.id for s in reply.suggestions]
    assert len(suggest(served.stub, 20).suggestions) == 20  # more than clusters: the next most typical


def test_with_labels_uncovered_clusters_first_then_uncertain_items(served):
    items = cluster_items()
    # Two items halfway between clusters a and b (their vote is split), and one outlier.
    between = [unit(CENTRES[0] + CENTRES[1] + 0.05 * g) for g in np.random.default_rng(2).standard_normal((2, DIM))]
    outlier = unit(np.random.default_rng(3).standard_normal(DIM))
    items += [pb.Item(id=f"mid{i}", embedding=pb.Vector(data=v.tobytes())) for i, v in enumerate(between)]
    items.append(pb.Item(id="outlier", embedding=pb.Vector(data=outlier.tobytes())))
    upsert(served.stub, items)
    served.stub.SetLabels(
        pb.SetLabelsRequest(
            assignments=[pb.LabelAssignment(id="a000", label="A"), pb.LabelAssignment(id="b000", label="B")]
        )
    )
    default = suggest(served.stub, 4, k=10, tau=0.1)  # 1 label per label, below 20: coverage only
    assert [s.reason for s in default.suggestions] == [pb.Suggestion.TYPICAL] * 4
    assert [s.id[0] for s in default.suggestions] == list("cdef")  # the uncovered clusters, largest first
    reply = suggest(served.stub, 4, k=10, tau=0.1, uncertain_from=1)
    reasons = [s.reason for s in reply.suggestions]
    assert reasons == [pb.Suggestion.TYPICAL] * 2 + [pb.Suggestion.UNCERTAIN] * 2  # half for coverage
    assert [s.id[0] for s in reply.suggestions[:2]] == ["c", "d"]  # the largest clusters without a label
    assert {s.id[0] for s in reply.suggestions[2:]} <= set("cdef")  # far from A and B: a split vote
    assert len({s.id for s in reply.suggestions}) == 4
    assert all(s.predicted_label in ("A", "B") for s in reply.suggestions)

    for name in SIZES:  # one label in every cluster: what is left to ask about is the split votes
        served.stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=f"{name}000", label=name)]))
    reply = suggest(served.stub, 4, k=10, tau=0.1, uncertain_from=1)
    uncertain = [s for s in reply.suggestions if s.reason == pb.Suggestion.UNCERTAIN]
    assert [s.id for s in uncertain][:2] in (["mid0", "mid1"], ["mid1", "mid0"]), uncertain
    assert "outlier" not in [s.id for s in uncertain]  # as unsure, but typical of nothing
    assert all(s.margin < 0.5 and s.predicted_label in ("a", "b") for s in uncertain[:2])


def test_suggest_follows_the_contract(served):
    expect(Code.FAILED_PRECONDITION, served.stub.Suggest, pb.SuggestRequest(n=3), match="no unlabelled item")
    upsert(served.stub, cluster_items()[:5])
    expect(Code.INVALID_ARGUMENT, served.stub.Suggest, pb.SuggestRequest(n=0), match="n must be positive")
    expect(Code.INVALID_ARGUMENT, served.stub.Suggest, pb.SuggestRequest(n=2, sample=0), match="sample")
    expect(
        Code.INVALID_ARGUMENT, served.stub.Suggest, pb.SuggestRequest(n=2, uncertain_from=-1), match="uncertain_from"
    )
    expect(Code.OUT_OF_RANGE, served.stub.Suggest, pb.SuggestRequest(n=10_001), match="max_suggestions")
    assert served.stub.Info(pb.InfoRequest()).max_suggestions == 10_000
    assert len(suggest(served.stub, 10).suggestions) == 5  # fewer items than asked: all of them
    served.stub.SetLabels(
        pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id=f"a{i:03d}", label="x") for i in range(5)])
    )
    expect(Code.FAILED_PRECONDITION, served.stub.Suggest, pb.SuggestRequest(n=3), match="no unlabelled item")


def test_duplicates_are_grouped_by_linked_similarity(served):
    rng = np.random.default_rng(4)
    base = unit(rng.standard_normal((40, DIM)))
    near = lambda v, eps: unit(v + eps * unit(rng.standard_normal(DIM)))  # noqa: E731
    # a, b, c at angles 0, t, 2t with cos t = 0.99: a ~ b and b ~ c above 0.98, a ~ c (0.96) below
    # it, so they form one group by linking.
    w = rng.standard_normal(DIM)
    w = unit(w - (w @ base[0]) * base[0])
    t = np.arccos(0.99)
    chain_b, chain_c = (unit(np.cos(a) * base[0] + np.sin(a) * w) for a in (t, 2 * t))
    vectors = {f"u{i:02d}": v for i, v in enumerate(base)}
    vectors |= {"u00-b": chain_b, "u00-c": chain_c, "u05-copy": base[5].copy(), "u07-near": near(base[7], 0.05)}
    upsert(served.stub, [pb.Item(id=i, embedding=pb.Vector(data=v.tobytes())) for i, v in vectors.items()])
    assert float(base[0] @ chain_c) < 0.98 < min(float(base[0] @ chain_b), float(chain_b @ chain_c))
    groups = [[n.id for n in g.items] for g in served.stub.Duplicates(pb.DuplicatesRequest(min_score=0.98))]
    assert groups[0] == ["u00", "u00-b", "u00-c"]  # largest first, items by id
    assert sorted(groups[1:]) == [["u05", "u05-copy"], ["u07", "u07-near"]]
    (copy,) = [g for g in served.stub.Duplicates(pb.DuplicatesRequest(min_score=0.999))]
    assert [n.id for n in copy.items] == ["u05", "u05-copy"] and all(n.score > 0.999 for n in copy.items)
    assert not list(served.stub.Duplicates(pb.DuplicatesRequest(min_score=1.0, max_neighbors=1)))[1:]


@pytest.mark.parametrize(
    "request_, code, words",
    [
        (pb.DuplicatesRequest(min_score=0.0), Code.INVALID_ARGUMENT, "min_score"),
        (pb.DuplicatesRequest(min_score=1.5), Code.INVALID_ARGUMENT, "min_score"),
        (pb.DuplicatesRequest(min_score=0.9, max_neighbors=0), Code.INVALID_ARGUMENT, "max_neighbors"),
        (pb.DuplicatesRequest(min_score=0.9, max_neighbors=5000), Code.OUT_OF_RANGE, "max_k"),
    ],
)
def test_duplicates_follow_the_contract(served, request_, code, words):
    expect(code, served.stub.Duplicates, request_, match=words)
