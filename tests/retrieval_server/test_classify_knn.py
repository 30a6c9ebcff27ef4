"""Classify is the InstDisc vote of `moco-train knn`: same encoder, same bank, same queries, same
predictions and vote shares (the shared moco_retrieval.knn code, FAISS instead of a torch matmul)."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.knn import knn_classify
from tests.server_harness import REPO, ServerProcess, backend_args, make_export, server_env

PER_CLASS_BANK, PER_CLASS_QUERIES, K, TAU = 8, 3, 20, 0.07
# FAISS and torch may round the float32 dot products differently in the last bit; a share moves by
# about |ds| / tau, far below this.
SHARE_ATOL = 1e-5


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, dst / class_dir.name / image.name)
    return dst


@pytest.fixture(
    scope="module", params=[("resnet18", "embedded"), ("vit_tiny_32", "embedded"), ("resnet18", "milvus")], ids=str
)
def setup(request, tmp_path_factory: pytest.TempPathFactory, demo_data: Path):
    """A served export with a labelled bank: a ResNet (MoCo v1/v2) and a ViT (MoCo v3), in the
    embedded backend, and the ResNet in Milvus (Lite)."""
    arch, backend = request.param
    root = tmp_path_factory.mktemp("knn")
    bank = _subset(demo_data / "train", root / "bank", PER_CLASS_BANK)
    queries = _subset(demo_data / "test", root / "queries", PER_CLASS_QUERIES)
    model = make_export(root, seed=3, arch=arch)
    with ServerProcess(model, root / "store", *backend_args(backend, root)) as server:
        stub = server.stub()
        items = [
            pb.Item(id=f"{p.parent.name}/{p.name}", image=p.read_bytes(), label=p.parent.name)
            for p in sorted(bank.rglob("*.jpg"))
        ]
        acks = list(stub.Upsert(iter([pb.UpsertRequest(items=items[i : i + 32]) for i in range(0, len(items), 32)])))
        assert sum(a.upserted for a in acks) == len(items) and not any(a.failed for a in acks)
        yield stub, model, bank, queries, items


def test_vote_equals_knn_classify(setup) -> None:
    stub, _model, _bank, queries, items = setup
    stored = stub.Get(pb.GetRequest(ids=[i.id for i in items], include_embedding=True)).items
    classes = sorted({i.label for i in stored})  # `moco-train knn` numbers classes by sorted folder name
    bank = torch.tensor(np.array([i.embedding.values for i in stored], dtype=np.float32))
    bank_labels = torch.tensor([classes.index(i.label) for i in stored])
    query_images = [p.read_bytes() for p in sorted(queries.rglob("*.jpg"))]
    embedded = stub.Embed(pb.EmbedRequest(images=query_images)).embeddings
    query_vectors = torch.tensor(np.array([e.values for e in embedded], dtype=np.float32))
    for k in (1, K, 200):  # 200 (the default) is more than the 80 labelled items: all of them vote
        expected = knn_classify(query_vectors, bank, bank_labels, len(classes), k=k, tau=TAU)
        worst = 0.0
        for q, vector in enumerate(query_vectors):
            reply = stub.Classify(
                pb.ClassifyRequest(query=pb.Query(vector=pb.Vector(values=vector.tolist())), k=k, tau=TAU)
            )
            assert reply.label == classes[int(expected[q].argmax())], f"query {q}, k={k}"
            got = {s.label: s.score for s in reply.scores}
            want = {classes[c]: float(s) for c, s in enumerate(expected[q]) if s > 0}
            assert got.keys() == want.keys()
            worst = max([worst] + [abs(got[c] - want[c]) for c in want])
            assert len(reply.neighbors) == min(k, len(items))
            top = (query_vectors[q] @ bank.T).topk(min(k, len(items))).values.numpy()
            np.testing.assert_allclose([n.score for n in reply.neighbors], top, atol=1e-5)
        print(f"k={k}: largest vote-share difference to knn_classify {worst:.2e}")
        assert worst <= SHARE_ATOL


def test_predictions_equal_moco_train_knn_cli(setup, tmp_path: Path) -> None:
    stub, model, bank, queries, _items = setup
    out = tmp_path / "predictions.csv"
    cmd = [
        sys.executable,
        "-m",
        "moco_train",
        "knn",
        "--bank",
        str(bank),
        "--queries",
        str(queries),
        "--checkpoint",
        str(model),
        "-k",
        str(K),
        "--tau",
        str(TAU),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--predictions",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=REPO, env=server_env(), capture_output=True, timeout=300)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 * PER_CLASS_QUERIES
    agree = 0
    for row in rows:
        reply = stub.Classify(pb.ClassifyRequest(query=pb.Query(image=Path(row["path"]).read_bytes()), k=K, tau=TAU))
        assert reply.label == row["predicted_class"], row["path"]
        agree += reply.label == row["true_class"]
        assert math.isclose(sum(s.score for s in reply.scores), 1.0, abs_tol=1e-5)
    print(f"server and moco-train knn agree on {len(rows)} predictions ({agree} correct)")
