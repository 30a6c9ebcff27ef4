"""What the RPC tests share: a call that must fail with a status, the stored state a failed call
must leave unchanged, the 12-item corpus, and metric samples."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc
from retrieval_server.config import ServerConfig
from retrieval_server.metrics import ServerMetrics
from retrieval_server.server import GrpcServer, load_service
from tests.server_harness import png_bytes

MAX_QUEUE, MAX_K, MAX_PIXELS = 16, 64, 4096
# The flags of the served instance (child process or in-process) the RPC tests expect.
LIMITS = {
    "max_queue": MAX_QUEUE,
    "max_k": MAX_K,
    "default_k": 20,
    "max_image_pixels": MAX_PIXELS,
    "max_message_mb": 1,
    "max_queue_delay_ms": 50,
    "decode_threads": 2,
}


def upsert(stub, *batches: list[pb.Item]) -> list[pb.UpsertAck]:
    return list(stub.Upsert(iter([pb.UpsertRequest(items=b) for b in batches])))


def all_ids(stub) -> list[str]:
    """Every stored id (a zero vector is invalid, so search with a fixed random one and k=max)."""
    vector = pb.Vector(values=np.random.default_rng(0).standard_normal(512).tolist())
    return sorted(n.id for n in stub.Search(pb.SearchRequest(query=pb.Query(vector=vector), k=MAX_K)).neighbors)


def state(stub) -> tuple:
    """Everything a bad request must leave unchanged: counts, and every item with its embedding."""
    info = stub.Info(pb.InfoRequest())
    items = stub.Get(pb.GetRequest(ids=all_ids(stub), include_embedding=True)).items
    return info.item_count, dict(info.label_counts), [i.SerializeToString(deterministic=True) for i in items]


def expect(code: grpc.StatusCode, call, *args, match: str = "", **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kwargs)
        if not hasattr(result, "SerializeToString"):
            list(result)  # a response stream: errors surface while reading it
    assert err.value.code() == code, err.value.details()
    assert match.lower() in err.value.details().lower()
    return err.value


def load_corpus(stub) -> dict[str, bytes]:
    """12 items: a0..a11, labels cat (0-3), dog (4-7), none (8-11); metadata uri."""
    images = {f"a{i}": png_bytes(i) for i in range(12)}
    items = [
        pb.Item(id=i, image=img, label=("cat" if n < 4 else "dog" if n < 8 else ""), metadata={"uri": f"u/{i}"})
        for n, (i, img) in enumerate(images.items())
    ]
    acks = upsert(stub, items[:5], items[5:])
    assert [(a.sequence, a.upserted, a.failed) for a in acks] == [(0, 5, 0), (1, 7, 0)]
    return images


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(scraped: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lab), v in scraped.items() if n == name and wanted <= set(lab))


def png_truncated() -> bytes:
    data = png_bytes(7)
    return data[: len(data) // 2]


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")  # 10,000 px > MAX_PIXELS
    return buf.getvalue()


class InProcess:
    """The server in this process: the production wiring (GrpcServer), real encoder, store, index
    and batcher, called over gRPC on 127.0.0.1."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.metrics = ServerMetrics()
        self.grpc = GrpcServer(cfg, self.metrics, workers=16)
        self.service = load_service(cfg, self.metrics)
        self.grpc.attach(self.service)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc.port}")
        self.stub = pb_grpc.RetrievalStub(self.channel)

    def scrape(self) -> dict:
        return samples(generate_latest(self.metrics.registry).decode())

    def close(self) -> None:
        self.channel.close()
        self.grpc.server.stop(0).wait()
        self.grpc.serving.current.close()
