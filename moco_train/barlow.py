"""Barlow Twins (Zbontar, Jing, Misra, LeCun and Deny, ICML 2021): the cross-correlation of the two
views' embeddings, each normalised along the batch, is pushed to the identity. As the official code
(facebookresearch/barlowtwins, main.py) computes it:

    for x in loader:
        y1, y2 = aug1(x), aug2(x)                 # BYOL's asymmetric pair
        z1, z2 = g(f(y1)), g(f(y2))               # n x D; g: Linear-BN-ReLU, Linear-BN-ReLU, Linear
        c = bn(z1)ᵀ · bn(z2) / N                  # D x D; bn: BatchNorm without affine, N the global batch
        c = Σ over processes                      # every process's share of the global batch
        loss = Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij²  # λ = 5e-3

The projector's widths are the official 8192-8192-8192 scaled down for the CPU (the trainer's
default is 2048-2048-2048: --moco-mlp-dim and --moco-dim set them). Under several processes every
BatchNorm is global (the official code converts the model to SyncBatchNorm), so bn() normalises
each view over the global batch.

Where this differs from the official code, deliberately: the sum over processes is an
autograd-aware all-reduce (distributed.all_reduce_sum) where the official code's
torch.distributed.all_reduce passes no gradient to the other processes' shares, which makes each
step's gradient 1/world of the global batch's; here it is that gradient, as in one process. λ is
the paper's 5e-3 (the code's default is 0.0051). As in the official code, biases and BN parameters
train at 0.0048/0.2 of the weights' rate (config.paper_defaults: bias_lr_scale); the cosine ends at 0,
not at a thousandth of the rate.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed
from .method import Method


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class BarlowTwins(Method):
    """f and g as one module (a ResNet whose fc is the projector), and the affine-free BatchNorm of
    the embeddings. forward(y1, y2) returns the cross-correlation matrix c (D x D)."""

    def __init__(self, encoder: nn.Module, dim: int, lambd: float = 5e-3) -> None:
        super().__init__()
        self.encoder, self.lambd = encoder, lambd
        self.bn = nn.BatchNorm1d(dim, affine=False)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor]:
        z1, z2 = self.encoder(y1), self.encoder(y2)  # n x D
        with torch.autocast(z1.device.type, enabled=False):  # a sum over the batch of products, in float32
            c = self.bn(z1.float()).T @ self.bn(z2.float())  # D x D
            global_batch = z1.shape[0] * distributed.get_world_size()
            return (distributed.all_reduce_sum(c / global_batch),)

    def loss(self, c: torch.Tensor) -> torch.Tensor:
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        return on_diag + self.lambd * off_diagonal(c).pow(2).sum()
