"""MoCo v3 (Chen, Xie and He, ICCV 2021, Algorithm 1): no queue; the keys are the momentum
encoder's outputs for the whole batch of every process, and the loss is symmetric.

    f_q: base encoder + projection MLP + prediction MLP;  f_k: momentum copy of base + projection
    for x in loader:
        x1, x2 = aug(x), aug(x)
        q1, q2 = f_q(x1), f_q(x2)
        k1, k2 = f_k(x1), f_k(x2)
        loss = ctr(q1, k2) + ctr(q2, k1)
        loss.backward(); update(f_q); f_k = m*f_k + (1-m)*f_q
    def ctr(q, k):
        logits = mm(q, k.t())            # [N, N·world] pairs, positives on this process's diagonal
        labels = range(N) + N·rank
        return 2τ · CrossEntropyLoss(logits / τ, labels)
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_retrieval.architectures import build_resnet, feature_dim
from moco_retrieval.vit import VIT_ARCHS, build_vit

from . import distributed
from .method import Contrastive


def build_mlp(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True, last_bias: bool = False
) -> nn.Sequential:
    """MoCo v3's MLP: (Linear without bias, BN, ReLU) per hidden layer, then Linear and (last_bn) a
    BN without affine parameters. Its indices (0, 1, 3, 4, 6, 7) are the official ones. Its BNs are
    plain BatchNorm1d, as the official code's; under DDP the trainer makes every BN of the model
    global (global_bn.synchronise_batchnorm), as the official code converts it to SyncBatchNorm.
    The other methods' heads are the same MLP: SimCLR's (2 layers, last BN), Barlow Twins' projector
    (3 layers) and BYOL's and SwAV's (2 layers, the last Linear with a bias: `last_bias`; their
    hidden Linears' biases, which the BN after them cancels, are left out)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = input_dim if i == 0 else mlp_dim
        dim_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=last_bias and i == num_layers - 1))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def build_base_encoder(arch: str, dim: int, mlp_dim: int, cifar_stem: bool, stop_grad_conv1: bool) -> nn.Module:
    """A ViT whose `head` is the 3-layer projection MLP, or a ResNet whose `fc` is the 2-layer one
    (zero-initialised last BN of each residual block, as the official v3 ResNet recipe)."""
    if arch in VIT_ARCHS:
        encoder = build_vit(arch, stop_grad_conv1=stop_grad_conv1)
        encoder.head = build_mlp(3, encoder.embed_dim, mlp_dim, dim)
        return encoder
    encoder = build_resnet(arch, cifar_stem=cifar_stem, zero_init_residual=True)
    encoder.fc = build_mlp(2, feature_dim(encoder), mlp_dim, dim)
    return encoder


class MoCoV3(Contrastive):
    """base_encoder (f_q without the predictor), momentum_encoder (f_k) and predictor, named as in
    the official code. forward(x1, x2) returns both directions' logits stacked (2N, N·world) and
    their labels, like MoCo.forward; `loss` turns them into ctr(q1, k2) + ctr(q2, k1). The momentum
    m is set by the trainer before each step (cosine schedule from --moco-m to 1). The predictor
    ends in a BN for ViTs and without one for ResNets (official MoCo_ViT and MoCo_ResNet)."""

    query_prefix = "base_encoder."

    def __init__(
        self,
        base_encoder: nn.Module,
        dim: int = 256,
        mlp_dim: int = 4096,
        T: float = 0.2,
        m: float = 0.99,
        predictor_last_bn: bool = False,
    ) -> None:
        super().__init__()
        self.T, self.m = T, m
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder)
        for param in self.momentum_encoder.parameters():
            param.requires_grad = False  # not updated by gradient
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=predictor_last_bn)

    def encoders(self) -> tuple[nn.Module, nn.Module]:
        """(f_q without the predictor, f_k)."""
        return self.base_encoder, self.momentum_encoder

    @torch.no_grad()
    def _update_momentum_encoder(self) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q over all parameters at once (as MoCo v1/v2's update)."""
        params_k = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, list(self.base_encoder.parameters()), alpha=1.0 - self.m)

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q·k / τ against the keys of every process, in float32 even under autocast."""
        with torch.autocast(q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(distributed.concat_all_gather(k.float()), dim=1)
            return q @ k.T / self.T

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder()
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        n = q1.shape[0]
        labels = torch.arange(n, device=q1.device) + n * distributed.get_rank()  # positives: this slice's diagonal
        logits = torch.cat([self._logits(q1, k2), self._logits(q2, k1)])
        return logits, torch.cat([labels, labels])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ctr(q1, k2) + ctr(q2, k1), each a mean cross-entropy times 2τ (which keeps the gradient's
        scale independent of τ, as in the official code)."""
        return F.cross_entropy(logits.float(), labels) * 2 * (2 * self.T)
