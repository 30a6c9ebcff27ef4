"""Retrieval server benchmark: Search/Classify over gRPC against the same FAISS search in-process
(the limit) and Milvus Lite (a peer), and the same server on its milvus backend (server-milvus:
`--backend milvus` on a Milvus Lite file), at growing collection sizes and client concurrencies;
ingest rates; server memory and start-up time; Embed images/s with dynamic batching against a
direct batched forward.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/server_bench.py            # 10k, 100k, 1M vectors
    $BVENV/bin/python bench/server_bench.py --quick    # smoke run: 10k only, short cases

Every system is measured one after the other on the same vectors and queries, in one run, so the
ratios are comparable even on a noisy shared machine; absolute numbers are not. Results go to
bench/results/server_bench.json (rewritten after every stage) and a markdown summary is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

import faiss
import grpc
import numpy as np
import torch
from common import LoadResult, machine_info, ratio, rss_bytes, run_load, settle
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc
from moco_retrieval.architectures import build_backbone
from moco_retrieval.export import embed, load_export, make_export
from moco_retrieval.fileio import atomic_torch_save, atomic_write
from moco_retrieval.images import decode_image
from moco_retrieval.knn import knn_vote
from moco_retrieval.net import free_port
from moco_retrieval.onnx import OnnxEncoder, to_onnx
from moco_retrieval.preprocessing import Preprocessing, eval_transform
from retrieval_server.process import ServerProcess

REPO = Path(__file__).resolve().parent.parent
CHUNK = 10_000  # vectors are generated (and ingested) 10k at a time
NUM_CLASSES = 10
MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
# What stores the vectors ("server-bare" and "faiss-omp" are variants of server and faiss). server
# coalesces Search and Classify (--coalesce all), server-nc neither (--coalesce none); the default
# (--coalesce classify) answers Search as server-nc and Classify as server.
SYSTEMS = ("server", "server-nc", "server-milvus", "faiss", "milvus")
MILVUS_COLLECTION = "bench"
RESULTS = REPO / "bench" / "results" / "server_bench.json"
DEFAULT_SEARCH = "server-nc"  # the server that answers Search as the default configuration does


# ---------------------------------------------------------------- data
def chunk_vectors(seed: int, chunk: int, dim: int) -> np.ndarray:
    """Stored vectors [chunk*CHUNK, (chunk+1)*CHUNK): random, L2-normalised, reproducible per chunk."""
    x = np.random.default_rng([seed, chunk]).standard_normal((CHUNK, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def label_of(i: int, label_every: int) -> str:
    """Every label_every-th vector carries one of NUM_CLASSES labels; the others none ("")."""
    return f"class{(i // label_every) % NUM_CLASSES}" if i % label_every == 0 else ""


def item_id(i: int) -> str:
    return f"v{i:07d}"


# ---------------------------------------------------------------- the systems
class BenchServer(ServerProcess):
    """The shared launcher, plus what the benchmark reads off the running server. Start-up time is
    spawn to ready file (health is SERVING by then); stop() is SIGTERM's graceful drain + snapshot."""

    def __init__(self, model: Path, store: Path, work: Path, extra: list[str]) -> None:
        super().__init__(model, store, *extra, cwd=REPO, log_dir=work, timeout=1800.0)

    def stop_timed(self) -> tuple[float, int]:
        """SIGTERM (graceful: flush + snapshot); returns (seconds to exit, exit code)."""
        start = time.perf_counter()
        code = self.stop(signal.SIGTERM, timeout=600)
        return time.perf_counter() - start, code

    def rss(self) -> int:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples, summed over labels."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out


def packed(x: np.ndarray) -> pb.Vector:
    return pb.Vector(data=np.ascontiguousarray(x, dtype="<f4").tobytes())


class ServerTarget:
    """Our server over gRPC with the raw generated stubs (no client-library overhead), vectors
    packed as the client library sends them; `neighbors`: Classify's ClassifyRequest.neighbors
    (None: all k, the default; 0: the vote alone)."""

    def __init__(self, port: int, upsert_batch: int, neighbors: int | None = None) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self.upsert_batch = upsert_batch
        self.neighbors = neighbors

    def add(self, start: int, x: np.ndarray, labels: list[str]) -> None:
        def requests():
            for s in range(0, len(x), self.upsert_batch):
                yield pb.UpsertRequest(
                    items=[
                        pb.Item(id=item_id(start + j), embedding=packed(x[j]), label=labels[j])
                        for j in range(s, min(s + self.upsert_batch, len(x)))
                    ]
                )

        failed = sum(ack.failed for ack in self.stub.Upsert(requests()))
        if failed:
            raise RuntimeError(f"server rejected {failed} items")

    def search_call(self, queries: np.ndarray, k: int) -> Callable[[int], list[int]]:
        reqs = [pb.SearchRequest(query=pb.Query(vector=packed(q)), k=k) for q in queries]
        return lambda i: [int(n.id[1:]) for n in self.stub.Search(reqs[i % len(reqs)], timeout=600).neighbors]

    def search_batch_call(self, queries: np.ndarray, k: int, nq: int) -> Callable[[int], list[list[int]]]:
        """SearchBatch calls of nq queries each (consecutive slices of `queries`)."""
        reqs = [
            pb.SearchBatchRequest(queries=[pb.Query(vector=packed(q)) for q in queries[s : s + nq]], k=k)
            for s in range(0, len(queries) - nq + 1, nq)
        ]

        def call(i: int) -> list[list[int]]:
            results = self.stub.SearchBatch(reqs[i % len(reqs)], timeout=600).results
            return [[int(n.id[1:]) for n in r.neighbors] for r in results]

        return call

    def classify_call(self, queries: np.ndarray, k: int, tau: float) -> Callable[[int], str]:
        reqs = [pb.ClassifyRequest(query=pb.Query(vector=packed(q)), k=k, tau=tau) for q in queries]
        if self.neighbors is not None:
            for r in reqs:
                r.neighbors = self.neighbors
        return lambda i: self.stub.Classify(reqs[i % len(reqs)], timeout=600).label

    def close(self) -> None:
        self.channel.close()


