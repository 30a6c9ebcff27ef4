"""SimCLR (Chen, Kornblith, Norouzi and Hinton, ICML 2020): the end-to-end mechanism, where the keys
are the other images of the batch, with gradients through both sides. As the official code
(google-research/simclr, objective.py add_contrastive_loss) computes it:

    for x in loader:
        z = normalize(g(f(cat(aug(x), aug(x)))))      # 2n x d, one forward for both views
        z1, z2 = split(z)                             # n x d each; gathered over processes: N x d
        logits_ab = z1 · z2_allᵀ / τ                  # n x N: positives at this process's diagonal
        logits_aa = z1 · z1_allᵀ / τ, own entry masked # n x N: the other images' first views
        loss = CE([logits_ab, logits_aa], diag) + CE([logits_ba, logits_bb], diag)   # 2N - 2 negatives

The head g is SimCLR v1's 2-layer MLP (Linear, BN, ReLU, Linear, BN; the hidden width is the
backbone's), or with head="linear" a single Linear layer (MoCo v1's and InstDisc's head, which
bench/mechanisms.py gives all three mechanisms). Under several processes every BatchNorm is global
and the negatives are gathered with their gradients, as the official code's cross-replica
concatenation does, so the loss and gradients are those of one process on the global batch.

Where this differs from the official code, deliberately: the last BN of the head has no learnable
scale (the official one has a scale and no centre); the masked logits are -inf instead of
-1e9 (the same softmax); LARS is our optim.LARS (biases and BN parameters excluded from the
adaptation and weight decay, as the official code does with its exclusion list).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .method import Contrastive


class SimCLR(Contrastive):
    """f and g as one module (a ResNet whose fc is the head). forward(x1, x2) returns both
    directions' logits stacked (2n, 2N) with the positive's column in the labels."""

    def __init__(self, encoder: nn.Module, T: float = 0.1) -> None:
        super().__init__()
        self.encoder, self.T = encoder, T

    def _logits(self, z_a: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor, rank: int) -> torch.Tensor:
        """[z_a · all_bᵀ, z_a · all_aᵀ with each image's own entry masked] / τ: n x 2N."""
        n = z_a.shape[0]
        own = torch.arange(n, device=z_a.device) + n * rank  # this process's rows in the global batch
        logits_aa = (z_a @ all_a.T).masked_fill(F.one_hot(own, all_a.shape[0]).bool(), float("-inf"))
        return torch.cat([z_a @ all_b.T, logits_aa], dim=1) / self.T

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, rank = x1.shape[0], distributed.get_rank()
        z = self.encoder(torch.cat([x1, x2]))  # 2n x d: both views through one BatchNorm batch
        with torch.autocast(z.device.type, enabled=False):  # logits of magnitude 1/τ in float32
            z1, z2 = F.normalize(z.float(), dim=1).split(n)
            all1, all2 = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)  # N x d
            logits = torch.cat([self._logits(z1, all1, all2, rank), self._logits(z2, all2, all1, rank)])
        labels = torch.arange(n, device=x1.device) + n * rank  # the other view of the same image
        return logits, torch.cat([labels, labels])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """loss_a + loss_b, each a mean cross-entropy over this process's images (the official sum)."""
        return F.cross_entropy(logits.float(), labels) * 2
