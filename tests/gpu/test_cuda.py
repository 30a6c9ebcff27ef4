"""Everything that needs CUDA: training steps of MoCo v2/v3 and of the other methods (InstDisc,
SimCLR, BYOL, Barlow Twins, SwAV) in bf16 and in fp16 with GradScaler, the
SyncBatchNorm path (`--bn sync`) under an NCCL process group, the retrieval server with its encoder
on the GPU, and the FAISS GPU index. CI has no GPU, so every test here is skipped there with its
reason; `bench/gpu_check.py` runs this module on a lent GPU machine and records each outcome."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from moco_train.config import TrainConfig
from moco_train.trainer import Trainer
from tests.images import noise_images

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible to torch)")

# (method, arch): v2 with its MLP head and split-BN; v3 with a ResNet (LARS) and a ViT (AdamW), without
# warm-up (its lr starts at 0, so 3 steps would barely move the weights).
METHODS = {
    "v2-resnet18": dict(arch="resnet18", mlp=True, aug_plus=True, cos=True, moco_k=64, moco_dim=16, bn_splits=2),
    "v3-resnet18": dict(arch="resnet18", moco_v3=True, moco_dim=16, moco_mlp_dim=64, warmup_epochs=0),
    "v3-vit_tiny_32": dict(arch="vit_tiny_32", moco_v3=True, moco_dim=16, moco_mlp_dim=64, warmup_epochs=0),
    "instdisc": dict(method="instdisc", nce_k=16, moco_dim=16),
    "simclr": dict(method="simclr", moco_dim=16, warmup_epochs=0),
    "byol": dict(method="byol", moco_dim=16, moco_mlp_dim=64, warmup_epochs=0),
    "barlow": dict(method="barlow", moco_dim=64, moco_mlp_dim=64, warmup_epochs=0),
    "swav": dict(method="swav", swav_prototypes=8, swav_queue=8, swav_queue_start=0, multi_crop=2),
}
# fp16 for MoCo only: the other methods' first fp16 steps are skipped while GradScaler lowers its scale
# from 65536 (a 12-step fp16 run on the CPU trained once it reached 8192 for InstDisc and SimCLR and
# 256 for Barlow Twins), so 3 steps would not move their weights; they run in bf16 here.
RUNS = [(method, amp) for method in METHODS for amp in ("bf16", "fp16") if amp == "bf16" or method.startswith("v")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 random 32 px images: 4 steps of batch 8 per epoch (CIFAR stem, 32 px crops)."""
    return noise_images(tmp_path_factory.mktemp("imgs"), 32, size=(32, 32))


def tiny_config(images: Path, run_dir: Path, amp: str, **overrides) -> TrainConfig:
    """A run of 3 steps on the GPU, eager (compiling would dominate a test this small)."""
    fields = dict(
        data=str(images),
        run_dir=str(run_dir),
        batch_size=8,
        max_steps=3,
        workers=0,
        device="cuda:0",
        amp=amp,
        compile="off",
        keep=1,
        progress=False,
    )
    return TrainConfig(**{**fields, **overrides})


def query_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    query = trainer.model.encoders()[0]
    return {name: p.detach().clone() for name, p in query.named_parameters() if p.requires_grad}


def assert_trained(trainer: Trainer, before: dict[str, torch.Tensor], summary: dict) -> None:
    """The steps ran on the GPU, produced a finite loss and moved the query encoder's weights."""
    assert summary["global_step"] == 3
    assert math.isfinite(summary["loss"]), summary
    after = query_params(trainer)
    assert all(p.device.type == "cuda" for p in after.values())
    assert all(torch.isfinite(p).all() for p in after.values())
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} tensors changed"


@needs_cuda
@pytest.mark.parametrize(("method", "amp"), RUNS)
def test_training_steps(images: Path, tmp_path: Path, method: str, amp: str) -> None:
    """bf16 autocast needs no scaler; fp16 trains through GradScaler, whose scale must stay finite
    (an overflow in every step would skip every update and leave the weights unchanged)."""
    trainer = Trainer(tiny_config(images, tmp_path, amp, **METHODS[method]))
    assert trainer.device.type == "cuda"
    assert trainer.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    before = query_params(trainer)
    summary = trainer.fit()
    assert_trained(trainer, before, summary)
    if amp == "fp16":
        assert 0 < trainer.scaler.get_scale() < float("inf")
    assert list(tmp_path.glob("checkpoint_*.pt")), "no checkpoint written"


