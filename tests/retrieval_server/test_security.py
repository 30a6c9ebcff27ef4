"""TLS, bearer tokens (full and read-only; health stays open) and configuration by environment
variables (flags win), against a real server with a self-signed certificate made by openssl,
serving a 128-d projection-head export."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from tests.server_harness import ServerProcess, make_export, png_bytes, self_signed_certificate

TOKEN, READ_ONLY = "s3cret-full", "s3cret-read"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("secure")
    cert, key = self_signed_certificate(root)
    (root / "token").write_text(TOKEN + "\n")
    env = {"RETRIEVAL_READ_ONLY_TOKEN": READ_ONLY, "RETRIEVAL_MAX_K": "33", "RETRIEVAL_DEFAULT_K": "7"}
    with ServerProcess(
        make_export(root, head_dim=128),
        root / "store",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--auth-token-file",
        root / "token",
        "--max-k",
        "44",
        env=env,
    ) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = server.channel(credentials)
        yield server, channel
        channel.close()


def _md(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def test_tls_and_health_without_token(secure) -> None:
    server, channel = secure
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with server.channel() as plaintext, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == Code.UNAVAILABLE


def test_tokens(secure) -> None:
    server, channel = secure
    stub = server.stub(channel)
    for metadata in (_md(None), _md("wrong"), [("authorization", TOKEN)]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(pb.InfoRequest(), metadata=metadata)
        assert err.value.code() == Code.UNAUTHENTICATED and "token" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Upsert(iter([pb.UpsertRequest(items=[pb.Item(id="x", image=png_bytes(0))])])))
    assert err.value.code() == Code.UNAUTHENTICATED

    items = [pb.Item(id=f"i{j}", image=png_bytes(j), label="a" if j < 2 else "") for j in range(4)]
    ack = next(stub.Upsert(iter([pb.UpsertRequest(items=items)]), metadata=_md(TOKEN)))
    assert ack.upserted == 4

    ro = _md(READ_ONLY)
    before = stub.Get(pb.GetRequest(ids=[i.id for i in items], include_embedding=True), metadata=ro)
    assert stub.Info(pb.InfoRequest(), metadata=ro).item_count == 4
    assert len(stub.Search(pb.SearchRequest(query=pb.Query(id="i0"), k=2), metadata=ro).neighbors) == 2
    assert stub.Classify(pb.ClassifyRequest(query=pb.Query(id="i3")), metadata=ro).label == "a"
    assert len(list(stub.LabelCorpus(pb.LabelCorpusRequest(), metadata=ro))) == 2
    embedded = stub.Embed(pb.EmbedRequest(images=[png_bytes(9)]), metadata=ro)
    assert embedded.dim == 128 and [len(e.values) for e in embedded.embeddings] == [128]
    writes = [
        lambda: list(stub.Upsert(iter([pb.UpsertRequest(items=[pb.Item(id="x", image=png_bytes(5))])]), metadata=ro)),
        lambda: stub.Delete(pb.DeleteRequest(ids=["i0"]), metadata=ro),
        lambda: stub.SetLabels(pb.SetLabelsRequest(assignments=[pb.LabelAssignment(id="i0", label="b")]), metadata=ro),
        lambda: list(stub.LabelCorpus(pb.LabelCorpusRequest(apply=True), metadata=ro)),
    ]
    for write in writes:
        with pytest.raises(grpc.RpcError) as err:
            write()
        assert err.value.code() == Code.PERMISSION_DENIED and "read-only" in err.value.details()
    assert stub.Get(pb.GetRequest(ids=[i.id for i in items], include_embedding=True), metadata=ro) == before
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'grpc_code="UNAUTHENTICATED"' in text and 'grpc_code="PERMISSION_DENIED"' in text


def test_environment_configures_and_flags_win(secure) -> None:
    server, channel = secure
    info = server.stub(channel).Info(pb.InfoRequest(), metadata=_md(READ_ONLY))
    assert info.default_k == 7  # RETRIEVAL_DEFAULT_K
    assert info.max_k == 44  # --max-k beats RETRIEVAL_MAX_K=33
    assert info.dim == 128
