"""The round trip of an empty unary call through grpcio's two Python server models: the sync server
(a thread pool, what retrieval-server runs) and grpc.aio (one asyncio loop). Each server is a child
process with one generic method that returns empty bytes (no interceptor, no protobuf); the client
is the same sync channel the benchmarks use, at 1 and 16 client threads; servers alternate over
rounds so that machine noise hits both.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/grpc_floor.py

This is the floor under every RPC of a Python gRPC server on this machine; bench/server_bench.py
measures the same through our server (a health Check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from common import machine_info, run_load

from moco_retrieval.fileio import atomic_write
from moco_retrieval.net import free_port

REPO = Path(__file__).resolve().parent.parent
METHOD = "/floor.Floor/Empty"


def handler(behaviour) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "floor.Floor", {"Empty": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


def serve_sync(port: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    server.add_generic_rpc_handlers((handler(lambda request, context: b""),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_aio(port: int, threads: int) -> None:
    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler(empty),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


SERVERS = {"sync": serve_sync, "aio": serve_aio}


def measure(kind: str, args: argparse.Namespace) -> dict:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port), "--threads", str(args.threads)]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call = channel.unary_unary(METHOD)
            return {
                str(c): run_load(lambda i: call(b"", timeout=60), c, args.calls, args.seconds, warmup=200).to_dict()
                for c in args.concurrency
            }
    finally:
        child.kill()
        child.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=3000, help="calls per case at most")
    p.add_argument("--seconds", type=float, default=10.0, help="time per case at most")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 16])
    p.add_argument("--threads", type=int, default=64, help="the sync server's pool (retrieval-server's)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "grpc_floor.json")
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        SERVERS[args.serve](args.port, args.threads)
        return
    rounds = [{kind: measure(kind, args) for kind in SERVERS} for _ in range(args.rounds)]
    summary = {
        kind: {
            str(c): {
                "p50_ms": round(float(np.median([r[kind][str(c)]["p50_ms"] for r in rounds])), 3),
                "qps": round(float(np.median([r[kind][str(c)]["qps"] for r in rounds])), 1),
            }
            for c in args.concurrency
        }
        for kind in SERVERS
    }
    report = {
        "benchmark": "grpc_floor",
        "setup": {"method": "empty unary, bytes in and out", "sync_threads": args.threads, "rounds": args.rounds},
        "rounds": rounds,
        "median_of_rounds": summary,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
