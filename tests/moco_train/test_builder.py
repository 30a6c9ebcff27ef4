"""The MoCo module against the paper's pseudocode: InfoNCE logits, queue, momentum update, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_train.builder import MoCo, build_encoder
from moco_train.distributed import batch_shuffle, batch_unshuffle


def tiny_encoder(dim: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, dim))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_logits_and_loss_match_the_infonce_formula():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder(), dim=8, K=16, m=0.99, T=0.2)
    queue = model.queue.clone()
    im_q, im_k = images(4, 1), images(4, 2)
    logits, labels = model(im_q, im_k)

    q = F.normalize(model.encoder_q(im_q), dim=1)
    k = F.normalize(model.encoder_k(im_k), dim=1)  # f_k == f_q: momentum of equal weights is a no-op
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.2
    assert logits.shape == (4, 17)
    assert torch.equal(labels, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(logits, expected)
    # InfoNCE: -log( exp(q·k+/τ) / Σ exp(q·k_i/τ) ), averaged over the batch
    loss = F.cross_entropy(logits, labels)
    by_hand = (-expected[:, 0] + torch.log(torch.exp(expected).sum(1))).mean()
    torch.testing.assert_close(loss, by_hand)


def test_forward_enqueues_the_normalised_keys():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder(), dim=8, K=16)
    im_k = images(4, 2)
    model(images(4, 1), im_k)
    k = F.normalize(model.encoder_k(im_k), dim=1)
    torch.testing.assert_close(model.queue[:, :4], k.T)
    assert int(model.queue_ptr) == 4


def test_queue_order_wraparound_and_smaller_last_batch():
    model = MoCo(tiny_encoder(2), dim=2, K=10)
    batches = [torch.full((4, 2), float(i)) for i in (1, 2, 3)] + [torch.full((3, 2), 4.0)]
    for b in batches:
        model._dequeue_and_enqueue(b)
    # 4+4 fill 0..7; batch 3 fills 8, 9 then wraps to 0, 1; the smaller batch 4 fills 2..4
    assert model.queue[0].tolist() == [3, 3, 4, 4, 4, 2, 2, 2, 3, 3]
    assert int(model.queue_ptr) == 5


def test_more_keys_than_the_queue_is_refused():
    model = MoCo(tiny_encoder(2), dim=2, K=4)
    with pytest.raises(ValueError, match="exceed the queue"):
        model._dequeue_and_enqueue(torch.zeros(5, 2))


def test_momentum_update():
    model = MoCo(tiny_encoder(), dim=8, K=16, m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for pk_old, pq, pk in zip(before_k, model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pk, pk_old.mul(0.9).add(pq, alpha=0.1))  # θ_k ← m·θ_k + (1 − m)·θ_q, to the bit


def test_key_encoder_gets_no_gradient():
    torch.manual_seed(0)
    model = MoCo(build_encoder("resnet18", 16, mlp=True, cifar_stem=True, bn_splits=2), dim=16, K=32)
    logits, labels = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    F.cross_entropy(logits, labels).backward()
    assert all(not p.requires_grad and p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())


def test_symmetric_loss_contrasts_both_ways_and_enqueues_both_keys():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder(), dim=8, K=16, T=0.1, symmetric=True)
    queue = model.queue.clone()
    im_1, im_2 = images(3, 1), images(3, 2)
    logits, labels = model(im_1, im_2)
    z1, z2 = (F.normalize(model.encoder_q(x), dim=1) for x in (im_1, im_2))
    expected = (
        torch.cat(
            [
                torch.cat([(z1 * z2).sum(1, keepdim=True), z1 @ queue], 1),
                torch.cat([(z2 * z1).sum(1, keepdim=True), z2 @ queue], 1),
            ]
        )
        / 0.1
    )
    torch.testing.assert_close(logits, expected)
    assert labels.shape == (6,) and int(model.queue_ptr) == 6
    # The loss is L(q1, k2) + L(q2, k1), the sum of the two directions (not their mean).
    zero = torch.zeros(3, dtype=torch.long)
    by_hand = F.cross_entropy(expected[:3], zero) + F.cross_entropy(expected[3:], zero)
    torch.testing.assert_close(model.loss(logits, labels), by_hand)


def test_asymmetric_loss_is_the_plain_infonce():
    torch.manual_seed(0)
    model = MoCo(tiny_encoder(), dim=8, K=16, T=0.1)
    logits, labels = model(images(3, 1), images(3, 2))
    torch.testing.assert_close(model.loss(logits, labels), F.cross_entropy(logits, labels))


def test_mlp_head_has_the_official_key_names():
    names = set(build_encoder("resnet18", 128, mlp=True, cifar_stem=True).state_dict())
    assert {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"} <= names


def test_local_batch_shuffle_is_undone_by_unshuffle():
    torch.manual_seed(0)
    x = torch.arange(16.0).view(8, 2)
    shuffled, idx_unshuffle = batch_shuffle(x)
    assert sorted(shuffled[:, 0].tolist()) == x[:, 0].tolist()
    assert not torch.equal(shuffled, x)
    assert torch.equal(batch_unshuffle(shuffled, idx_unshuffle), x)


def test_shuffle_bn_keys_stay_aligned_with_their_queries():
    """With split BN the shuffled key forward differs from an unshuffled one (other groups), yet
    each key is still computed from its own image: in eval mode (plain BN) shuffling is invisible."""
    torch.manual_seed(0)
    model = MoCo(build_encoder("resnet18", 16, mlp=False, cifar_stem=True, bn_splits=4), dim=16, K=64).eval()
    im_k = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        plain = F.normalize(model.encoder_k(im_k), dim=1)
        torch.testing.assert_close(model._keys(im_k), plain)
