"""The InstDisc weighted kNN classifier (Wu et al., CVPR 2018), shared by `moco-train knn`, the
training monitor and the server's Classify, so that they cannot drift apart."""

from __future__ import annotations

import torch

DEFAULT_K = 200
DEFAULT_TAU = 0.07


def knn_vote(
    similarities: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, tau: float = DEFAULT_TAU
) -> torch.Tensor:
    """Per-class vote shares of each query.

    similarities: (Q, k) cosine similarities s_i of the top-k neighbours; neighbor_labels: (Q, k)
    int64 class indices. Each neighbour adds exp(s_i / tau) to its class; the result (Q, C) is
    normalised to sum to 1 per row. The row maximum is subtracted before exp, which rescales a row
    by a constant (the shares are unchanged) and keeps small tau from overflowing.
    Padding neighbours (label < 0, e.g. fewer than k items) are ignored.
    """
    sims = similarities.to(torch.float64)
    valid = neighbor_labels >= 0
    sims = sims.masked_fill(~valid, float("-inf"))
    top = sims.max(dim=1, keepdim=True).values.clamp_min(-1e30)
    weights = torch.exp((sims - top) / tau).masked_fill(~valid, 0.0)
    votes = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64, device=sims.device)
    votes.scatter_add_(1, neighbor_labels.clamp_min(0).to(torch.int64), weights)
    total = votes.sum(dim=1, keepdim=True)
    return votes / total.clamp_min(torch.finfo(torch.float64).tiny)


@torch.no_grad()
def knn_classify(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    tau: float = DEFAULT_TAU,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Vote shares (Q, C) for L2-normalised queries (Q, D) against a normalised bank (N, D).

    Queries are processed in chunks so memory stays at chunk_size x N similarities.
    """
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start : start + chunk_size] @ bank.T
        top_sims, top_idx = sims.topk(k, dim=1)
        out.append(knn_vote(top_sims, bank_labels[top_idx], num_classes, tau))
    return torch.cat(out) if out else torch.zeros(0, num_classes, dtype=torch.float64)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percentage of queries whose target is among the top-k voted classes, for each k."""
    result = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == targets.view(-1, 1)).any(dim=1)
        result[f"top{k}"] = 100.0 * hit.float().mean().item() if len(targets) else 0.0
    return result