class FaissTarget:
    """The same exact inner-product search in-process: the floor any server can reach. Classify is
    the labelled-only search plus the shared InstDisc vote (moco_retrieval.knn)."""

    def __init__(self, dim: int, threads: int = 1, shares: FaissTarget | None = None) -> None:
        """`threads`: OpenMP threads per query (set in each calling thread); `shares`: another
        FaissTarget whose indexes this one searches (the same data, another thread count)."""
        self.threads = threads
        self.all = shares.all if shares else faiss.IndexFlatIP(dim)
        self.labelled = shares.labelled if shares else faiss.IndexFlatIP(dim)
        self._classes = np.zeros(0, dtype=np.int64)
        self.shares = shares

    @property
    def classes(self) -> np.ndarray:
        return self.shares.classes if self.shares else self._classes

    def add(self, start: int, x: np.ndarray, labels: list[str]) -> None:
        self.all.add(x)
        mask = np.array([bool(lab) for lab in labels])
        self.labelled.add(np.ascontiguousarray(x[mask]))
        self._classes = np.concatenate([self._classes, [int(lab[5:]) for lab in np.asarray(labels)[mask]]])

    def search_call(self, queries: np.ndarray, k: int) -> Callable[[int], list[int]]:
        def call(i: int) -> list[int]:
            faiss.omp_set_num_threads(self.threads)
            j = i % len(queries)
            return self.all.search(queries[j : j + 1], k)[1][0].tolist()

        return call

    def search_batch_call(self, queries: np.ndarray, k: int, nq: int) -> Callable[[int], list[list[int]]]:
        """One FAISS search of nq queries per call (the same slices as the server's SearchBatch)."""
        starts = list(range(0, len(queries) - nq + 1, nq))

        def call(i: int) -> list[list[int]]:
            faiss.omp_set_num_threads(self.threads)
            s = starts[i % len(starts)]
            return self.all.search(queries[s : s + nq], k)[1].tolist()

        return call

    def classify_call(self, queries: np.ndarray, k: int, tau: float) -> Callable[[int], str]:
        def call(i: int) -> str:
            faiss.omp_set_num_threads(self.threads)
            j = i % len(queries)
            sims, idx = self.labelled.search(queries[j : j + 1], k)
            votes = knn_vote(torch.from_numpy(sims), torch.from_numpy(self.classes[idx]), NUM_CLASSES, tau)
            return f"class{int(votes.argmax())}"

        return call


class MilvusTarget:
    """Milvus Lite (`python -m milvus_lite server`, its own process like ours) through pymilvus;
    FLAT index with IP metric; Classify = labelled-only filtered search + the same vote."""

    def __init__(self, work: Path, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(work / "milvus"), "--port", str(port)],
            stdout=open(work / "milvus.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.perf_counter() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"Milvus Lite did not start; see {work / 'milvus.log'}") from None
                time.sleep(0.1)
        self.client = MilvusClient(uri=f"http://127.0.0.1:{port}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("label", DataType.VARCHAR, max_length=64)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vec", index_type="FLAT", metric_type="IP")
        if self.client.has_collection(MILVUS_COLLECTION):
            self.client.drop_collection(MILVUS_COLLECTION)
        self.client.create_collection(MILVUS_COLLECTION, schema=schema, index_params=index)
        self.client.load_collection(MILVUS_COLLECTION)

    def add(self, start: int, x: np.ndarray, labels: list[str]) -> None:
        for s in range(0, len(x), 2000):
            rows = [{"pk": start + j, "vec": x[j], "label": labels[j]} for j in range(s, min(s + 2000, len(x)))]
            self.client.insert(MILVUS_COLLECTION, rows)
        self.client.flush(MILVUS_COLLECTION)

    def _search(self, q: list[list[float]], k: int, flt: str = "") -> list:
        return self.client.search(
            MILVUS_COLLECTION, data=q, limit=k, filter=flt, output_fields=["label"], search_params={"metric_type": "IP"}
        )[0]

    def search_call(self, queries: np.ndarray, k: int) -> Callable[[int], list[int]]:
        data = [[q.tolist()] for q in queries]
        return lambda i: [int(hit["pk"]) for hit in self._search(data[i % len(data)], k)]

    def classify_call(self, queries: np.ndarray, k: int, tau: float) -> Callable[[int], str]:
        data = [[q.tolist()] for q in queries]

        def call(i: int) -> str:
            hits = self._search(data[i % len(data)], k, 'label != ""')
            sims = torch.tensor([[hit["distance"] for hit in hits]])
            classes = torch.tensor([[int(hit["entity"]["label"][5:]) for hit in hits]])
            return f"class{int(knn_vote(sims, classes, NUM_CLASSES, tau).argmax())}"

        return call

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=120)


