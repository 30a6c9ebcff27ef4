"""The InstDisc weighted kNN vote against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from moco_retrieval.knn import knn_classify, knn_vote, topk_accuracy


def test_vote_weights_each_neighbour_by_exp_similarity_over_tau():
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([[0, 1, 0]])
    shares = knn_vote(sims, labels, num_classes=3, tau=0.1)
    e9, e8, e1 = math.exp(9), math.exp(8), math.exp(1)
    total = e9 + e8 + e1
    torch.testing.assert_close(shares, torch.tensor([[(e9 + e1) / total, e8 / total, 0.0]], dtype=torch.float64))


def test_many_weak_neighbours_can_outvote_one_strong_one():
    sims = torch.tensor([[0.50, 0.49, 0.49, 0.49]])
    labels = torch.tensor([[2, 0, 0, 0]])
    assert knn_vote(sims, labels, num_classes=3, tau=1.0).argmax().item() == 0
    assert knn_vote(sims, labels, num_classes=3, tau=0.001).argmax().item() == 2  # small tau: nearest wins


def test_padding_neighbours_are_ignored_and_small_tau_does_not_overflow():
    sims = torch.tensor([[0.99, 0.2, -1.0]])
    labels = torch.tensor([[1, 0, -1]])
    shares = knn_vote(sims, labels, num_classes=2, tau=0.001)
    assert torch.isfinite(shares).all()
    torch.testing.assert_close(shares.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert shares[0, 1] > 0.999


def test_classify_takes_the_top_k_neighbours_by_cosine_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 1, 0])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = knn_classify(queries, bank, bank_labels, num_classes=2, k=2, tau=0.5, chunk_size=1)
    # query 0: neighbours 0 (s=1.0, class 0) and 1 (s=0.8, class 1); query 1: 2 (1.0, class 1), 1 (0.6, class 1)
    expected0 = torch.tensor([math.exp(2.0), math.exp(1.6)], dtype=torch.float64)
    torch.testing.assert_close(scores[0], expected0 / expected0.sum())
    torch.testing.assert_close(scores[1], torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_k_larger_than_the_bank_uses_the_whole_bank():
    scores = knn_classify(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), num_classes=2, k=200
    )
    assert scores.shape == (1, 2) and scores[0, 0] > scores[0, 1] > 0


def test_topk_accuracy():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.4, 0.35, 0.25]])
    targets = torch.tensor([0, 1, 2])
    acc = topk_accuracy(scores, targets, ks=(1, 2))
    assert acc["top1"] == pytest.approx(100.0 / 3)
    assert acc["top2"] == pytest.approx(200.0 / 3)
