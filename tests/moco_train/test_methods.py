"""InstDisc, SimCLR, BYOL, Barlow Twins and SwAV against their papers' formulas, each loss computed a
second time by hand (NumPy, float64, explicit loops) on a tiny batch; their memory bank, target
network, queue and prototypes; --method's options and defaults; InstDisc's kNN monitor on its
memory bank; and a BYOL export served by a real server."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.export import export_model, load_export
from moco_retrieval.knn import DEFAULT_K, DEFAULT_TAU, knn_classify, topk_accuracy
from moco_train.barlow import BarlowTwins
from moco_train.byol import BYOL
from moco_train.checkpoint import CHECKPOINT_FORMAT, to_export
from moco_train.cli import build_parser, train_config
from moco_train.cli import main as moco_train
from moco_train.config import ConfigError, TrainConfig, resolve
from moco_train.data import DataError
from moco_train.evaluate import extract_features
from moco_train.instdisc import InstDisc
from moco_train.methods import method_spec
from moco_train.simclr import SimCLR
from moco_train.swav import SwAV, sinkhorn
from moco_train.trainer import Trainer
from tests.images import noise_images
from tests.moco_train.test_distributed import log_records
from tests.server_harness import ServerProcess, png_bytes

TAU = 0.5


def tiny_encoder(dim: int = 6) -> nn.Module:
    """A linear "network" on images of any size (average-pooled to 2x2 first), no BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, dim))


def images(n: int, seed: int, size: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# -- InstDisc ------------------------------------------------------------------------------------
def instdisc_by_hand(v: np.ndarray, memory: np.ndarray, index, noise: np.ndarray, tau: float) -> tuple[float, float]:
    """(NCE loss, Z) of lemniscate's NCEAverage + NCECriterion, one image and one noise sample at a time."""
    n_images, m = memory.shape[0], noise.shape[1]
    scores = [[math.exp(memory[j] @ v[b] / tau) for j in [index[b], *noise[b]]] for b in range(len(v))]
    z = np.mean(scores) * n_images  # estimated once, from the first batch
    pn = 1.0 / n_images
    total = 0.0
    for row in scores:
        p_data = row[0] / z
        total += math.log(p_data / (p_data + m * pn + 1e-7))
        for s in row[1:]:
            total += math.log(m * pn / (s / z + m * pn + 1e-7))
    return -total / len(v), z


def test_instdisc_nce_loss_bank_update_and_z():
    model = InstDisc(tiny_encoder(), num_images=10, dim=6, nce_k=3, T=TAU, momentum=0.5)
    memory = np64(model.memory).copy()
    np.testing.assert_allclose(np.linalg.norm(memory, axis=1), 1.0, rtol=1e-6)  # unit vectors from the start
    x, index = images(4, 1), torch.tensor([7, 2, 9, 5])
    torch.manual_seed(5)
    noise = np64(torch.randint(10, (4, 3))).astype(int)  # what the model draws from the same stream
    torch.manual_seed(5)
    probs, v, previous = model(x, index)
    assert probs.shape == (4, 1 + 3)  # the image's own row, then m noise rows
    v_np = unit(np64(model.encoder(x)))
    expected_loss, expected_z = instdisc_by_hand(v_np, memory, index.tolist(), noise, TAU)
    assert model.Z.item() == pytest.approx(expected_z, rel=1e-5)
    assert model.loss(probs, v, previous).item() == pytest.approx(expected_loss, rel=1e-5)
    # The bank: the batch's rows moved halfway to their features and renormalised, the others kept.
    after = np64(model.memory)
    for b, i in enumerate(index.tolist()):
        np.testing.assert_allclose(after[i], unit((0.5 * memory[i] + 0.5 * v_np[b])[None])[0], rtol=1e-5, atol=1e-6)
    untouched = sorted(set(range(10)) - set(index.tolist()))
    np.testing.assert_array_equal(after[untouched], memory[untouched])
    z = model.Z.item()
    model(x, index)
    assert model.Z.item() == z  # estimated once


def test_instdisc_proximal_term_and_accuracy():
    model = InstDisc(tiny_encoder(), num_images=10, dim=6, nce_k=3, T=TAU)
    x, index = images(4, 1), torch.tensor([0, 1, 2, 3])
    memory = np64(model.memory).copy()
    probs, v, previous = model(x, index)
    plain = model.loss(probs, v, previous).item()
    model.prox = 30.0
    v_np = unit(np64(v))
    prox = np.mean([np.sum((v_np[b] - memory[b]) ** 2) for b in range(4)])
    assert model.loss(probs, v, previous).item() == pytest.approx(plain + 30.0 * prox, rel=1e-5)
    assert model.accuracy(probs, v, previous).item() == np.mean(np64(probs).argmax(1) == 0)


# -- SimCLR --------------------------------------------------------------------------------------
def test_simclr_nt_xent_over_2n_minus_2_negatives():
    model = SimCLR(tiny_encoder(), T=TAU)
    x1, x2 = images(4, 1), images(4, 2)
    logits, labels = model(x1, x2)
    assert logits.shape == (8, 8) and torch.isinf(logits).sum(dim=1).eq(1).all()  # 1 positive, 2N - 2 negatives
    z = unit(np64(model.encoder(torch.cat([x1, x2]))))
    n = 4
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / TAU) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[positive] / TAU) / denominator)
    expected = total / n  # loss_a + loss_b: each a mean over the n images of its view
    assert model.loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    assert model.accuracy(logits, labels).item() == np.mean(np64(logits).argmax(1) == labels.numpy())


