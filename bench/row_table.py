"""What the embedded backend's in-memory row table costs and saves: the Neighbor encodings it keeps
(retrieval_server/neighbors.py) for every item, in RSS, and the time to fetch 200 neighbours' rows
from it against the store (SQLite) and to build their messages from bytes against field by field.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/row_table.py            # 1M items, 128-d, each with a uri in its metadata

In-process, one run; results in bench/results/row_table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine_info, rss_bytes

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.fileio import atomic_write
from retrieval_server.embedded import EmbeddedBackend
from retrieval_server.index import ItemIndex
from retrieval_server.neighbors import neighbor, neighbors_wire
from retrieval_server.store import NewItem, Store, StoreLock

REPO = Path(__file__).resolve().parent.parent
CHUNK = 10_000


def per_call_ms(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - start) / calls * 1000, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="stored items (a multiple of 10k)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--neighbors", type=int, default=200)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "row_table.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="row_table_"))
    pid = os.getpid()
    try:
        lock = StoreLock(work).acquire()
        store = Store(work)
        store.bind_model("bench", args.dim, reset=False)
        index = ItemIndex(args.dim, "Flat", 0)
        index.load(store, work)
        backend = EmbeddedBackend(store, index, work, 0, lock)
        rng = np.random.default_rng(0)
        for c in range(args.size // CHUNK):
            x = rng.standard_normal((CHUNK, args.dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            items = [
                NewItem(
                    id=f"photos/{c:04d}/{i:05d}.jpg",
                    embedding=x[i],
                    label=f"class{i % 10}" if i % 10 == 0 else None,
                    metadata={"uri": f"file:///data/photos/{c:04d}/{i:05d}.jpg"},
                )
                for i in range(CHUNK)
            ]
            for s in range(0, CHUNK, 1000):
                backend.upsert(items[s : s + 1000])
        rows = np.arange(1, args.size + 1)
        sample = rng.choice(rows, args.neighbors, replace=False).tolist()
        scores = rng.random(args.neighbors).astype(np.float32).tolist()
        cold = {
            "store_rows_ms": per_call_ms(lambda: store.by_rows(sample), 200),
            "messages_field_by_field_ms": per_call_ms(
                lambda: pb.ClassifyResponse(
                    neighbors=[neighbor(r, s) for r, s in zip(store.by_rows(sample).values(), scores)]
                ),
                200,
            ),
        }
        rss_before = rss_bytes(pid)
        for s in range(0, args.size, CHUNK):
            backend.encoded(rows[s : s + CHUNK].tolist())
        rss_after = rss_bytes(pid)
        encoded = backend.encoded(sample)
        warm = {
            "table_rows_ms": per_call_ms(lambda: backend.encoded(sample), 200),
            "messages_from_bytes_ms": per_call_ms(
                lambda: pb.ClassifyResponse.FromString(
                    neighbors_wire(pb.ClassifyResponse, [encoded[r] for r in sample], scores)
                ),
                200,
            ),
        }
        report = {
            "benchmark": "row_table",
            "setup": {"size": args.size, "dim": args.dim, "neighbors": args.neighbors, "metadata": "one uri each"},
            "results": {
                "rss_of_the_full_table_mb": round((rss_after - rss_before) / 2**20, 1),
                "bytes_per_item": round((rss_after - rss_before) / args.size, 1),
                "raw_vectors_mb": round(args.size * args.dim * 4 / 2**20, 1),
                "cold_store_path": cold,
                "warm_table_path": warm,
                "rows_and_messages_before_over_after": round(
                    cold["messages_field_by_field_ms"] / (warm["table_rows_ms"] + warm["messages_from_bytes_ms"]),
                    2,
                ),
            },
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        backend.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(json.dumps(report["results"], indent=1))


if __name__ == "__main__":
    main()