# ---------------------------------------------------------------- stages
def make_model(path: Path, dim: int) -> Path:
    """A resnet18 export with the CIFAR stem and random weights (speed does not depend on the
    weights): 512-d pooled features, or another dim through a MoCo projection head, as
    `moco-train export --keep-head` serves (128-d for --moco-dim 128)."""
    head = "none" if dim == 512 else "linear"
    model = build_backbone("resnet18", cifar_stem=True, head=head, head_dim=dim)
    atomic_torch_save(
        make_export(
            model.state_dict(),
            arch="resnet18",
            cifar_stem=True,
            keep_head=head != "none",
            preprocessing=Preprocessing.for_input_size(32),
            source="bench/server_bench.py (random weights)",
        ),
        path,
    )
    return path


def demo_images(n: int) -> list[bytes]:
    paths = sorted((REPO / "data" / "demo").glob("*/*/*.jpg"))
    if not paths:
        raise SystemExit("error: data/demo is missing: run scripts/make_demo_sample.py")
    return [paths[i % len(paths)].read_bytes() for i in range(n)]


def direct_embed(
    forward: Callable[[torch.Tensor], object], transform: Callable, images: list[bytes], batch_size: int, max_s: float
) -> tuple[float, float]:
    """(images/s with decoding + preprocessing, images/s of the forward alone) in-process, batched."""
    forward_s, done = 0.0, 0
    start = time.perf_counter()
    while done < len(images) and time.perf_counter() - start < max_s:
        batch = torch.stack([transform(decode_image(b)) for b in images[done : done + batch_size]])
        t = time.perf_counter()
        forward(batch)
        forward_s += time.perf_counter() - t
        done += len(batch)
    return done / (time.perf_counter() - start), done / forward_s


def onnx_forward(encoder: OnnxEncoder, batch: torch.Tensor) -> np.ndarray:
    return encoder(batch.numpy())


