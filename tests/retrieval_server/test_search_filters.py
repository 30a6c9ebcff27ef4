"""Search's metadata filter (equality on metadata keys, ANDed with each other and with the label
filter), in-process against brute force over the matching items."""

from __future__ import annotations

import numpy as np

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from tests.retrieval_server.calls import upsert

DIM = 512
CAMERAS, SITES = ("north", "south", "east"), ("x", "y")
ODD_KEY = 'a.b "c" $[0]'  # a key that a JSON path would misread


def corpus() -> tuple[list[str], np.ndarray, list[dict[str, str]], list[str]]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((120, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{i:03d}" for i in range(120)]
    metadata = [{"camera": CAMERAS[i % 3], "site": SITES[i % 2], ODD_KEY: str(i % 5 == 0)} for i in range(120)]
    labels = ["cat" if i % 4 == 0 else "dog" if i % 4 == 1 else "" for i in range(120)]
    return ids, vectors, metadata, labels


def brute_force(query: np.ndarray, vectors: np.ndarray, ids: list[str], keep: list[bool], k: int) -> list[str]:
    scores = np.where(keep, vectors @ query, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order if np.isfinite(scores[i])]


def test_search_keeps_only_items_whose_metadata_matches(served):
    ids, vectors, metadata, labels = corpus()
    upsert(
        served.stub,
        [
            pb.Item(id=i, embedding=pb.Vector(data=v.tobytes()), metadata=m, label=lab)
            for i, v, m, lab in zip(ids, vectors, metadata, labels)
        ],
    )
    query = vectors[7] + 0.5 * vectors[8]
    query /= np.linalg.norm(query)

    def search(k: int, where: dict[str, str], labels_in: tuple[str, ...] = ()) -> list[str]:
        request = pb.SearchRequest(
            query=pb.Query(vector=pb.Vector(data=query.tobytes())), k=k, metadata=where, labels=list(labels_in)
        )
        return [n.id for n in served.stub.Search(request).neighbors]

    north = [m["camera"] == "north" for m in metadata]
    found = search(10, {"camera": "north"})
    assert found == brute_force(query, vectors, ids, north, 10)
    assert all(metadata[ids.index(i)]["camera"] == "north" for i in found)

    both = [m["camera"] == "south" and m["site"] == "y" for m in metadata]  # keys combine by AND
    assert search(50, {"camera": "south", "site": "y"}) == brute_force(query, vectors, ids, both, 50)
    assert len(search(50, {"camera": "south", "site": "y"})) == sum(both) == 20

    odd = [m[ODD_KEY] == "True" for m in metadata]
    assert search(30, {ODD_KEY: "True"}) == brute_force(query, vectors, ids, odd, 30)

    cats_north = [lab == "cat" and m["camera"] == "north" for lab, m in zip(labels, metadata)]
    assert search(30, {"camera": "north"}, ("cat",)) == brute_force(query, vectors, ids, cats_north, 30)

    assert search(10, {"camera": "west"}) == []  # no item matches: no result, not an error
    assert search(10, {"camera": "north", "site": "x", "missing": ""}) == []  # a key no item has
    assert search(10, {"camera": "North"}) == []  # equality is exact


def test_query_by_id_leaves_itself_out_of_a_filtered_search(served):
    ids, vectors, metadata, _ = corpus()
    upsert(
        served.stub,
        [pb.Item(id=i, embedding=pb.Vector(data=v.tobytes()), metadata=m) for i, v, m in zip(ids, vectors, metadata)],
    )
    reply = served.stub.Search(pb.SearchRequest(query=pb.Query(id="i000"), k=5, metadata={"camera": "north"}))
    found = [n.id for n in reply.neighbors]
    north_but_self = [m["camera"] == "north" and i != "i000" for i, m in zip(ids, metadata)]
    assert found == brute_force(vectors[0], vectors, ids, north_but_self, 5)
    assert all(dict(n.metadata)["camera"] == "north" for n in reply.neighbors)