@needs_cuda
def test_sync_batchnorm_under_nccl(images: Path, tmp_path: Path) -> None:
    """`--bn sync` converts the encoders to SyncBatchNorm and trains under DDP over NCCL. One GPU
    holds one NCCL rank, so the group has one process: torch's SyncBatchNorm then normalises
    locally, and what is checked is the conversion, the DDP wrapping and the NCCL collectives of
    a real step (keys gathered, loss all-reduced)."""
    if not dist.is_nccl_available():
        pytest.skip("this torch was built without NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        overrides = {**METHODS["v2-resnet18"], "bn": "sync"}
        trainer = Trainer(tiny_config(images, tmp_path / "run", "bf16", **overrides))
        assert dist.get_backend() == "nccl"
        assert isinstance(trainer.net, nn.parallel.DistributedDataParallel)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in trainer.model.modules())
        before = query_params(trainer)
        assert_trained(trainer, before, trainer.fit())
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_server_encodes_on_the_gpu(tmp_path: Path) -> None:
    """`retrieval-server serve --device cuda`: Info reports the GPU, Embed equals the CPU encoder's
    embeddings (TF32 convolutions differ by ~1e-3), and an upserted image is its own top hit."""
    from moco_retrieval.api.v1 import retrieval_pb2 as pb
    from retrieval_server.encoder import Encoder
    from tests.server_harness import ServerProcess, make_export, png_bytes

    model = make_export(tmp_path)
    images = [png_bytes(seed) for seed in range(6)]
    cpu = Encoder(model, device="cpu", runtime="torch")
    want = cpu.forward(torch.stack([cpu.preprocess(img) for img in images]))
    with ServerProcess(model, tmp_path / "store", "--device", "cuda", "--index-gpus", "0") as server:
        stub = server.stub()
        assert stub.Info(pb.InfoRequest()).model_device.startswith("cuda")
        reply = stub.Embed(pb.EmbedRequest(images=images, packed=True))
        got = np.stack([np.frombuffer(e.data, dtype="<f4") for e in reply.embeddings])
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-2 and (got * want).sum(axis=1).min() > 0.999
        items = [pb.Item(id=f"i{n}", image=img) for n, img in enumerate(images)]
        (ack,) = stub.Upsert(iter([pb.UpsertRequest(items=items)]))
        assert (ack.upserted, ack.failed) == (len(images), 0)
        top = stub.Search(pb.SearchRequest(query=pb.Query(image=images[3]), k=1)).neighbors[0]
        assert top.id == "i3" and top.score > 0.999


def _faiss_gpus() -> tuple[int, str]:
    """(GPUs FAISS sees, why it sees none): FAISS is optional here, its GPU build more so."""
    try:
        import faiss
    except ImportError as exc:
        return 0, f"faiss does not import ({exc})"
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return 0, f"faiss {faiss.__version__} is a CPU build or sees no GPU"
    return faiss.get_num_gpus(), ""


@needs_cuda
def test_faiss_gpu_index_matches_the_cpu_index() -> None:
    """The server's GPU replica (FaissIndex with gpus=1) returns the exact CPU index's neighbours."""
    gpus, why = _faiss_gpus()
    if not gpus:
        pytest.skip(why)
    from retrieval_server.faiss_index import FaissIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.arange(10, 5010, dtype=np.int64)
    gpu, cpu = FaissIndex(64, "Flat", gpus=1), FaissIndex(64, "Flat", gpus=0)
    for index in (gpu, cpu):
        index.add(rows, vectors)
    queries = vectors[:100] + 0.01 * rng.standard_normal((100, 64)).astype(np.float32)
    (gpu_scores, gpu_rows), (cpu_scores, cpu_rows) = gpu.search(queries, 10), cpu.search(queries, 10)
    assert gpu._gpu is not None, "the search did not go through a GPU replica"
    np.testing.assert_array_equal(gpu_rows[:, 0], rows[:100])
    assert (gpu_rows == cpu_rows).mean() > 0.99  # ties may order differently
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