# -- BYOL ----------------------------------------------------------------------------------------
def test_byol_symmetric_regression_loss_and_target_momentum():
    model = BYOL(tiny_encoder(8), dim=8, mlp_dim=16, m=0.9)
    model.eval()  # the predictor's BatchNorm from its running statistics: a row-wise function
    x1, x2 = images(4, 1), images(4, 2)
    p1, p2, z1, z2 = model(x1, x2)
    with torch.no_grad():  # the target equals the online network at step 0: the momentum step is a no-op
        online = [np64(model.online_encoder(x)) for x in (x1, x2)]
        predicted = [np64(model.predictor(model.online_encoder(x))) for x in (x1, x2)]
    np.testing.assert_allclose(np64(z1), online[0], rtol=1e-6)
    expected = 0.0
    for b in range(4):
        for p, z in ((predicted[0][b], online[1][b]), (predicted[1][b], online[0][b])):
            expected += np.sum((p / np.linalg.norm(p) - z / np.linalg.norm(z)) ** 2)
    assert model.loss(p1, p2, z1, z2).item() == pytest.approx(expected / 4, rel=1e-5)
    with torch.no_grad():
        for p in model.online_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model(x1, x2)
    for old, new, online_p in zip(before, model.target_encoder.parameters(), model.online_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online_p)
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    assert model.encoders() == (model.online_encoder, model.target_encoder)


# -- Barlow Twins ----------------------------------------------------------------------------------
def test_barlow_twins_cross_correlation_loss():
    model = BarlowTwins(tiny_encoder(5), dim=5, lambd=5e-3)
    y1, y2 = images(6, 1), images(6, 2)
    (c,) = model(y1, y2)
    z1, z2 = np64(model.encoder(y1)), np64(model.encoder(y2))

    def standardise(z: np.ndarray) -> np.ndarray:  # along the batch, biased variance (BatchNorm's)
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)

    n1, n2 = standardise(z1), standardise(z2)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            cij = sum(n1[b, i] * n2[b, j] for b in range(6)) / 6
            expected += (1 - cij) ** 2 if i == j else 5e-3 * cij**2
    np.testing.assert_allclose(np64(c), n1.T @ n2 / 6, rtol=1e-4, atol=1e-6)
    assert model.loss(c).item() == pytest.approx(expected, rel=1e-4)


# -- SwAV ----------------------------------------------------------------------------------------
def sinkhorn_by_hand(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """The official distributed_sinkhorn in one process, element by element."""
    q = np.exp(scores / eps).T  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] = q[row] / q[row].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    return (q * b).T