def bench_embed(
    server: ServerTarget,
    process: BenchServer,
    model: Path,
    images: list[bytes],
    concurrencies: list[int],
    batch_sizes: list[int],
    case_s: float,
    rounds: int,
) -> dict:
    """Single-image Embed calls from N threads (dynamic batching on the server) vs the same model
    in-process: decode + eval preprocessing + batched forward, and the batched forward alone, at
    several batch sizes and with 1 or all torch threads; the best is the baseline (on a busy CPU
    neither a big batch nor more threads is always faster). Direct and server cases alternate for
    `rounds` rounds and medians are compared, so a burst of load from elsewhere on the machine
    does not land on one side only."""
    net, meta = load_export(model)
    transform = eval_transform(meta.preprocessing)
    default_threads = torch.get_num_threads()
    onnx_model = to_onnx(net, meta)
    runtimes: dict[tuple[str, int], Callable] = {}
    for t in sorted({1, default_threads}):
        runtimes["torch", t] = partial(embed, net)
        runtimes["onnx", t] = partial(onnx_forward, OnnxEncoder(onnx_model, threads=t))
    configs = [(rt, t, b) for rt, t in runtimes for b in batch_sizes]
    for (_, t), forward in runtimes.items():  # warm-up
        torch.set_num_threads(t)
        with torch.inference_mode():
            direct_embed(forward, transform, images[: max(batch_sizes)], max(batch_sizes), case_s)
    reqs = [pb.EmbedRequest(images=[b], packed=True) for b in images]
    direct: dict[tuple[str, int, int], list[tuple[float, float]]] = {cfg: [] for cfg in configs}
    served: dict[int, list[LoadResult]] = {c: [] for c in concurrencies}
    batching: dict[int, list[tuple[float, float]]] = {c: [] for c in concurrencies}
    for r in range(rounds):
        for rt, threads, b in configs:
            torch.set_num_threads(threads)
            with torch.inference_mode():  # as the server's encoder
                direct[rt, threads, b].append(direct_embed(runtimes[rt, threads], transform, images, b, case_s))
            print(
                f"  embed round {r}: direct {rt} {threads} thread(s) batch {b} "
                f"{direct[rt, threads, b][-1][0]:.1f} img/s ({direct[rt, threads, b][-1][1]:.1f} forward only)",
                flush=True,
            )
        torch.set_num_threads(default_threads)
        for c in concurrencies:
            before = process.metrics()
            res = run_load(lambda i: server.stub.Embed(reqs[i % len(reqs)], timeout=600), c, len(images), case_s)
            after = process.metrics()
            delta = {
                name: after[name] - before.get(name, 0.0)
                for name in (
                    "retrieval_batch_size_sum",
                    "retrieval_batch_size_count",
                    "retrieval_inference_seconds_sum",
                )
            }
            # mean images per forward, and images/s of the server's forwards alone (its metrics)
            batching[c].append(
                (
                    delta["retrieval_batch_size_sum"] / delta["retrieval_batch_size_count"],
                    delta["retrieval_batch_size_sum"] / delta["retrieval_inference_seconds_sum"],
                )
            )
            served[c].append(res)
            print(
                f"  embed round {r}: server c={c} {res.qps:.1f} img/s p50 {res.p50_ms:.1f} ms, "
                f"mean batch {batching[c][-1][0]:.1f}, forward {batching[c][-1][1]:.1f} img/s",
                flush=True,
            )
    out: dict = {"images": len(images), "rounds": rounds, "direct": [], "server": []}
    for (rt, threads, b), runs in direct.items():
        out["direct"].append(
            {
                "runtime": rt,
                "torch_threads": threads,
                "batch_size": b,
                "end_to_end_images_per_s": round(float(np.median([d[0] for d in runs])), 2),
                "forward_only_images_per_s": round(float(np.median([d[1] for d in runs])), 2),
                "rounds": [[round(e2e, 2), round(fwd, 2)] for e2e, fwd in runs],
            }
        )
    for c, runs in served.items():
        mid = sorted(runs, key=lambda res: res.qps)[len(runs) // 2]
        out["server"].append(
            mid.to_dict()
            | {
                "images_per_s": round(mid.qps, 2),
                "rounds_images_per_s": [round(res.qps, 2) for res in runs],
                "mean_batch_size": round(float(np.median([b[0] for b in batching[c]])), 2),
                "server_forward_only_images_per_s": round(float(np.median([b[1] for b in batching[c]])), 2),
            }
        )
    best_direct = max(out["direct"], key=lambda d: d["end_to_end_images_per_s"])
    for rt in ("torch", "onnx"):
        out[f"direct_best_forward_only_{rt}"] = max(
            d["forward_only_images_per_s"] for d in out["direct"] if d["runtime"] == rt
        )
    out["onnx_over_torch_forward_only"] = ratio(
        out["direct_best_forward_only_onnx"], out["direct_best_forward_only_torch"]
    )
    best = max(r["images_per_s"] for r in out["server"])
    out["direct_best"] = best_direct
    out["server_best_over_direct_best_end_to_end"] = ratio(best, best_direct["end_to_end_images_per_s"])
    out["server_best_over_direct_best_forward_only"] = ratio(best, best_direct["forward_only_images_per_s"])
    return out


def agreement(calls: dict[str, Callable[[int], list[int]]], n: int) -> dict:
    """Share of the in-process top-k ids each system returns (1.0 for exact search), and whether a
    stored vector finds itself first, on n queries."""
    ref = calls["faiss"]
    out = {}
    for name, call in calls.items():
        overlap = [len(set(call(i)) & set(ref(i))) / len(ref(i)) for i in range(n)]
        out[name] = round(float(np.mean(overlap)), 4)
    return out


def grpc_floor(srv: ServerTarget, args: argparse.Namespace) -> list[dict]:
    """The round trip of the cheapest call the server answers (grpc.health.v1 Check: no store, no
    index): what any RPC costs before it does its work, at each client concurrency."""
    health = health_pb2_grpc.HealthStub(srv.channel)
    request = health_pb2.HealthCheckRequest(service="")
    out = []
    for c in args.concurrency:
        res = run_load(lambda i: health.Check(request, timeout=60), c, args.max_calls, args.case_seconds, warmup=2)
        print(f"  gRPC floor (health Check) c={c:<3} {res.qps:9.1f} qps  p50 {res.p50_ms:8.3f} ms", flush=True)
        out.append(res.to_dict())
    return out


def bench_size(targets: dict, size: int, queries: np.ndarray, args: argparse.Namespace) -> dict:
    """Search and Classify at every concurrency, the systems interleaved case by case."""
    out: dict = {"size": size, "loadavg_before": [round(x, 2) for x in os.getloadavg()], "search": [], "classify": []}
    for op in ("search", "classify"):
        for c in args.concurrency:
            row: dict = {"concurrency": c}
            for name, target in targets.items():
                if op == "search" and name == "server-bare":
                    continue  # the neighbours switch is Classify's
                call = (
                    target.search_call(queries, args.k)
                    if op == "search"
                    else target.classify_call(queries, args.classify_k, args.tau)
                )
                res: LoadResult = run_load(call, c, args.max_calls, args.case_seconds, warmup=2)
                row[name] = res.to_dict()
                print(
                    f"  {size:>8} {op:8} c={c:<3} {name:7} {res.qps:9.1f} qps  p50 {res.p50_ms:8.2f} ms  "
                    f"p99 {res.p99_ms:8.2f} ms  ({res.calls} calls)",
                    flush=True,
                )
            if "faiss" in row:
                # The floor: in-process FAISS with the better of 1 thread per query and all cores.
                floors = [row[n] for n in ("faiss", "faiss-omp") if n in row]
                best_p50, best_qps = min(f["p50_ms"] for f in floors), max(f["qps"] for f in floors)
                row["overhead_p50_server_over_faiss"] = ratio(row["server"]["p50_ms"], best_p50)
                row["qps_faiss_over_server"] = ratio(best_qps, row["server"]["qps"])
                if "server-bare" in row:
                    row["overhead_p50_bare_over_faiss"] = ratio(row["server-bare"]["p50_ms"], best_p50)
            if "milvus" in row:
                row["qps_server_over_milvus"] = ratio(row["server"]["qps"], row["milvus"]["qps"])
                row["p50_milvus_over_server"] = ratio(row["milvus"]["p50_ms"], row["server"]["p50_ms"])
            if "server-milvus" in row:  # the backend choice: embedded (server) against milvus
                row["p50_server_milvus_over_server"] = ratio(row["server-milvus"]["p50_ms"], row["server"]["p50_ms"])
                row["qps_server_over_server_milvus"] = ratio(row["server"]["qps"], row["server-milvus"]["qps"])
            if "server-nc" in row:  # coalescing on (server) against off
                row["qps_server_over_server_nc"] = ratio(row["server"]["qps"], row["server-nc"]["qps"])
                row["p50_server_over_server_nc"] = ratio(row["server"]["p50_ms"], row["server-nc"]["p50_ms"])
            out[op].append(row)
    out["search_batch"] = bench_batch(targets, size, queries, args)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def bench_batch(targets: dict, size: int, queries: np.ndarray, args: argparse.Namespace) -> dict:
    """SearchBatch of args.batch_queries queries per call against in-process FAISS searching the
    same queries as one batch (1 thread and all threads): the cost per query, one client."""
    nq = args.batch_queries
    row: dict = {"queries_per_call": nq}
    for name in ("server", "faiss", "faiss-omp"):
        res = run_load(targets[name].search_batch_call(queries, args.k, nq), 1, args.max_calls, args.case_seconds)
        row[name] = res.to_dict() | {"per_query_ms": round(res.p50_ms / nq, 4)}
        print(f"  {size:>8} batch{nq}  {name:9} per query {res.p50_ms / nq:8.4f} ms  ({res.calls} calls)", flush=True)
    best = min(row[n]["per_query_ms"] for n in ("faiss", "faiss-omp"))
    row["per_query_server_over_faiss"] = ratio(row["server"]["per_query_ms"], best)
    return row


def p50(size_row: dict, op: str, concurrency: int, system: str) -> float:
    return next(r[system]["p50_ms"] for r in size_row[op] if r["concurrency"] == concurrency)


def target_table(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value, from this run's figures alone, for the
    server's default configuration: Search as server-nc answers it, Classify as server does."""
    floor1 = next(f["p50_ms"] for f in results["grpc_floor"] if f["concurrency"] == 1)
    rows = []

    def add(measure: str, size: int | None, target: str, value: float, limit: float, at_least: bool = False) -> None:
        met = value >= limit if at_least else value <= limit
        rows.append({"measure": measure, "size": size, "target": target, "measured": round(value, 4), "met": met})

    for z in results["sizes"]:
        size = z["size"]
        faiss1 = min(p50(z, "search", 1, n) for n in ("faiss", "faiss-omp"))
        limit = floor1 + 1.2 * faiss1
        add(
            "single Search p50 ms",
            size,
            f"<= floor + 1.2 x FAISS = {limit:.3f} ms",
            p50(z, "search", 1, DEFAULT_SEARCH),
            limit,
        )
        add(
            f"SearchBatch ({z['search_batch']['queries_per_call']} queries) per query / FAISS batch per query",
            size,
            "<= 1.3",
            z["search_batch"]["per_query_server_over_faiss"],
            1.3,
        )
        c16 = [r for r in z["search"] if r["concurrency"] == 16]
        if c16:
            value = ratio(c16[0][DEFAULT_SEARCH]["qps"], c16[0]["faiss"]["qps"])
            add("Search QPS, 16 clients / 16 threads of single-query FAISS", size, ">= 1.0", value, 1.0, at_least=True)
        vote1 = p50(z, "classify", 1, "faiss")  # labelled-only FAISS search + the vote
        limit = 2 * (floor1 + vote1)
        add(
            "Classify k=200 with 200 neighbours p50 ms",
            size,
            f"<= 2 x (floor + FAISS + vote) = {limit:.3f} ms",
            p50(z, "classify", 1, "server"),
            limit,
        )
    embed = results["embed"]
    e64 = next((r for r in embed["server"] if r["concurrency"] == 64), None)
    if e64 is not None:
        value = ratio(e64["images_per_s"], embed["direct_best"]["end_to_end_images_per_s"])
        add("Embed, 64 single-image clients / best direct batched forward", None, ">= 0.9", value, 0.9, at_least=True)
    biggest = results["sizes"][-1]
    add(
        f"ingest items/s up to {biggest['size']}",
        biggest["size"],
        ">= 27,000",
        biggest["ingest_items_per_s"]["server"],
        27_000,
        at_least=True,
    )
    return rows


# ---------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']['nproc']} CPUs, shared; dimension {results['settings']['dim']}; "
        f"Search k={results['settings']['k']}, Classify k={results['settings']['classify_k']}. "
        "Ratios are the result; absolute numbers are noisy.",
        "",
    ]
    for op in ("search", "classify"):
        systems = [
            s for s in results["settings"]["systems"] if any(s in row for z in results["sizes"] for row in z[op])
        ]
        head = "| vectors | clients | " + " | ".join(f"{s} QPS | {s} p50/p99 ms" for s in systems)
        head += " | server p50 / best FAISS p50 | server QPS / Milvus QPS | server-milvus p50 / server p50 |"
        if op == "classify":
            head += " server-bare p50 / best FAISS p50 |"
        lines += [
            f"**{op.capitalize()}** (over gRPC vs in-process FAISS vs Milvus Lite)",
            "",
            head,
            "|" + "---|" * (head.count("|") - 1),
        ]
        for size in results["sizes"]:
            for row in size[op]:
                cells = [f"{row[s]['qps']:.1f} | {row[s]['p50_ms']:.2f} / {row[s]['p99_ms']:.2f}" for s in systems]
                lines.append(
                    f"| {size['size']:,} | {row['concurrency']} | "
                    + " | ".join(cells)
                    + f" | {row.get('overhead_p50_server_over_faiss', '-')} | "
                    f"{row.get('qps_server_over_milvus', '-')} | {row.get('p50_server_milvus_over_server', '-')} |"
                    + (f" {row.get('overhead_p50_bare_over_faiss', '-')} |" if op == "classify" else "")
                )
        lines.append("")
    lines += [
        "**SearchBatch** (one client; cost per query)",
        "",
        "| vectors | queries per call | server ms/query | FAISS 1 thread ms/query | FAISS all threads ms/query | "
        "server / best FAISS |",
        "|---|---|---|---|---|---|",
    ]
    for size in results["sizes"]:
        b = size.get("search_batch")
        if b:
            lines.append(
                f"| {size['size']:,} | {b['queries_per_call']} | {b['server']['per_query_ms']} | "
                f"{b['faiss']['per_query_ms']} | {b['faiss-omp']['per_query_ms']} | "
                f"{b['per_query_server_over_faiss']} |"
            )
    lines.append("")
    if results.get("targets"):
        lines += ["**Targets**", "", "| measure | vectors | target | measured | met |", "|---|---|---|---|---|"]
        for t in results["targets"]:
            size = f"{t['size']:,}" if t["size"] else "-"
            lines.append(
                f"| {t['measure']} | {size} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |"
            )
        lines.append("")
    lines += [
        "**Memory and ingest**",
        "",
        "| vectors | server RSS MB | RSS over empty / raw vectors | "
        "store on disk MB | server ingest items/s | server-milvus ingest items/s | Milvus ingest items/s | "
        "Milvus RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in results["sizes"]:
        m = size["memory"]
        lines.append(
            f"| {size['size']:,} | {m['server_rss_mb']} | {m['server_rss_over_empty_per_raw']} | "
            f"{m['store_disk_mb']} | {size['ingest_items_per_s'].get('server', '-')} | "
            f"{size['ingest_items_per_s'].get('server-milvus', '-')} | "
            f"{size['ingest_items_per_s'].get('milvus', '-')} | {m.get('milvus_rss_mb', '-')} |"
        )
    lines.append("")
    if "grpc_floor" in results:
        floor = ", ".join(f"{r['concurrency']} clients p50 {r['p50_ms']} ms" for r in results["grpc_floor"])
        lines.append(f"gRPC floor (health Check, no store or index work): {floor}.")
    if "restart" in results:
        r = results["restart"]
        lines.append(
            f"Start-up on a store of {r['items']:,} items: {r['startup_s']} s to SERVING "
            f"(empty store: {results['startup_empty_s']} s); RSS after restart {r['rss_mb']} MB."
        )
    if "embed" in results:
        e = results["embed"]
        per_c = ", ".join(
            f"{r['concurrency']} clients {r['images_per_s']} (mean batch {r['mean_batch_size']})" for r in e["server"]
        )
        d = e["direct_best"]
        lines.append(
            f"Embed images/s over gRPC (single-image calls, dynamic batching): {per_c}; direct in-process, "
            f"best of torch and ONNX Runtime x batch sizes "
            f"{'/'.join(str(b) for b in sorted({x['batch_size'] for x in e['direct']}))} x 1 or all threads "
            f"({d.get('runtime', 'torch')}, {d['torch_threads']} thread(s), batch {d['batch_size']}): "
            f"{d['end_to_end_images_per_s']} with decoding, {d['forward_only_images_per_s']} forward only "
            f"(best server / best direct: {e['server_best_over_direct_best_end_to_end']})."
        )
        if "onnx_over_torch_forward_only" in e:
            lines.append(
                f"Direct forward, best of each runtime: ONNX Runtime {e['direct_best_forward_only_onnx']} img/s, "
                f"torch {e['direct_best_forward_only_torch']} img/s ({e['onnx_over_torch_forward_only']}x)."
            )
    return "\n".join(lines)


def write(results: dict, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", action="store_true", help="only print the markdown summary of an existing --out JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: 10k vectors, short cases, fewer images")
    p.add_argument("--sizes", default="10000,100000,1000000", help="stored vector counts (multiples of 10k)")
    p.add_argument("--concurrency", default="1,4,16", help="client threads for Search/Classify")
    p.add_argument("--embed-concurrency", default="1,16,64", help="client threads for single-image Embed")
    p.add_argument("--embed-images", type=int, default=512, help="images per Embed case")
    p.add_argument("--direct-batch-sizes", default="8,64", help="in-process forward batch sizes (best wins)")
    p.add_argument("--embed-seconds", type=float, default=8.0, help="time budget per Embed case")
    p.add_argument("--embed-rounds", type=int, default=3, help="alternating direct/server Embed rounds (median)")
    p.add_argument("--k", type=int, default=10, help="Search k")
    p.add_argument("--batch-queries", type=int, default=64, help="queries per SearchBatch call")
    p.add_argument("--classify-k", type=int, default=200, help="Classify k (InstDisc default)")
    p.add_argument("--tau", type=float, default=0.07, help="Classify temperature (InstDisc default)")
    p.add_argument("--label-share", type=float, default=0.1, help="share of stored vectors with a label")
    p.add_argument("--case-seconds", type=float, default=12.0, help="time budget per measured case")
    p.add_argument("--max-calls", type=int, default=2000, help="calls per measured case at most")
    p.add_argument("--queries", type=int, default=500, help="distinct random query vectors")
    p.add_argument("--upsert-batch", type=int, default=1000, help="items per Upsert stream message")
    p.add_argument("--max-batch-size", type=int, default=64, help="server --max-batch-size (dynamic batching)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="server --max-queue-delay-ms")
    p.add_argument("--model", type=Path, help="export to serve (default: a random-weight resnet18, CIFAR stem)")
    p.add_argument(
        "--dim",
        type=int,
        default=128,
        help="vector dimension of the default model: 128 (MoCo "
        "projection head, `moco-train export --keep-head`) or 512 (resnet18 pooled features)",
    )
    p.add_argument("--no-milvus", action="store_true", help="leave Milvus Lite out (as a peer and as our backend)")
    p.add_argument("--work-dir", type=Path, help="store, Milvus data and logs (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        help="results JSON (default: bench/results/server_bench.json; with --quick "
        "the work dir, so a smoke run never replaces the committed results)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.concurrency, args.embed_concurrency = "10000", "1,4", "1,16"
        args.embed_images, args.case_seconds, args.max_calls, args.queries = 128, 2.0, 300, 100
        args.embed_rounds, args.embed_seconds = 1, 2.0
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if any(s <= 0 or s % CHUNK for s in args.sizes) or args.sizes != sorted(args.sizes):
        p.error(f"--sizes must be increasing multiples of {CHUNK}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.embed_concurrency = [int(c) for c in args.embed_concurrency.split(",")]
    args.direct_batch_sizes = [int(b) for b in args.direct_batch_sizes.split(",")]
    if not 0 < args.label_share <= 1:
        p.error("--label-share must be in (0, 1]")
    return args


def server_flags(args: argparse.Namespace) -> list[str]:
    return ["--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms)]


def describe(args: argparse.Namespace, info: pb.InfoResponse, label_every: int) -> dict:
    dim = info.dim
    return {
        "quick": args.quick,
        "dim": dim,
        "k": args.k,
        "classify_k": args.classify_k,
        "tau": args.tau,
        "label_share": 1 / label_every,
        "num_classes": NUM_CLASSES,
        "concurrency": args.concurrency,
        "case_seconds": args.case_seconds,
        "max_calls": args.max_calls,
        "queries": args.queries,
        "upsert_batch": args.upsert_batch,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "server_index": f"{info.index_type} on {info.index_device}",
        "model": f"{info.arch}, input {info.input_size}px, encoder on {info.model_device}",
        "systems": ["server", "server-nc", "server-bare", "faiss", "faiss-omp"]
        + ([] if args.no_milvus else ["server-milvus", "milvus"]),
        "dim_note": (
            f"Every system stores the served model's {dim}-d vectors ({info.arch}; 128-d is the MoCo "
            "projection head kept by `moco-train export --keep-head`, 512-d the pooled features). "
            "Memory is reported relative to the raw vectors."
        ),
        "milvus_note": "Milvus Lite 3.x: pure-Python gRPC server (own process here), FLAT = numpy brute force.",
        "faiss_note": "in-process IndexFlatIP, one query per call from the same client threads; Classify adds "
        "the labelled-only search and the shared InstDisc vote",
        "client": "raw generated gRPC stubs, one channel shared by the client threads",
        "coalesce_note": "server: --coalesce all (Search and Classify coalesced); server-nc: --coalesce none; "
        "the targets use the default (--coalesce classify): Search as server-nc, Classify as server",
    }


def ingest(targets: dict, seed: int, dim: int, stored: int, size: int, label_every: int) -> dict[str, int]:
    """Add vectors [stored, size) to every system, chunk by chunk; items/s per system."""
    seconds = {name: 0.0 for name in targets}
    for chunk in range(stored // CHUNK, size // CHUNK):
        x = chunk_vectors(seed, chunk, dim)
        labels = [label_of(chunk * CHUNK + j, label_every) for j in range(CHUNK)]
        for name, target in targets.items():
            t = time.perf_counter()
            target.add(chunk * CHUNK, x, labels)
            seconds[name] += time.perf_counter() - t
    print(f"{size} vectors stored; ingest s: " + ", ".join(f"{n} {s:.1f}" for n, s in seconds.items()), flush=True)
    return {name: round((size - stored) / s) for name, s in seconds.items()}


def memory(server: BenchServer, targets: dict, size: int, dim: int, empty_rss_mb: float) -> dict:
    """Server RSS against the raw float32 vectors it holds (the issue's yardstick: about 2x plus the model)."""
    raw_mb = size * dim * 4 / 2**20
    rss_mb = server.rss() / 2**20
    out = {
        "raw_vectors_mb": round(raw_mb, 1),
        "server_rss_mb": round(rss_mb, 1),
        "server_rss_over_empty_per_raw": round((rss_mb - empty_rss_mb) / raw_mb, 3),
        "store_disk_mb": round(sum(f.stat().st_size for f in server.store.rglob("*") if f.is_file()) / 2**20, 1),
    }
    if "milvus" in targets:
        out["milvus_rss_mb"] = round(targets["milvus"].rss() / 2**20, 1)
    return out


def restart(server: BenchServer) -> dict:
    """Graceful stop, then start-up on the same store (snapshot + later rows) until SERVING."""
    stop_s, code = server.stop_timed()
    startup = server.start().startup_seconds
    srv = ServerTarget(server.port, 1)
    count = srv.stub.Info(pb.InfoRequest()).item_count
    srv.close()
    out = {
        "items": int(count),
        "shutdown_s": round(stop_s, 3),
        "shutdown_exit_code": code,
        "startup_s": round(startup, 3),
        "rss_mb": round(server.rss() / 2**20, 1),
    }
    server.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summary:
        print(markdown(json.loads((args.out or RESULTS).read_text())))
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="server_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    args.out = args.out or (work / "server_bench.json" if args.quick else RESULTS)
    model = args.model or make_model(work / "model.pt", args.dim)
    label_every = round(1 / args.label_share)
    server = BenchServer(
        model, work / "store", work, ["--index-factory", "Flat", "--coalesce", "all", *server_flags(args)]
    )
    results: dict = {"machine": machine_info(), "sizes": []}
    results["startup_empty_s"] = round(server.start().startup_seconds, 3)
    results["server_rss_empty_mb"] = round(server.rss() / 2**20, 1)
    srv = ServerTarget(server.port, args.upsert_batch)
    info = srv.stub.Info(pb.InfoRequest())
    dim = info.dim
    results["settings"] = describe(args, info, label_every)
    print(
        f"server up in {results['startup_empty_s']} s, dim {dim}, {info.index_type} on {info.index_device}", flush=True
    )

    results["grpc_floor"] = grpc_floor(srv, args)
    results["embed"] = bench_embed(
        srv,
        server,
        model,
        demo_images(args.embed_images),
        args.embed_concurrency,
        args.direct_batch_sizes,
        args.embed_seconds,
        args.embed_rounds,
    )
    write(results, args.out)

    one_thread = FaissTarget(dim, threads=1)
    targets: dict = {
        "server": srv,
        "server-bare": ServerTarget(server.port, args.upsert_batch, neighbors=0),  # Classify without neighbours
        "faiss": one_thread,
        "faiss-omp": FaissTarget(dim, threads=faiss.omp_get_max_threads(), shares=one_thread),
    }
    nc_server = BenchServer(
        model, work / "store-nc", work, ["--index-factory", "Flat", "--coalesce", "none", *server_flags(args)]
    )
    nc_server.start()
    targets["server-nc"] = ServerTarget(nc_server.port, args.upsert_batch)
    milvus_server = None
    if not args.no_milvus:
        targets["milvus"] = MilvusTarget(work, dim)
        milvus_server = BenchServer(
            model, work / "store-milvus", work, ["--backend", "milvus", "--milvus-uri", str(work / "server-milvus.db")]
        )
        milvus_server.start()
        targets["server-milvus"] = ServerTarget(milvus_server.port, args.upsert_batch)
    pids = [server.proc.pid, nc_server.proc.pid]
    pids += [t.proc.pid for t in (targets.get("milvus"), milvus_server) if t is not None]
    queries = chunk_vectors(args.seed + 1, 0, dim)[: args.queries]
    stored = 0
    for size in args.sizes:
        stores = {n: t for n, t in targets.items() if n in SYSTEMS}
        row: dict = {"ingest_items_per_s": ingest(stores, args.seed, dim, stored, size, label_every)}
        stored = size
        row["settle_s"] = round(settle(pids), 1)
        count = srv.stub.Info(pb.InfoRequest()).item_count
        if count != size:
            raise RuntimeError(f"server holds {count} items, expected {size}")
        row["top_k_agreement_with_faiss"] = agreement(
            {n: t.search_call(queries, args.k) for n, t in stores.items()}, min(20, len(queries))
        )
        row |= bench_size(targets, size, queries, args)
        row["memory"] = memory(server, targets, size, dim, results["server_rss_empty_mb"])
        results["sizes"].append(row)
        write(results, args.out)

    srv.close()
    targets["server-nc"].close()
    nc_server.stop()
    results["restart"] = restart(server)
    if "milvus" in targets:
        targets["milvus"].close()
        targets["server-milvus"].close()
        milvus_server.stop()
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = target_table(results)
    write(results, args.out)
    print("\n" + markdown(results))
    print(f"\nwritten {args.out}; work dir {work}")


if __name__ == "__main__":
    main()
