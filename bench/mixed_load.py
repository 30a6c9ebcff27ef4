"""The server under a mixed load on each backend: 8 client threads, each calling Search, Classify,
Upsert, Delete, Embed and Get in turn for a fixed time, against `--backend embedded` and
`--backend milvus` (a Milvus Lite file) serving the same items; calls answered per second and
errors, per RPC and in all, and the server's RSS before and after. With --profile, py-spy samples
the milvus server during its run and splits the samples by where they were: Milvus Lite (which
runs inside the server process as Python threads: milvus_lite/), the pymilvus client, our code,
grpcio and the rest.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/mixed_load.py --profile      # 10k stored items, 45 s per backend

Results: bench/results/mixed_load.json (calls and ratios from one run; absolute numbers are noisy).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import machine_info
from profile_server import frame_name
from server_bench import BenchServer, ServerTarget, chunk_vectors, demo_images, ingest, make_model, packed

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.fileio import atomic_write

REPO = Path(__file__).resolve().parent.parent
OPS = ("search", "classify", "upsert", "delete", "embed", "get")


def mixed_calls(srv: ServerTarget, size: int, dim: int, images: list[bytes]):
    """call(thread, i): the i-th call of a client thread; the ops rotate. Upserts write ids of the
    thread's own ("t<thread>-<n>"), deletes remove the thread's oldest one, so threads never race
    on an id and the store stays near its size."""
    queries = chunk_vectors(7, 0, dim)[:256]
    written: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def call(thread: int, i: int) -> str:
        op = OPS[i % len(OPS)]
        q = packed(queries[i % len(queries)])
        if op == "search":
            srv.stub.Search(pb.SearchRequest(query=pb.Query(vector=q), k=10), timeout=120)
        elif op == "classify":
            srv.stub.Classify(pb.ClassifyRequest(query=pb.Query(vector=q), k=50, neighbors=10), timeout=120)
        elif op == "upsert":
            item_id = f"t{thread}-{i}"
            request = pb.UpsertRequest(items=[pb.Item(id=item_id, embedding=q, label="class1" if i % 2 else "")])
            (ack,) = srv.stub.Upsert(iter([request]), timeout=120)
            if ack.failed:
                raise RuntimeError(ack.errors[0].message)
            written[thread].append(item_id)
        elif op == "delete":
            if written[thread]:
                srv.stub.Delete(pb.DeleteRequest(ids=[written[thread].popleft()]), timeout=120)
        elif op == "embed":
            srv.stub.Embed(pb.EmbedRequest(images=[images[i % len(images)]], packed=True), timeout=120)
        else:
            srv.stub.Get(pb.GetRequest(ids=[f"v{(i * 7919) % size:07d}"]), timeout=120)
        return op

    return call


def run_mixed(call, threads: int, seconds: float) -> dict:
    """`threads` closed-loop clients for `seconds`: calls, errors and p50 ms per op."""
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    errors: collections.Counter[str] = collections.Counter()
    first_error: dict[str, str] = {}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(thread: int) -> None:
        for i in itertools.count():
            if time.perf_counter() >= deadline:
                return
            op = OPS[i % len(OPS)]
            start = time.perf_counter()
            try:
                call(thread, i)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                with lock:
                    errors[op] += 1
                    first_error.setdefault(op, str(exc)[:300])
                continue
            with lock:
                latencies[op].append(time.perf_counter() - start)

    start = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    calls = sum(len(v) for v in latencies.values())
    return {
        "threads": threads,
        "wall_s": round(wall, 1),
        "calls": calls,
        "calls_per_s": round(calls / wall, 1),
        "errors": sum(errors.values()),
        "first_errors": first_error,
        "per_op": {
            op: {
                "calls": len(latencies[op]),
                "errors": errors[op],
                "p50_ms": round(float(np.median(latencies[op])) * 1000, 2) if latencies[op] else None,
            }
            for op in OPS
        },
    }


def where(paths: list[str]) -> str:
    """The part of the process a sample was in, by the file of its innermost frame outside the
    standard library: Milvus Lite, pymilvus, ours, grpcio, numpy/torch, else the rest."""
    for path in reversed(paths):
        if "/milvus_lite/" in path:
            return "milvus_lite"
        if "/pymilvus/" in path:
            return "pymilvus_client"
        if "/retrieval_server/" in path or "/moco_retrieval/" in path:
            return "ours"
        if "/grpc/" in path:
            return "grpcio"
        if "/numpy/" in path or "/torch/" in path or "/onnxruntime/" in path:
            return "numpy_torch_onnx"
    return "threads_and_stdlib"


def profile_parts(collapsed: Path) -> dict:
    parts: collections.Counter[str] = collections.Counter()
    ours_functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        raw = stack.split(";")[1:]
        paths = [f.partition(" (")[2] for f in raw]
        frames = [frame_name(f) for f in raw]
        n = int(count)
        total += n
        parts[where(paths)] += n
        for frame, path in zip(frames, paths):
            if "/retrieval_server/" in path and frame.startswith(("MilvusBackend.", "RetrievalService._count")):
                ours_functions[frame] += n
    pct = lambda c: round(100.0 * c / max(total, 1), 1)  # noqa: E731
    return {
        "samples": total,
        "parts_percent": {name: pct(c) for name, c in parts.most_common()},
        "milvus_backend_functions_inclusive_percent": {name: pct(c) for name, c in ours_functions.most_common(12)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=10_000, help="stored items (a multiple of 10k)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=45.0, help="load time per backend")
    p.add_argument("--profile", action="store_true", help="py-spy the milvus server during its run")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mixed_load.json")
    args = p.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mixed_load_"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "model.pt", args.dim)
    images = demo_images(64)
    backends = {
        "embedded": [],
        "milvus": ["--backend", "milvus", "--milvus-uri", str(work / "milvus.db")],
    }
    results: dict = {}
    for name, extra in backends.items():
        server = BenchServer(model, work / f"store-{name}", work, ["--index-factory", "Flat", *extra])
        server.start()
        try:
            srv = ServerTarget(server.port, upsert_batch=1000)
            ingest({name: srv}, 0, args.dim, 0, args.size, label_every=10)
            rss_before = server.rss() / 2**20
            call = mixed_calls(srv, args.size, args.dim, images)
            profiler = None
            if args.profile and name == "milvus":
                assert server.proc is not None
                profiler = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid)]
                    + ["--duration", str(int(args.seconds)), "--rate", "200", "--format", "raw"]
                    + ["--output", str(work / "milvus.collapsed"), "--nonblocking", "--full-filenames"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            load = run_mixed(call, args.threads, args.seconds)
            if profiler is not None:
                profiler.wait(timeout=args.seconds + 120)
                load["profile"] = profile_parts(work / "milvus.collapsed")
            load["rss_mb_before"] = round(rss_before, 1)
            load["rss_mb_after"] = round(server.rss() / 2**20, 1)
            results[name] = load
            srv.close()
        finally:
            server.stop()
        print(f"{name}: {json.dumps(results[name], indent=1)}", flush=True)
    results["embedded_calls_over_milvus_calls"] = round(
        results["embedded"]["calls"] / max(results["milvus"]["calls"], 1), 2
    )
    report = {
        "benchmark": "mixed_load",
        "setup": {"size": args.size, "dim": args.dim, "threads": args.threads, "seconds": args.seconds, "ops": OPS},
        "results": results,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(f"written {args.out}; work dir {work}")


if __name__ == "__main__":
    main()