def swav_loss_by_hand(scores: np.ndarray, codes: list[np.ndarray], crops: int, tau: float) -> float:
    n = codes[0].shape[0]
    total = 0.0
    for assigned, q in enumerate(codes):
        sub = 0.0
        for view in range(crops):
            if view == assigned:
                continue
            for b in range(n):
                logits = scores[view * n + b] / tau
                log_p = logits - np.log(np.exp(logits).sum())
                sub -= np.sum(q[b] * log_p) / n
        total += sub / (crops - 1)
    return total / len(codes)


def test_swav_codes_and_swapped_prediction_with_multi_crop():
    model = SwAV(tiny_encoder(6), dim=6, prototypes=5, T=0.1, epsilon=0.05, sinkhorn_iterations=3)
    model.begin_step(0)
    np.testing.assert_allclose(np.linalg.norm(np64(model.prototypes.weight), axis=1), 1.0, rtol=1e-6)
    crops = (images(4, 1), images(4, 2), images(4, 3, size=2), images(4, 4, size=2))  # 2 large + 2 small
    scores, codes = model(*crops)
    assert scores.shape == (16, 5) and codes.shape == (8, 5)
    z = unit(np.concatenate([np64(model.encoder(c)) for c in crops]))
    by_hand_scores = z @ np64(model.prototypes.weight).T
    np.testing.assert_allclose(np64(scores), by_hand_scores, rtol=1e-5, atol=1e-6)
    by_hand_codes = [sinkhorn_by_hand(by_hand_scores[s * 4 : (s + 1) * 4], 0.05, 3) for s in (0, 1)]
    np.testing.assert_allclose(np64(codes), np.concatenate(by_hand_codes), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np64(codes).sum(1), 1.0, rtol=1e-6)  # each sample's codes: a distribution
    expected = swav_loss_by_hand(by_hand_scores, by_hand_codes, crops=4, tau=0.1)
    assert model.loss(scores, codes).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("eps", (0.05, 0.01))
