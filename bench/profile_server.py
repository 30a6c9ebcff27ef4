"""Where a Search or Classify call spends the server's CPU: py-spy samples the running server (every
thread that is not idle, Python frames) while one client calls it in a closed loop, on the same
store as bench/server_bench.py (random 128-d vectors, every 10th labelled, Flat index).

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/profile_server.py                 # 100k vectors, Search and Classify
    $BVENV/bin/python bench/profile_server.py --size 10000

The JSON (bench/results/server_profile.json) holds, per RPC, the client's latency during the
profile, the number of samples, their shares by part of the path (FAISS, the vote, store rows and
neighbour messages, the rest of our code, grpcio's server loop and threads), and the functions with
the largest inclusive and self shares of them (a function's inclusive share counts each sample once
however deep it recurses). The collapsed stacks stay in the work directory for a flame graph (e.g.
speedscope, inferno).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine_info, run_load
from server_bench import BenchServer, ServerTarget, chunk_vectors, ingest, make_model

from moco_retrieval.fileio import atomic_write

REPO = Path(__file__).resolve().parent.parent
TOP = 25


def frame_name(frame: str) -> str:
    """py-spy's `function (path/to/file.py:line)` as `function (file.py)`: lines merged."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rsplit(':', 1)[0]).name})" if where else name


def part(frames: list[str]) -> str:
    """Which part of the path a sample (its stack, outermost first) was in."""
    if any(f.endswith(("(swigfaiss.py)", "(class_wrappers.py)")) for f in frames):
        return "faiss"
    if any(f.startswith(("knn_vote ", "ClassTable.")) for f in frames):
        return "vote"
    if any(f.startswith(("RetrievalService._neighbors ", "EmbeddedBackend.by_rows ")) for f in frames):
        return "rows_and_neighbour_messages"
    handler = ("(service.py)", "(index.py)", "(embedded.py)", "(store.py)", "(auth.py)")
    if any(f.endswith(handler) for f in frames) or (frames and frames[-1].endswith("(metrics.py)")):
        return "our_other_code"  # in a handler (numpy, protobuf calls included), or metrics' own time
    return "grpc_and_threads"


def summarise(collapsed: Path) -> dict:
    """Inclusive and self shares of the samples per function, from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame_name(f) for f in stack.split(";")[1:]]  # the first entry names the thread
        n = int(count)
        total += n
        for name in set(frames):
            inclusive[name] += n
        if frames:
            own[frames[-1]] += n
        parts[part(frames)] += n
    share = lambda c: round(100.0 * c / max(total, 1), 1)  # noqa: E731
    return {
        "samples": total,
        "parts_percent": {name: share(c) for name, c in parts.most_common()},
        "inclusive_percent": {name: share(c) for name, c in inclusive.most_common(TOP)},
        "self_percent": {name: share(c) for name, c in own.most_common(TOP)},
    }


def profile(server: BenchServer, call, args: argparse.Namespace, out: Path) -> dict:
    """Sample the server for args.seconds while one client thread calls `call` in a loop."""
    load: dict = {}
    client = threading.Thread(
        target=lambda: load.update(run_load(call, 1, 10**9, args.seconds + 2).to_dict()), daemon=True
    )
    client.start()
    time.sleep(1.0)  # the loop is running before sampling starts
    assert server.proc is not None
    subprocess.run(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid)]
        + ["--duration", str(int(args.seconds)), "--rate", str(args.rate), "--format", "raw"]
        + ["--output", str(out), "--nonblocking"],
        check=True,
        capture_output=True,
    )
    client.join()
    return {"client_p50_ms": load["p50_ms"], "client_qps": load["qps"], **summarise(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=100_000, help="stored vectors (a multiple of 10k)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10, help="Search k")
    p.add_argument("--classify-k", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0, help="sampling time per RPC")
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "server_profile.json")
    args = p.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="server_profile_"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "model.pt", args.dim)
    server = BenchServer(model, work / "store", work, ["--index-factory", "Flat"])
    server.start()
    try:
        srv = ServerTarget(server.port, upsert_batch=1000)
        bare = ServerTarget(server.port, upsert_batch=1000, neighbors=0)  # Classify without neighbours
        ingest({"server": srv}, 0, args.dim, 0, args.size, label_every=10)
        queries = chunk_vectors(1, 0, args.dim)[:500]
        calls = {
            "search": srv.search_call(queries, args.k),
            "classify": srv.classify_call(queries, args.classify_k, 0.07),
            "classify_no_neighbors": bare.classify_call(queries, args.classify_k, 0.07),
        }
        results = {name: profile(server, call, args, work / f"{name}.collapsed") for name, call in calls.items()}
        srv.close()
        bare.close()
    finally:
        server.stop()
    report = {
        "benchmark": "server_profile",
        "setup": {"size": args.size, "dim": args.dim, "k": args.k, "classify_k": args.classify_k, "rate": args.rate},
        "results": results,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    for name, r in results.items():
        print(f"\n{name}: p50 {r['client_p50_ms']} ms, {r['samples']} samples; by part %: {r['parts_percent']}")
        print("inclusive %:")
        for fn, pct in list(r["inclusive_percent"].items())[:15]:
            print(f"  {pct:5.1f}  {fn}")
    print(f"\nwritten {args.out}; collapsed stacks in {work}")


if __name__ == "__main__":
    main()
