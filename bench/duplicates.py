"""Near-duplicate grouping (the Duplicates RPC) at 100k and 1M items: time, the server's memory while it
runs, and whether every planted group is found, against the same all-kNN search in-process (FAISS,
same index type, same k, all threads): the floor of any implementation.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/duplicates.py                 # 100k (Flat) and 1M (IVF4096,Flat)
    $BVENV/bin/python bench/duplicates.py --sizes 20000   # smoke run

Data: random unit vectors (128-d; two of them are at cosine ~0 +- 0.09, so none is a duplicate of
another by chance) and, every 100th vector, 1-3 planted copies with a little noise (cosine >= 0.97).
Grouping at min_score 0.9 must return exactly the planted groups. Results go to
bench/results/duplicates.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import faiss
import grpc
import numpy as np
from common import machine_info, rss_bytes
from server_bench import CHANNEL_OPTIONS, BenchServer, make_model, packed

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
DIM = 128
PLANT_EVERY = 100
NOISE = 0.012  # per-dimension noise of a planted copy: cosine to its original ~ 1 / sqrt(1 + 128 * NOISE^2)
MIN_SCORE = 0.9
MAX_NEIGHBORS = 10
CHUNK = 10_000
RESULTS = REPO / "bench" / "results" / "duplicates.json"


def corpus(size: int, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """(size, DIM) unit vectors and the planted groups (sets of row numbers)."""
    rng = np.random.default_rng(seed)
    originals = size * PLANT_EVERY // (PLANT_EVERY + 2)  # room for ~2 copies per planted original
    x = rng.standard_normal((size, DIM), dtype=np.float32)
    groups, row = [], originals
    for i in range(0, originals, PLANT_EVERY):
        copies = int(rng.integers(1, 4))
        if row + copies > size:
            break
        x[row : row + copies] = x[i] / np.linalg.norm(x[i]) + NOISE * rng.standard_normal((copies, DIM))
        groups.append({i, *range(row, row + copies)})
        row += copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32), groups


def ingest(stub: pb_grpc.RetrievalStub, x: np.ndarray) -> float:
    def requests():
        for s in range(0, len(x), 500):
            yield pb.UpsertRequest(
                items=[pb.Item(id=f"v{j:07d}", embedding=packed(x[j])) for j in range(s, min(s + 500, len(x)))]
            )

    start = time.perf_counter()
    if sum(ack.failed for ack in stub.Upsert(requests())):
        raise RuntimeError("the server rejected items")
    return time.perf_counter() - start


def peak_rss_while(pid: int, work) -> tuple[object, int]:
    """work()'s result and the process's peak RSS (sampled every 50 ms) while it ran."""
    peak, done = [rss_bytes(pid)], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak.append(rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return result, max(peak)


def server_groups(stub: pb_grpc.RetrievalStub) -> list[set[int]]:
    request = pb.DuplicatesRequest(min_score=MIN_SCORE, max_neighbors=MAX_NEIGHBORS)
    return [{int(n.id[1:]) for n in g.items} for g in stub.Duplicates(request, timeout=7200)]


def faiss_all_knn(x: np.ndarray, factory: str) -> dict:
    """The floor: the same index type searched for every vector's MAX_NEIGHBORS + 1 nearest, in chunks."""
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    index.train(x)
    index.add(x)
    built = time.perf_counter() - start
    start = time.perf_counter()
    linked = 0
    for s in range(0, len(x), CHUNK):
        scores, rows = index.search(x[s : s + CHUNK], MAX_NEIGHBORS + 1)
        linked += int(((scores >= MIN_SCORE) & (rows != np.arange(s, s + len(rows))[:, None])).sum())
    return {"build_s": round(built, 2), "search_s": round(time.perf_counter() - start, 2), "links": linked}


def bench_size(size: int, factory: str, work: Path, model: Path) -> dict:
    x, planted = corpus(size)
    store = work / f"store-{size}"
    server = BenchServer(model, store, work, ["--index-factory", factory])
    server.start()
    try:
        channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.RetrievalStub(channel)
        ingest_s = ingest(stub, x)
        stub.Search(pb.SearchRequest(query=pb.Query(vector=packed(x[0])), k=1))  # the index is trained by now
        before = rss_bytes(server.proc.pid)
        start = time.perf_counter()
        found, peak = peak_rss_while(server.proc.pid, lambda: server_groups(stub))
        seconds = time.perf_counter() - start
        channel.close()
    finally:
        server.stop_timed()
    planted_set = {frozenset(g) for g in planted}
    found_set = {frozenset(g) for g in found}
    floor = faiss_all_knn(x, factory)
    return {
        "items": len(x),
        "index": factory,
        "ingest_s": round(ingest_s, 1),
        "duplicates_s": round(seconds, 2),
        "faiss_all_knn_s": floor["search_s"],
        "server_over_faiss": round(seconds / floor["search_s"], 2),
        "server_rss_mb_before": round(before / 2**20),
        "server_rss_mb_peak_during": round(peak / 2**20),
        "vectors_mb": round(x.nbytes / 2**20),
        "planted_groups": len(planted_set),
        "groups_found": len(found_set),
        "planted_found": len(planted_set & found_set),
        "spurious_groups": len(found_set - planted_set),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated item counts")
    parser.add_argument("--ivf-from", type=int, default=500_000, help="IVF4096,Flat from this size on, else Flat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = {
        "benchmark": "duplicates",
        "setup": {
            "dim": DIM,
            "min_score": MIN_SCORE,
            "max_neighbors": MAX_NEIGHBORS,
            "planted": f"every {PLANT_EVERY}th vector gets 1-3 noisy copies",
        },
        "machine": machine_info(),
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="dup-bench-") as tmp:
        work = Path(tmp)
        model = make_model(work / "model.pt", DIM)
        for size in (int(s) for s in args.sizes.split(",")):
            factory = "IVF4096,Flat" if size >= args.ivf_from else "Flat"
            result = bench_size(size, factory, work, model)
            print(json.dumps(result), flush=True)
            report["sizes"].append(result)
            report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