def test_swav_sinkhorn_in_float32_equals_float64_where_exp_overflows(eps):
    """Unit-norm scores: exp(S/ε) reaches e^100 at ε 0.01, past float32's e^88 (the direct official
    iteration returns NaN there); the log-domain iteration gives float64's codes at every ε."""
    g = torch.Generator().manual_seed(0)
    z = nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
    prototypes = nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    z[:10] = prototypes[:10]  # samples on their prototype: a score of 1
    scores = z @ prototypes.T  # in [-1, 1]
    codes = sinkhorn(scores, eps, 3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    np.testing.assert_allclose(np64(codes), sinkhorn_by_hand(np64(scores), eps, 3), rtol=1e-4, atol=1e-6)


def test_swav_queue_fills_newest_first_and_feeds_sinkhorn_once_full():
    model = SwAV(tiny_encoder(6), dim=6, prototypes=5, T=0.1, queue_length=8, queue_start=1)
    batches = [(images(4, 2 * s), images(4, 2 * s + 1)) for s in range(4)]
    model.begin_step(0)
    model(*batches[0])
    assert not model.queue.any()  # before its start step
    embeddings = []
    for step in (1, 2):
        model.begin_step(step)
        model(*batches[step])
        embeddings.append([unit(np64(model.encoder(x))) for x in batches[step]])
    for slot in (0, 1):  # newest first: step 2's four, then step 1's
        newest_first = np.concatenate([embeddings[1][slot], embeddings[0][slot]])
        np.testing.assert_allclose(np64(model.queue[slot]), newest_first, rtol=1e-6)
    model.begin_step(3)
    queued = np64(model.queue).copy()
    scores, codes = model(*batches[3])
    prototypes = np64(model.prototypes.weight)
    for slot in (0, 1):  # Sinkhorn over [queue; batch], the batch's rows kept
        together = np.concatenate([queued[slot] @ prototypes.T, np64(scores)[slot * 4 : (slot + 1) * 4]])
        np.testing.assert_allclose(
            np64(codes)[slot * 4 : (slot + 1) * 4], sinkhorn_by_hand(together, 0.05, 3)[-4:], rtol=1e-4, atol=1e-6
        )


def test_swav_prototypes_are_frozen_for_the_first_steps():
    model = SwAV(tiny_encoder(6), dim=6, prototypes=5, freeze_prototypes=2)
    for step, frozen in ((0, True), (1, True), (2, False)):
        model.zero_grad(set_to_none=True)
        model.begin_step(step)
        model.loss(*model(images(4, 1), images(4, 2))).backward()
        model.after_backward(step)
        assert (model.prototypes.weight.grad is None) == frozen
        assert model.encoder[2].weight.grad is not None


# -- options ---------------------------------------------------------------------------------------
def cfg(**kwargs) -> TrainConfig:
    return TrainConfig(data="d", run_dir="r", **kwargs)


def test_method_defaults_follow_each_paper():
    simclr = resolve(cfg(method="simclr", batch_size=512), small=True)  # the official CIFAR-10 command
    assert (simclr.optimizer, simclr.lr, simclr.weight_decay, simclr.moco_t, simclr.mlp_dim) == (
        "lars",
        2.0,
        1e-4,
        0.5,
        512,
    )
    byol = resolve(cfg(method="byol", batch_size=4096, epochs=1000), small=False)  # the paper's schedule
    assert (byol.lr, byol.weight_decay, byol.moco_m, byol.moco_m_cos, byol.moco_dim, byol.mlp_dim) == (
        pytest.approx(3.2),
        1.5e-6,
        0.996,
        True,
        256,
        4096,
    )
    barlow = resolve(cfg(method="barlow"), small=True)
    assert (barlow.moco_dim, barlow.mlp_dim, barlow.warmup_epochs) == (2048, 2048, 10)
    instdisc = resolve(cfg(method="instdisc", batch_size=128), small=False)
    assert (instdisc.optimizer, instdisc.lr, instdisc.moco_t, instdisc.moco_dim, instdisc.crop_min) == (
        "sgd",
        0.03,  # the rate itself, as lemniscate's
        0.07,
        128,
        0.2,
    )
    swav = resolve(cfg(method="swav", lr=4.8, moco_t=0.2, batch_size=256, multi_crop=6), small=True)
    assert (swav.lr, swav.moco_t, swav.crop_min) == (4.8, 0.2, 0.14)  # flags win; multi-crop's large crops
    assert [method_spec(cfg(method=m)).cosine for m in ("instdisc", "simclr", "byol", "barlow", "swav")] == [
        False,
        True,
        True,
        True,
        True,
    ]


@pytest.mark.parametrize("extra", [{"moco_v3": True}, {"symmetric": True}, {"mlp": True}, {"arch": "vit_tiny_32"}])
def test_moco_options_are_refused_with_another_method(extra):
    with pytest.raises(ConfigError, match="MoCo options|--moco-v3"):
        resolve(cfg(method="byol", **extra), small=True)


# -- the trainer: InstDisc's kNN monitor, a non-MoCo export served ----------------------------------
@pytest.fixture(scope="module")
def labelled_training_images(tmp_path_factory) -> Path:
    """Two classes of 8 noise images: the training folder (labels unused) and the kNN bank."""
    root = tmp_path_factory.mktemp("labelled")
    for seed, name in enumerate(("a", "b"), start=1):
        noise_images(root / name, 8, seed=seed)
    return root


def tiny_run(data: Path, run_dir: Path, method: str, **options) -> Trainer:
    tiny = dict(batch_size=4, moco_dim=16, workers=0, progress=False)
    return Trainer(TrainConfig(data=str(data), run_dir=str(run_dir), method=method, **tiny, **options))


def test_instdisc_knn_monitor_votes_with_the_memory_bank(labelled_training_images, tmp_path):
    """The monitor's bank is the bank's rows of the --knn-bank images, the queries embedded with the
    128-d head (lemniscate's test.py kNN); a bank folder of other images is refused before training."""
    root = labelled_training_images
    monitor = {"knn_bank": str(root), "knn_queries": str(root)}
    trainer = tiny_run(root, tmp_path / "run", "instdisc", max_steps=4, nce_k=8, **monitor)
    trainer.fit()
    assert trainer.knn_rows.rows.tolist() == [trainer.dataset.paths.index(p) for p in trainer.knn_rows.paths]
    epochs = [r for r in log_records(tmp_path / "run") if r["event"] == "epoch"]
    assert epochs and 0 <= epochs[-1]["knn_top1"] <= 100
    # By hand: queries through f with its head against the bank rows, the shared vote.
    model, meta = export_model(to_export(trainer.state() | {"format": CHECKPOINT_FORMAT}, "t", keep_head=True))
    assert meta.feature_dim == 16
    queries = extract_features(model, meta, root)
    bank = trainer.model.memory[trainer.knn_rows.rows]
    scores = knn_classify(queries.features, bank, trainer.knn_rows.labels, 2, k=DEFAULT_K, tau=DEFAULT_TAU)
    assert epochs[-1]["knn_top1"] == pytest.approx(topk_accuracy(scores, queries.labels)["top1"])

    other = tmp_path / "other"
    noise_images(other / "a", 2, seed=9)
    with pytest.raises(DataError, match="not training images"):
        tiny_run(root, tmp_path / "run2", "instdisc", max_steps=1, knn_bank=str(other), knn_queries=str(root)).fit()


@pytest.mark.slow
def test_a_byol_export_is_served(labelled_training_images, tmp_path):
    """BYOL keeps f_θ under online_encoder.*: the export takes those weights (not the target's), and
    the embedded server serves them: an image's nearest neighbour is itself."""
    trainer = tiny_run(labelled_training_images, tmp_path / "run", "byol", max_steps=2, moco_mlp_dim=32)
    trainer.fit()
    assert moco_train(["export", str(tmp_path / "run" / "checkpoint_00000002.pt"), str(tmp_path / "enc.pt")]) == 0
    model, meta = load_export(tmp_path / "enc.pt")
    online = trainer.model.online_encoder.state_dict()
    assert meta.feature_dim == 512 and all(torch.equal(v, online[k]) for k, v in model.state_dict().items())
    with ServerProcess(tmp_path / "enc.pt", tmp_path / "store") as server:
        stub = server.stub()
        items = [pb.Item(id=f"img{i}", image=png_bytes(i, size=16)) for i in range(6)]
        assert all(not ack.errors for ack in stub.Upsert(iter([pb.UpsertRequest(items=items)])))
        reply = stub.Search(pb.SearchRequest(query=pb.Query(image=png_bytes(3, size=16)), k=3))
        assert reply.neighbors[0].id == "img3" and reply.neighbors[0].score == pytest.approx(1.0, abs=1e-4)


def test_method_flags_and_their_aliases_parse():
    args = build_parser().parse_args(
        ["train", "d", "--run-dir", "r", "--method", "swav", "--dim", "64", "--temperature", "0.2", "--multi-crop", "6"]
    )
    cfg = train_config(args)
    assert (cfg.method, cfg.moco_dim, cfg.moco_t, cfg.multi_crop) == ("swav", 64, 0.2, 6)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--run-dir", "r", "--method", "dino"])


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_each_method_gets_its_views_from_either_pipeline(demo_data, tmp_path, pipeline):
    """InstDisc: one view; SwAV with --multi-crop 2: two 32 px crops and two 14 px ones (96/224 of
    32), in both data pipelines."""
    images = demo_data / "train" / "cat"
    for method, sizes in (("instdisc", [32]), ("swav", [32, 32, 14, 14])):
        trainer = tiny_run(images, tmp_path / method, method, max_steps=1, multi_crop=2, data_pipeline=pipeline)
        *views, _, failed = next(iter(trainer._loader()))
        assert [v.shape[-1] for v in views] == sizes and all(v.shape[0] == 4 for v in views) and not failed
