"""Benchmark helpers: a closed-loop load generator with per-call latencies, latency statistics,
process memory and a description of the machine. No timing is asserted anywhere: benchmarks report."""

from __future__ import annotations

import itertools
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import psutil

from moco_retrieval.devices import cpu_has_native_bf16


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop run: `concurrency` threads each issuing one call after the other."""

    concurrency: int
    calls: int
    errors: int
    wall_s: float
    qps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def run_load(
    call: Callable[[int], object], concurrency: int, max_calls: int, max_seconds: float, warmup: int = 3
) -> LoadResult:
    """Run call(i) for i = 0, 1, ... from `concurrency` threads until max_calls calls were made or
    max_seconds passed, whichever first. QPS = successful calls / wall time; a call that raises
    counts as an error and not in the latencies (the first error is re-raised when every call failed)."""
    for i in range(warmup):
        call(i)
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[BaseException] = []
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        mine: list[float] = []
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter)
            if i >= max_calls:
                break
            start = time.perf_counter()
            try:
                call(i)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                with lock:
                    failures.append(exc)
                continue
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures and not latencies:
        raise failures[0]
    ms = np.asarray(latencies) * 1e3
    return LoadResult(
        concurrency=concurrency,
        calls=len(ms),
        errors=len(failures),
        wall_s=wall,
        qps=len(ms) / wall,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
    )


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the server may fork helpers)."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def settle(pids: list[int], busy_percent: float = 10.0, max_s: float = 120.0) -> float:
    """Wait until the processes are idle (background snapshots, flushes, compactions done) so that
    they do not run into the next measurement; returns the seconds waited."""
    procs = [psutil.Process(pid) for pid in pids]
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        for p in procs:
            p.cpu_percent()
        time.sleep(1.0)
        if all(p.cpu_percent() < busy_percent for p in procs):
            break
    return time.perf_counter() - start


def machine_info() -> dict:
    """What the numbers were measured on, including how loaded the (shared) machine was."""
    import faiss
    import grpc
    import torch

    mem = psutil.virtual_memory()
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "memory_total_gb": round(mem.total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "grpcio": grpc.__version__,
        "native_bf16": cpu_has_native_bf16(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def ratio(a: float, b: float) -> float | None:
    """a / b rounded, None when b is zero (nothing measured)."""
    return round(a / b, 3) if b else None
