"""RetrievalClient against a real server in a child process (small real encoder, real store):
order, per-item failures, the message-size check, the in-flight bound, errors as status codes,
and an Upsert stream that survives a server killed and restarted mid-stream."""

from __future__ import annotations

import asyncio
import io
import signal
import threading
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from moco_retrieval.net import free_port
from retrieval_client import AsyncRetrievalClient, RetrievalClient, RetrievalError, UpsertItem
from tests.server_harness import ServerProcess, make_export

MAX_MESSAGE_MB = 1


def demo_images(
    demo_data: Path, classes: tuple[str, ...], per_class: int, split: str = "train"
) -> list[tuple[str, bytes]]:
    """(class, JPEG bytes) for the first `per_class` images of each class."""
    out = []
    for cls in classes:
        for path in sorted((demo_data / split / cls).glob("*.jpg"))[:per_class]:
            out.append((cls, path.read_bytes()))
    return out


def noise_png(side: int, seed: int = 0) -> bytes:
    """A PNG that does not compress: about 3 * side**2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    with ServerProcess(export, tmp_path_factory.mktemp("store"), "--max-message-mb", str(MAX_MESSAGE_MB)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with RetrievalClient(server.address, timeout=60) as c:
        yield c


def test_info_reports_the_limits(client):
    info = client.info()
    assert info.dim > 0 and info.max_k > 0 and info.max_batch_size > 0
    assert info.max_message_bytes == MAX_MESSAGE_MB * 1024 * 1024
    assert info.model_fingerprint


def test_embed_preserves_order(client, demo_data):
    (_, a), (_, b) = demo_images(demo_data, ("cat", "ship"), 1)
    emb = client.embed([a, b, a])
    assert emb.dtype == np.float32 and emb.shape == (3, client.info().dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-5)
    np.testing.assert_allclose(client.embed([b])[0], emb[1], atol=1e-4)
    assert not np.allclose(emb[0], emb[1], atol=1e-3)


def test_upsert_many_reports_item_failures_and_keeps_going(client, demo_data):
    images = demo_images(demo_data, ("dog",), 3)
    dim = client.info().dim
    items = [
        UpsertItem("fail/ok0", image=images[0][1], label="dog", metadata={"uri": "a"}),
        UpsertItem("fail/corrupt", image=b"this is not an image"),
        UpsertItem("fail/ok1", image=images[1][1]),
        UpsertItem("fail/wrong-dim", embedding=np.ones(dim + 1, np.float32)),
        UpsertItem("fail/vector", embedding=np.arange(dim, dtype=np.float32)),
        UpsertItem("fail/ok2", image=images[2][1]),
    ]
    result = client.upsert_many(items, batch_size=2)
    assert result.upserted == 4
    assert [(f.index, f.id, f.code) for f in result.failures] == [
        (1, "fail/corrupt", grpc.StatusCode.INVALID_ARGUMENT),
        (3, "fail/wrong-dim", grpc.StatusCode.INVALID_ARGUMENT),
    ]
    assert all(f.message for f in result.failures)
    got = client.get(["fail/ok2", "fail/vector", "fail/ok0"], include_embedding=True)
    assert [g.id for g in got] == ["fail/ok2", "fail/vector", "fail/ok0"]
    assert got[2].label == "dog" and got[2].metadata == {"uri": "a"}
    expected = np.arange(dim, dtype=np.float32) / np.linalg.norm(np.arange(dim, dtype=np.float32))
    np.testing.assert_allclose(got[1].embedding, expected, atol=1e-5)
    assert client.get(["fail/corrupt", "fail/wrong-dim"], ignore_missing=True) == []


def test_oversize_items_are_refused_before_sending_and_batches_fit_the_limit(client, demo_data):
    ((_, small),) = demo_images(demo_data, ("frog",), 1)
    big = noise_png(700)  # ~1.4 MB > 1 MiB
    medium = [noise_png(330, seed) for seed in range(5)]  # ~330 kB each: at most 3 per message
    assert len(big) > MAX_MESSAGE_MB * 1024 * 1024 > 3 * len(medium[0])
    items = [UpsertItem("size/small", image=small), UpsertItem("size/big", image=big)] + [
        UpsertItem(f"size/medium{i}", image=m) for i, m in enumerate(medium)
    ]
    result = client.upsert_many(items, batch_size=64)
    assert result.upserted == 6
    (failure,) = result.failures
    assert (failure.index, failure.id, failure.code) == (1, "size/big", grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "message limit" in failure.message
    assert len(client.get([i.id for i in items], ignore_missing=True)) == 6


def test_upsert_many_bounds_the_batches_in_flight(client, demo_data):
    images = demo_images(demo_data, ("horse", "truck"), 40)
    batch_size, max_in_flight = 4, 2
    acked = 0
    worst = 0

    def items():
        nonlocal worst
        for n, (_, data) in enumerate(images):
            worst = max(worst, n - acked)  # items taken from us but not yet acknowledged
            yield UpsertItem(f"bound/{n}", image=data)

    def on_ack(stored, failures):
        nonlocal acked
        acked += stored + len(failures)

    result = client.upsert_many(items(), batch_size=batch_size, max_in_flight=max_in_flight, on_ack=on_ack)
    assert result.upserted == len(images) == acked and not result.failures
    # in flight: max_in_flight batches, plus the one being packed
    assert 0 < worst <= (max_in_flight + 1) * batch_size


def test_an_error_of_the_items_iterator_is_raised_after_the_sent_batches(client, demo_data):
    images = demo_images(demo_data, ("deer",), 6)

    def items():
        for n, (_, data) in enumerate(images):
            yield UpsertItem(f"source/{n}", image=data)
        raise ValueError("disk on fire")

    with pytest.raises(ValueError, match="disk on fire"):
        client.upsert_many(items(), batch_size=4)
    # the full batch was sent and acknowledged; the one being packed when the error came was not
    stored = client.get([f"source/{n}" for n in range(len(images))], ignore_missing=True)
    assert [s.id for s in stored] == [f"source/{n}" for n in range(4)]


def test_search_classify_label_corpus(client, demo_data):
    train = demo_images(demo_data, ("airplane", "deer"), 10)
    items = [UpsertItem(f"knn/{cls}/{n}", image=data) for n, (cls, data) in enumerate(train)]
    assert client.upsert_many(items).upserted == len(items)
    labelled = {it.id: cls for it, (cls, _) in zip(items, train) if int(it.id.rsplit("/", 1)[1]) % 10 < 5}
    assert client.set_labels(labelled) == len(labelled)

    query = train[0][1]
    hits = client.search(image=query, k=5)
    assert len(hits) == 5 and hits[0].id == items[0].id and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    by_id = client.search(id=items[0].id, k=5)
    assert items[0].id not in [h.id for h in by_id]
    only_deer = client.search(image=query, k=5, labels=["deer"])
    assert only_deer and all(h.label == "deer" for h in only_deer)
    assert all(h.score >= 0.5 for h in client.search(image=query, k=20, min_score=0.5))

    vec = client.embed([query])[0]
    by_vec = client.classify(vector=vec * 3.0, k=5, tau=0.1)  # the server normalises query vectors
    by_img = client.classify(image=query, k=5, tau=0.1)
    assert by_vec.label == by_img.label == "airplane"
    assert sum(s for _, s in by_img.scores) == pytest.approx(1.0, abs=1e-4)
    assert by_img.confidence == pytest.approx(by_img.scores[0][1]) and len(by_img.neighbors) == 5
    many = client.classify_many([{"image": query}, {"id": items[-1].id}], k=5)
    assert [m.label for m in many] == [by_img.label, client.classify(id=items[-1].id, k=5).label]
    bare = client.classify(image=query, k=5, tau=0.1, neighbors=0)  # the vote without the neighbours
    assert (bare.label, bare.scores, bare.neighbors) == (by_img.label, by_img.scores, [])

    ours = {p.id: p for p in client.label_corpus(k=5, tau=0.1, apply=True) if p.id.startswith("knn/")}
    assert set(ours) == {it.id for it in items} - set(labelled)
    assert list(ours) == sorted(ours)
    stored = {s.id: s for s in client.get(list(ours))}
    for pid, p in ours.items():
        assert stored[pid].label == "" and stored[pid].predicted_label == p.label
        assert stored[pid].predicted_confidence == pytest.approx(p.confidence, abs=1e-5)

    some = list(ours)[0]
    client.set_labels({some: "deer"}, predicted=True, confidences={some: 0.25})
    (item,) = client.get([some])
    assert (item.label, item.predicted_label) == ("", "deer")
    assert client.delete([it.id for it in items]) == len(items)
    assert client.get([it.id for it in items], ignore_missing=True) == []


def test_errors_carry_the_status_code(client, server):
    with pytest.raises(RetrievalError) as err:
        client.get(["no-such-id"])
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.message
    with pytest.raises(RetrievalError) as err:
        client.search(vector=np.ones(client.info().dim), k=0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RetrievalError) as err:
        client.delete(["no-such-id"])
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with RetrievalClient(f"127.0.0.1:{free_port()}", timeout=5) as dead:
        with pytest.raises(RetrievalError) as err:
            dead.info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(err.value).startswith("cannot reach server at 127.0.0.1:")


def test_upsert_many_survives_a_server_killed_mid_stream(export, tmp_path, demo_data):
    """The server is SIGKILLed after some batches; upsert_many reconnects to its restart on the
    same port, resends only what was not acknowledged, and every item ends up stored once."""
    images = demo_images(demo_data, ("bird", "cat", "ship"), 40)
    port = str(free_port())
    store = tmp_path / "store"
    restarted = threading.Event()
    acks = []
    with ExitStack() as stack:
        first = stack.enter_context(ServerProcess(export, store, "--port", port))

        def items():
            for n, (_, data) in enumerate(images):
                if n == 50:  # a few batches are acknowledged, some are in flight
                    first.stop(signal.SIGKILL)
                    stack.enter_context(ServerProcess(export, store, "--port", port))
                    restarted.set()
                yield UpsertItem(f"kill/{n:03d}", image=data, metadata={"n": str(n)})

        with RetrievalClient(first.address, timeout=120) as c:
            result = c.upsert_many(
                items(), batch_size=8, max_in_flight=2, on_ack=lambda stored, failures: acks.append(stored)
            )
            assert restarted.is_set()
            assert result.upserted == len(images) == sum(acks) and not result.failures
            stored = c.get([f"kill/{n:03d}" for n in range(len(images))])
            assert [s.metadata["n"] for s in stored] == [str(n) for n in range(len(images))]
            assert c.info().item_count == len(images)


def test_async_client_has_the_same_api(server, client, demo_data):
    images = demo_images(demo_data, ("automobile", "truck"), 6)

    async def session():
        async with AsyncRetrievalClient(server.address, timeout=60) as c:
            emb = await c.embed([data for _, data in images])
            items = [
                UpsertItem(f"aio/{n}", image=data, label=cls if n % 6 < 3 else "")
                for n, (cls, data) in enumerate(images)
            ]
            items.insert(2, UpsertItem("aio/corrupt", image=b"not an image"))
            result = await c.upsert_many(items, batch_size=2, max_in_flight=2)
            hits = await c.search(vector=emb[4], k=3)
            votes = await c.classify_many([{"vector": e} for e in emb], k=3, tau=0.001)
            proposals = [p async for p in c.label_corpus(k=3) if p.id.startswith("aio/")]
            with pytest.raises(RetrievalError) as err:
                await c.get(["no-such-id"])
            deleted = await c.delete([f"aio/{n}" for n in range(len(images))])
            return emb, result, hits, votes, proposals, err.value, deleted

    emb, result, hits, votes, proposals, err, deleted = asyncio.run(session())
    np.testing.assert_allclose(emb, client.embed([data for _, data in images]), atol=1e-4)
    assert result.upserted == len(images)
    assert [(f.index, f.id, f.code) for f in result.failures] == [(2, "aio/corrupt", grpc.StatusCode.INVALID_ARGUMENT)]
    assert hits[0].id == "aio/4" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    labelled = [n for n in range(len(images)) if n % 6 < 3]
    assert [votes[n].label for n in labelled] == [images[n][0] for n in labelled]
    assert [p.id for p in proposals] == sorted(f"aio/{n}" for n in range(len(images)) if n not in labelled)
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert deleted == len(images)
