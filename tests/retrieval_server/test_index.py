"""The FAISS mirror and the SQLite store in-process: every factory keeps ids straight through adds,
overwrites and deletes (IVF trains once it has enough vectors, HNSW rebuilds on delete), and a
restart from a snapshot plus later rows and tombstones equals the live index."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval_server.faiss_index import resolve_gpus
from retrieval_server.index import ItemIndex
from retrieval_server.store import NewItem, Store, UnknownIds

DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Mirror:
    """A store and its index, written the way the service writes them."""

    def __init__(self, directory: Path, factory: str) -> None:
        self.store = Store(directory)
        assert self.store.bind_model("sha256:test", DIM, reset=False) is None
        self.index = ItemIndex(DIM, factory, gpus=0)
        self.index.load(self.store, directory)

    def upsert(self, ids: list[str], vectors: np.ndarray, labels: list[str | None]) -> None:
        done = self.store.upsert([NewItem(i, v, lab) for i, v, lab in zip(ids, vectors, labels)])
        rows = np.array([w.row for w in done.items], dtype=np.int64)
        self.index.apply_upsert(
            done.version, rows, vectors, [w.label for w in done.items], np.array([w.existed for w in done.items])
        )

    def delete(self, ids: list[str]) -> None:
        done = self.store.delete(ids, ignore_missing=False)
        self.index.apply_delete(done.version, np.array(done.rows, dtype=np.int64))

    def nearest_ids(self, queries: np.ndarray, labelled: bool = False) -> list[str]:
        scores, rows = (self.index.labelled if labelled else self.index.items).search(queries, 1)
        by_row = self.store.by_rows(rows[:, 0])
        return [by_row[r].id if r >= 0 else "" for r in rows[:, 0].tolist()]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8", "IVF4,PQ4x4"])
def test_ids_survive_adds_overwrites_deletes_and_restart(tmp_path: Path, factory: str) -> None:
    m = Mirror(tmp_path, factory)
    n = 700 if "PQ" in factory else 200  # trained at 39 vectors per centroid: 624 (16 PQ codes), 156 (IVF4)
    ids = [f"i{j:05d}" for j in range(n)]
    vectors = _vectors(n, 0)
    labels = [("odd" if j % 2 else "even") if j % 10 == 0 else None for j in range(n)]
    for start in range(0, n, 500):
        m.upsert(ids[start : start + 500], vectors[start : start + 500], labels[start : start + 500])
    assert not m.index.items.in_fallback  # trained, or never needed training
    m.delete(ids[:20])
    fresh = _vectors(10, 1)
    m.upsert(ids[20:30], fresh, [None] * 10)  # overwrite: keeps labels (i00020 stays "even")
    live = ids[20:]
    expected = np.concatenate([fresh, vectors[30:]])
    assert m.index.items.ntotal == len(live) and m.store.counts()[0] == len(live)
    exact = "PQ" not in factory  # PQ codes are lossy
    if exact:
        assert m.nearest_ids(expected) == live
    assert m.index.labels == {r.row: r.label for r in m.store.get(live).values() if r.label}
    labelled = [i for i, lab in zip(ids, labels) if lab and i in live]
    assert m.nearest_ids(expected[[live.index(i) for i in labelled]], labelled=True) == labelled

    m.index.save_snapshot(tmp_path, m.store.store_id)
    m.delete(ids[30:35])  # after the snapshot: replayed from rows and tombstones
    m.upsert(["new"], _vectors(1, 2), ["odd"])
    live = ids[20:30] + ids[35:] + ["new"]
    restarted = ItemIndex(DIM, factory, gpus=0)
    how = restarted.load(m.store, tmp_path)
    assert how.startswith("snapshot"), how
    assert restarted.items.ntotal == len(live) and restarted.labels == m.index.labels
    probe = np.concatenate([fresh, vectors[35:], _vectors(1, 2)])
    if exact:
        m.index = restarted
        assert m.nearest_ids(probe) == live
    from_scratch = ItemIndex(DIM, factory, gpus=0)
    assert from_scratch.load(m.store, tmp_path / "no-snapshot") == "rebuilt from the store"
    assert from_scratch.items.ntotal == len(live)


def test_store_is_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.bind_model("sha256:a", DIM, reset=False)
    store.upsert([NewItem("a", _vectors(1, 0)[0], "x", {"uri": "u"})])
    with pytest.raises(UnknownIds, match="'nope'"):
        store.delete(["a", "nope"], ignore_missing=False)
    with pytest.raises(UnknownIds):
        store.set_labels([("a", "y", 0.0), ("nope", "y", 0.0)], predicted=False)
    assert store.get(["a"])["a"].label == "x" and store.counts() == (1, {"x": 1})
    assert store.bind_model("sha256:b", DIM, reset=False) == "sha256:a"  # refused: another model
    assert store.counts()[0] == 1
    old_id = store.store_id
    assert store.bind_model("sha256:b", DIM, reset=True) is None
    assert store.counts()[0] == 0 and store.store_id != old_id


class FakeGpus:
    """Stands in for faiss GPU cloning (no GPU here): a CPU clone, counted, optionally refusing."""

    def __init__(self, refuse: tuple[type, ...] = ()) -> None:
        self.clones = 0
        self.refuse = refuse

    def __call__(self, index, ngpu: int = -1):
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        if isinstance(inner, self.refuse):
            raise RuntimeError("not implemented for GPU")
        self.clones += 1
        return faiss.clone_index(index)


def test_gpu_replica_is_refreshed_from_the_cpu_truth(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = FakeGpus()
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", gpus)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert resolve_gpus("auto") == 2 and resolve_gpus("1") == 1
    with pytest.raises(RuntimeError, match="sees 2"):
        resolve_gpus("3")
    index = ItemIndex(DIM, "Flat", gpus=2)
    vectors = _vectors(30, 0)
    rows = np.arange(1, 31, dtype=np.int64)
    index.apply_upsert(1, rows[:20], vectors[:20], [None] * 20, np.zeros(20, bool))
    assert index.items.search(vectors[:3], 1)[1][:, 0].tolist() == [1, 2, 3] and gpus.clones == 1
    index.apply_upsert(2, rows[20:], vectors[20:], [None] * 10, np.zeros(10, bool))  # adds go to the replica too
    assert index.items.search(vectors[25:26], 1)[1][0, 0] == 26 and gpus.clones == 1
    index.apply_delete(3, rows[:5])  # removals re-clone from the CPU index
    found = index.items.search(vectors[:5], 1)[1][:, 0]
    assert not np.isin(found, rows[:5]).any() and gpus.clones == 2


def test_index_without_gpu_version_searches_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", FakeGpus(refuse=(faiss.IndexHNSWFlat,)))
    index = ItemIndex(DIM, "HNSW8", gpus=1)
    vectors = _vectors(10, 0)
    index.apply_upsert(1, np.arange(10, dtype=np.int64), vectors, [None] * 10, np.zeros(10, bool))
    assert index.items.search(vectors[4:5], 1)[1][0, 0] == 4
    assert index.device == "cpu"
