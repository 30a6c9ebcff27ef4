"""The MoCo model (He et al., CVPR 2020, Algorithm 1): query/key encoders, momentum update, queue, InfoNCE logits."""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_retrieval.architectures import build_resnet, feature_dim

from . import distributed
from .method import Contrastive
from .split_bn import SplitBatchNorm2d

BN_MODES = ("split", "shuffle", "sync", "none")


def build_encoder(
    arch: str, dim: int, mlp: bool, cifar_stem: bool, bn_splits: int = 1, zero_init_residual: bool = False
) -> nn.Module:
    """A ResNet whose fc is the projection head: Linear(dim), or MoCo v2's MLP (fc.0, ReLU, fc.2).

    bn_splits > 1: SplitBatchNorm2d everywhere (single-device shuffle-BN emulation). --bn sync's
    global BatchNorm is applied by the trainer under DDP (global_bn.synchronise_batchnorm)."""
    norm_layer = partial(SplitBatchNorm2d, num_splits=bn_splits) if bn_splits > 1 else None
    encoder = build_resnet(
        arch, num_classes=dim, cifar_stem=cifar_stem, norm_layer=norm_layer, zero_init_residual=zero_init_residual
    )
    if mlp:
        dim_mlp = feature_dim(encoder)
        encoder.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), encoder.fc)
    return encoder


class MoCo(Contrastive):
    """f_q, f_k and the queue; forward(im_q, im_k) returns InfoNCE logits with the positive at index 0.

    shuffle_keys: shuffle the key batch before f_k and unshuffle after (shuffle-BN); with one
    process it is a local permutation, meaningful together with SplitBatchNorm2d.
    symmetric: also contrast (im_k as query, im_q as key); logits/labels of both directions are
    stacked (2N rows) and 2N keys are enqueued; `loss` sums the two directions' losses.
    """

    query_prefix = "encoder_q."

    def __init__(
        self,
        encoder_q: nn.Module,
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        symmetric: bool = False,
        shuffle_keys: bool = True,
    ) -> None:
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.symmetric, self.shuffle_keys = symmetric, shuffle_keys
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)  # f_k.params = f_q.params
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False  # not updated by gradient
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def encoders(self) -> tuple[nn.Module, nn.Module]:
        """(f_q, f_k)."""
        return self.encoder_q, self.encoder_k

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q, over all parameters at once (two multi-tensor ops instead of two
        per parameter: the same arithmetic, without ~120 kernel launches each step on a GPU)."""
        params_k = list(self.encoder_k.parameters())
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, list(self.encoder_q.parameters()), alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, *keys: torch.Tensor) -> None:
        """Overwrite the oldest keys with this step's keys of all processes, wrapping around the end.

        Each argument is gathered separately (rank 0's slice first), so the queue receives every key
        batch in global batch order and all processes hold the same queue.
        """
        keys = torch.cat([distributed.concat_all_gather(k) for k in keys])
        n = keys.shape[0]
        if n > self.K:
            raise ValueError(f"{n} keys per step exceed the queue size K={self.K}")
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=keys.device)) % self.K
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + n) % self.K

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        if self.shuffle_keys:
            im_k, idx_unshuffle = distributed.batch_shuffle(im_k)
        k = F.normalize(self.encoder_k(im_k).float(), dim=1)
        if self.shuffle_keys:
            k = distributed.batch_unshuffle(k, idx_unshuffle)
        return k

    def _logits(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """[l_pos, l_neg] / τ, in float32 even under autocast (bf16 would round logits of magnitude 1/τ)."""
        with torch.autocast(q.device.type, enabled=False):
            return self._logits_fp32(q.float(), k.float(), queue.float())

    def _logits_fp32(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: Nx1
        l_neg = torch.einsum("nc,ck->nk", q, queue)  # negative logits: NxK
        return torch.cat([l_pos, l_neg], dim=1) / self.T

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queue = self.queue.clone().detach()
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)
            k2 = self._keys(im_q) if self.symmetric else None
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        logits = self._logits(q, k, queue)
        if self.symmetric:
            q2 = F.normalize(self.encoder_q(im_k).float(), dim=1)
            logits = torch.cat([logits, self._logits(q2, k2, queue)], dim=0)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives at 0
        self._dequeue_and_enqueue(*((k, k2) if self.symmetric else (k,)))
        return logits, labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """InfoNCE of forward's output: mean cross-entropy per direction, summed over directions,
        i.e. L(q1, k2) + L(q2, k1) when symmetric, as in the official CIFAR-10 demo and MoCo v3
        (an average would make each symmetric step half as large at the same lr)."""
        directions = 2 if self.symmetric else 1  # each direction contributes N of the rows
        return F.cross_entropy(logits.float(), labels) * directions
