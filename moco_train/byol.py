"""BYOL (Grill et al., NeurIPS 2020): no negatives; an online network predicts a slowly moving target
network's projection of another view. As the paper's Algorithm 1 and its reference implementations
(google-deepmind/byol, lucidrains/byol-pytorch) compute it:

    online: f_θ + projector g_θ + predictor q_θ;  target: f_ξ + g_ξ, a momentum copy (no predictor)
    for x in loader:
        v1, v2 = aug1(x), aug2(x)                 # BYOL's asymmetric pair (blur, solarize)
        p1, p2 = q(g(f_θ(v1))), q(g(f_θ(v2)))     # n x 256
        z1, z2 = g(f_ξ(v1)), g(f_ξ(v2))           # n x 256, no gradient
        loss = mean(‖p̄1 − z̄2‖² + ‖p̄2 − z̄1‖²)   # x̄ = x/‖x‖: 2 − 2cos per pair, symmetric
        update θ;  ξ ← τξ + (1 − τ)θ,  τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2
        (τ_base by the run's length, deepmind's presets: 0.97 up to 40 epochs ... 0.996 at 1000)

The projector and predictor are MLPs of one hidden layer (4096, BN, ReLU) to 256, the last Linear with
a bias. The trainer sets τ (`m`) before each step from the global step (optim.cosine_momentum, the
formula above), so a resumed run continues the same schedule; under several processes every
BatchNorm is global, as BYOL's cross-replica BN.

Where this differs from the references, deliberately: the target is moved at the start of each
step with that step's τ (as MoCo v1-v3 move their key encoders), where BYOL moves it after the
optimizer step with the step's τ, so the k-th update uses τ_{k+1} instead of τ_k; each view goes
through the networks as its own BatchNorm batch (deepmind's way; lucidrains concatenates them).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .builder_v3 import build_mlp
from .method import Method


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """‖p/‖p‖ − z/‖z‖‖² = 2 − 2·cos(p, z), per row."""
    return 2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)


class BYOL(Method):
    """online_encoder (f_θ with the projector as its fc), target_encoder (its momentum copy) and
    predictor. forward(v1, v2) returns (p1, p2, z1, z2); `loss` is the symmetric regression loss."""

    query_prefix = "online_encoder."

    def __init__(self, encoder: nn.Module, dim: int = 256, mlp_dim: int = 4096, m: float = 0.996) -> None:
        super().__init__()
        self.m = m
        self.online_encoder = encoder
        self.target_encoder = copy.deepcopy(encoder)
        for param in self.target_encoder.parameters():
            param.requires_grad = False  # not updated by gradient
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False, last_bias=True)

    def encoders(self) -> tuple[nn.Module, nn.Module]:
        """(online f_θ + g_θ, target f_ξ + g_ξ)."""
        return self.online_encoder, self.target_encoder

    @torch.no_grad()
    def _update_target(self) -> None:
        """ξ ← τ·ξ + (1 − τ)·θ, over all parameters at once (as MoCo's key encoder)."""
        params_k = list(self.target_encoder.parameters())
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, list(self.online_encoder.parameters()), alpha=1.0 - self.m)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p1 = self.predictor(self.online_encoder(v1))  # n x dim
        p2 = self.predictor(self.online_encoder(v2))
        with torch.no_grad():
            self._update_target()
            z1, z2 = self.target_encoder(v1), self.target_encoder(v2)  # n x dim
        return p1, p2, z1, z2

    def loss(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """mean over the batch of regression(p1, z2) + regression(p2, z1), in float32."""
        with torch.autocast(p1.device.type, enabled=False):
            return (regression_loss(p1.float(), z2.float()) + regression_loss(p2.float(), z1.float())).mean()
