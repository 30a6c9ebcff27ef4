"""`retrieval-server migrate` against real stores: a store served by the old model is re-embedded for the
new one while the server keeps answering, and the new store equals one freshly indexed with the new
model and given the same labels; human labels are all kept, predicted ones recomputed as LabelCorpus
would, missing images reported; bad input is one line and changes nothing; a killed run resumes to
the same store, carrying the writes made meanwhile, as the same migration spread over 2 processes."""

from __future__ import annotations

import shutil
import signal
import time

import numpy as np
import pytest
from milvus_lite.server_manager import server_manager_instance
from pymilvus import MilvusClient

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from retrieval_client import RetrievalClient
from retrieval_server.listing import embedded_listing
from tests.retrieval_server.upgrades import (
    BROKEN,
    GONE,
    HUMAN,
    PREDICTED,
    contents,
    items_of,
    make_corpus,
    migrate,
    migrate_process,
    report,
    source_store,
)
from tests.server_harness import ServerProcess, backend_args, png_bytes

MISSING = {GONE: "No such file or directory", BROKEN: "cannot decode image"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """An embedded store of the corpus, embedded by the old model (copied by each test)."""
    store = tmp_path_factory.mktemp("source") / "store"
    source_store(corpus, store)
    return store


def classify_all(stub, ids: list[str]) -> list[bytes]:
    """Classify by vector, image and stored id, with all neighbours: the whole answers, serialised."""
    queries = [
        pb.Query(vector=pb.Vector(values=np.random.default_rng(s).standard_normal(512).tolist())) for s in (1, 2)
    ]
    queries += [pb.Query(image=png_bytes(s)) for s in (3, 4)] + [pb.Query(id=i) for i in ids]
    return [
        stub.Classify(pb.ClassifyRequest(query=q, k=5, tau=0.1)).SerializeToString(deterministic=True) for q in queries
    ]


@pytest.mark.slow
def test_the_migrated_store_keeps_the_work_and_equals_a_fresh_index(corpus, source, tmp_path):
    store, new_store = tmp_path / "store", tmp_path / "new"
    shutil.copytree(source, store)
    kept = [i for i in corpus.ids if i not in MISSING]
    with ServerProcess(corpus.old, store) as old_server, RetrievalClient(old_server.address) as old:
        old_fingerprint = old.info().model_fingerprint
        before = embedded_listing(store)
        status, out, _ = migrate(
            "--model", corpus.new, "--store", store, "--to", new_store, "--image-root", corpus.root
        )
        assert old.info().item_count == len(corpus.ids)  # served throughout, untouched
        assert embedded_listing(store) == before
    assert status == 1  # items were left out: said in the summary and the report
    assert f"migrated {len(kept)} items ({len(HUMAN)} human-labelled, {len(PREDICTED)} predicted labels" in out
    left_out = {m["id"]: m for m in report(tmp_path / "new.migrate")["missing"]}
    assert sorted(left_out) == sorted(MISSING)
    for item_id, reason in MISSING.items():
        assert reason in left_out[item_id]["reason"] and left_out[item_id]["uri"].endswith(item_id)
        assert f"  {item_id}  file://" in out

    with ServerProcess(corpus.new, new_store) as migrated, ServerProcess(corpus.new, tmp_path / "fresh") as fresh:
        with RetrievalClient(migrated.address) as m, RetrievalClient(fresh.address) as f:
            f.upsert_many(items_of(corpus, kept))
            f.set_labels(HUMAN)
            assert m.info().model_fingerprint == f.info().model_fingerprint != old_fingerprint
            got, want = m.get(kept, include_embedding=True), f.get(kept, include_embedding=True)
            assert [(g.id, g.label, g.metadata) for g in got] == [(w.id, w.label, w.metadata) for w in want]
            assert {g.id: g.label for g in got if g.label} == HUMAN  # every human label, unchanged
            np.testing.assert_array_equal(np.stack([g.embedding for g in got]), np.stack([w.embedding for w in want]))
            assert classify_all(migrated.stub(), kept[:3]) == classify_all(fresh.stub(), kept[:3])

            # predicted labels: recomputed for the items that had one, as LabelCorpus proposes them
            proposals = {p.id: (p.label, p.confidence) for p in m.label_corpus(k=200, tau=0.07)}
            predicted = {g.id: (g.predicted_label, g.predicted_confidence) for g in got if g.predicted_label}
            assert predicted == {i: proposals[i] for i in PREDICTED}
            assert m.info().predicted_count == len(PREDICTED)


def test_bad_input_is_one_line_and_changes_nothing(corpus, source, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(source, store)
    (tmp_path / "taken").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = embedded_listing(store)
    cases = {
        "is the model the store already holds": ["--model", corpus.old, "--to", tmp_path / "new"],
        "exists: the destination must be a new store directory": ["--model", corpus.new, "--to", tmp_path / "taken"],
        f"items have a uri outside --image-root {elsewhere}": [
            "--model",
            corpus.new,
            "--to",
            tmp_path / "new",
            "--image-root",
            elsewhere,
        ],
    }
    for message, args in cases.items():
        roots = [] if "--image-root" in args else ["--image-root", corpus.root]
        status, out, err = migrate(*args, "--store", store, *roots)
        lines = err.strip().splitlines()
        assert status == 1 and out == "" and len(lines) == 1, err
        assert lines[0].startswith("retrieval-server migrate: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.migrate").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "store", "taken"]
    assert embedded_listing(store) == before


@pytest.mark.slow
def test_a_killed_migration_resumes_to_the_store_of_an_uninterrupted_one(tmp_path):
    """Killed mid-embedding, the store written meanwhile (a new item, a relabel, a deletion, a new
    prediction), resumed: the same store as the migration of the changed store under torchrun with
    2 processes, from scratch."""
    corpus = make_corpus(tmp_path)
    store, work = tmp_path / "store", tmp_path / "work"
    source_store(corpus, store)
    args = ["--model", corpus.new, "--store", store, "--image-root", corpus.root, "--shard-size", 1, "-b", 1]
    run = migrate_process(*args, "--to", tmp_path / "resumed", "--work", work)
    while not (work / "shards" / "shard-00002.json").exists():
        assert run.poll() is None, run.communicate()
        time.sleep(0.005)
    run.send_signal(signal.SIGSTOP)  # frozen mid-embedding, then killed
    done = len(list((work / "shards").glob("shard-*.json")))
    run.kill()
    run.communicate()
    assert 3 <= done < len(corpus.ids) - 2 and not (tmp_path / "resumed").exists()

    added = corpus.root / "bird" / "new.png"
    added.write_bytes(png_bytes(99))
    with ServerProcess(corpus.old, store) as server, RetrievalClient(server.address) as client:
        client.upsert_many(items_of(corpus, ["bird/new.png"]))
        client.set_labels({"bird/new.png": "bird", "bird/01.png": "dog", "cat/03.png": "cat"})
        client.delete(["dog/00.png"])
        client.set_labels({"cat/04.png": "dog"}, predicted=True, confidences={"cat/04.png": 0.6})

    status, out, _ = migrate(*args, "--to", tmp_path / "resumed", "--work", work)
    assert status == 1 and "writes to the source carried by the catch-up passes: 5 + 0" in out, out
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    fresh = migrate_process(*args, "--to", tmp_path / "fresh", launcher=torchrun)
    stdout, stderr = fresh.communicate(timeout=300)
    assert fresh.returncode == 1 and "writes to the source carried by the catch-up passes: 0" in stdout, stderr
    assert "on 2 processes" in stdout

    resumed = contents(tmp_path / "resumed")
    assert resumed == contents(tmp_path / "fresh")
    by_id = {row[0]: row for row in resumed}
    assert by_id["bird/new.png"][1] == "bird" and by_id["bird/01.png"][1] == "dog" and "dog/00.png" not in by_id
    assert by_id["cat/03.png"][1] == "cat" and by_id["cat/04.png"][2] is not None  # a prediction recomputed


@pytest.mark.slow
def test_milvus_collections_and_their_alias(tmp_path):
    """A Milvus collection migrated to a new one, which takes over an alias; a second migration to
    that alias from a collection of another model is refused (the alias is held by another model)."""
    corpus = make_corpus(tmp_path)
    milvus = backend_args("milvus", tmp_path)
    source_store(corpus, tmp_path / "unused", *milvus)
    args = ["--model", corpus.new, *milvus, "--image-root", corpus.root, "--settle-s", 0]
    status, out, _ = migrate(
        *args, "--milvus-collection", "items", "--to", "items_v2", "--alias", "served", "--work", tmp_path / "w2"
    )
    assert status == 1 and "left out: 2 items" in out
    assert sorted(m["id"] for m in report(tmp_path / "w2")["missing"]) == sorted(MISSING)
    client = MilvusClient(uri=milvus[-1])
    assert client.describe_alias("served")["collection_name"] == "items_v2"
    models = {name: client.describe_collection(name)["properties"]["fingerprint"] for name in ("items", "items_v2")}
    assert models["items"] != models["items_v2"]
    stored = client.query("items_v2", filter="", output_fields=["id", "label", "predicted_label"])
    assert {e["id"]: e["label"] for e in stored if e["label"]} == HUMAN
    assert sorted(e["id"] for e in stored if e["predicted_label"]) == sorted(PREDICTED)
    assert len(stored) == len(corpus.ids) - len(MISSING)

    status, out, err = migrate(
        *args, "--milvus-collection", "items", "--to", "items_v3", "--alias", "served", "--work", tmp_path / "w3"
    )
    assert status == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "--alias served points at collection 'items_v2' of model" in err and "not at the migrated" in err
    assert not client.has_collection("items_v3") and not (tmp_path / "w3").exists()
    client.close()
    server_manager_instance.release_server(milvus[-1])  # Milvus Lite: one process per file
    with ServerProcess(corpus.new, tmp_path / "unused", *milvus, "--milvus-collection", "served") as server:
        with RetrievalClient(server.address) as served:
            assert served.info().item_count == len(corpus.ids) - len(MISSING)
            assert served.info().label_counts == {"bird": 2, "cat": 2, "dog": 2}
