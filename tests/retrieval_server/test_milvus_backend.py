"""The milvus backend keeps no state outside Milvus: a server restarted on another (empty) --store
directory, as a replica on another machine would be, finds every item, label, prediction and
metadata, and answers Search and Classify the same. Milvus Lite is single-process, so two replicas
cannot share one file here; what makes two replicas on a Milvus cluster agree is exactly this:
everything a call reads comes from the collection (Strong consistency), nothing from the process."""

from __future__ import annotations

import signal

import grpc
import numpy as np
import pytest

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from retrieval_server import milvus_backend
from retrieval_server.milvus_backend import literal, row_of
from retrieval_server.service import LABEL_CORPUS_CHUNK
from tests.retrieval_server.calls import expect, load_corpus, state, upsert
from tests.server_harness import (
    ServerProcess,
    backend_args,
    make_export,
    png_bytes,
    run_server_expecting_failure,
)


def errors(stderr: str) -> list[str]:
    """The error lines among the log lines (Milvus Lite logs its own start and stop)."""
    return [line for line in stderr.splitlines() if line.startswith("retrieval-server: error:")]


def answers(stub) -> tuple:
    """What a client sees: every item (state), a search and a vote."""
    search = stub.Search(pb.SearchRequest(query=pb.Query(image=png_bytes(3)), k=8, metadata={"uri": "u/a5"}))
    nearest = stub.Search(pb.SearchRequest(query=pb.Query(id="a2"), k=5, labels=["cat", "dog"]))
    vote = stub.Classify(pb.ClassifyRequest(query=pb.Query(image=png_bytes(9)), k=5, tau=0.1))
    info = stub.Info(pb.InfoRequest())
    return (
        state(stub),
        [(n.id, round(n.score, 5)) for n in search.neighbors],
        [(n.id, round(n.score, 5)) for n in nearest.neighbors],
        (vote.label, [(s.label, round(s.score, 5)) for s in vote.scores]),
        (info.item_count, info.labelled_count, info.predicted_count, dict(info.label_counts)),
    )


def test_a_replica_on_an_empty_store_directory_serves_everything(tmp_path):
    model = make_export(tmp_path)
    milvus = backend_args("milvus", tmp_path)
    with ServerProcess(model, tmp_path / "replica-a", *milvus) as a:
        stub = a.stub()
        load_corpus(stub)
        stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="a9", label="bird")]))
        stub.SetLabels(
            pb.SetLabelsRequest(
                assignments=[pb.LabelAssignment(id="a10", label="cat", confidence=0.7)], source=pb.PREDICTED
            )
        )
        stub.Delete(pb.DeleteRequest(ids=["a11"]))
        before = answers(stub)
        assert before[4] == (11, 9, 1, {"cat": 4, "dog": 4, "bird": 1})
        assert before[1][0][0] == "a5"  # the metadata filter leaves only a5
        assert a.stop(signal.SIGTERM) == 0
    assert not (tmp_path / "replica-a").exists()  # the server wrote nothing of its own
    with ServerProcess(model, tmp_path / "replica-b", *milvus) as b:
        assert answers(b.stub()) == before


def test_a_collection_of_another_model_is_refused_or_reset(tmp_path):
    milvus = backend_args("milvus", tmp_path)
    with ServerProcess(make_export(tmp_path, seed=0), tmp_path / "store", *milvus) as server:
        load_corpus(server.stub())
    other = make_export(tmp_path, seed=1, name="other.pt")
    refused = run_server_expecting_failure(other, tmp_path / "store", *milvus)
    (error,) = errors(refused.stderr)
    assert refused.returncode == 2 and error.startswith("retrieval-server: error: FAILED_PRECONDITION")
    assert "Milvus collection 'items' holds embeddings of model" in error
    with ServerProcess(other, tmp_path / "store", *milvus, "--reset-store") as server:
        assert server.stub().Info(pb.InfoRequest()).item_count == 0


def test_unreachable_milvus_is_a_one_line_start_up_error(tmp_path):
    refused = run_server_expecting_failure(
        make_export(tmp_path),
        tmp_path / "store",
        "--backend",
        "milvus",
        "--milvus-uri",
        "http://127.0.0.1:9",
        timeout=120,
    )
    (error,) = errors(refused.stderr)
    assert refused.returncode == 2 and error.startswith("retrieval-server: error: Milvus at http://127.0.0.1:9")


def test_keys_and_literals():
    """The primary key is a stable non-negative int64 per id; literals survive quotes and backslashes."""
    keys = {row_of(f"img/{i}.jpg") for i in range(10_000)}
    assert len(keys) == 10_000 and all(0 <= k < 2**63 for k in keys)
    assert row_of("a") == row_of("a") != row_of("b")
    assert literal('say "hi" \\ ü') == '"say \\"hi\\" \\\\ ü"'


@pytest.mark.parametrize("served", ["milvus"], indirect=True)
def test_an_id_whose_key_another_id_holds_is_refused_and_nothing_changes(served, monkeypatch):
    """Two ids with one 63-bit key (about one pair in 10^6 at 10M items; forced here by mapping both
    to one key, since a real pair cannot be found): the second is FAILED_PRECONDITION, since retrying
    cannot help, and the first stays as it was."""
    monkeypatch.setattr(milvus_backend, "row_of", lambda item_id: 7 if item_id in ("x", "y") else row_of(item_id))

    def vector(seed: int) -> pb.Vector:
        return pb.Vector(data=np.random.default_rng(seed).standard_normal(512).astype(np.float32).tobytes())

    upsert(served.stub, [pb.Item(id="x", embedding=vector(0), label="cat")])
    expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        served.stub.Upsert,
        iter([pb.UpsertRequest(items=[pb.Item(id="y", embedding=vector(1))])]),
        match="share a Milvus key",
    )
    stored = served.stub.Get(pb.GetRequest(ids=["x"])).items
    assert [(i.id, i.label) for i in stored] == [("x", "cat")]
    assert served.stub.Info(pb.InfoRequest()).item_count == 1
    expect(grpc.StatusCode.NOT_FOUND, served.stub.Get, pb.GetRequest(ids=["y"]))


def test_milvus_needs_a_uri(tmp_path):
    proc = run_server_expecting_failure(make_export(tmp_path), tmp_path / "store", "--backend", "milvus")
    assert proc.returncode != 0 and "--milvus-uri is required with --backend milvus" in proc.stderr


def test_label_corpus_applies_across_chunks_proposing_each_item_once(served):
    """LabelCorpus(apply) writes predictions while it iterates over the unlabelled items (Milvus: a
    query iterator paging by key while upserts rewrite the entities it already gave)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((LABEL_CORPUS_CHUNK + 300, 512)).astype(np.float32)
    items = [
        pb.Item(id=f"x{i:05d}", embedding=pb.Vector(data=v.tobytes()), label="ab"[i % 2] if i < 20 else "")
        for i, v in enumerate(vectors)
    ]
    upsert(served.stub, *[items[i : i + 500] for i in range(0, len(items), 500)])
    proposals = [p.id for p in served.stub.LabelCorpus(pb.LabelCorpusRequest(k=5, apply=True))]
    assert sorted(proposals) == [item.id for item in items[20:]]  # each unlabelled item exactly once
    info = served.stub.Info(pb.InfoRequest())
    assert (info.item_count, info.labelled_count, info.predicted_count) == (len(items), 20, len(items) - 20)
