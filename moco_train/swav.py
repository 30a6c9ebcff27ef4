"""SwAV (Caron et al., NeurIPS 2020): swapped prediction of online cluster assignments. As the
official code (facebookresearch/swav, main_swav.py) computes it:

    prototypes C: K x d (normalised before every step; frozen for the first iterations)
    for x in loader:
        crops = [2 at the input size] + [n_small smaller ones]       # multi-crop
        z = normalize(g(f(crops)))                # (V·n) x d, one backbone pass per resolution
        p = z · Cᵀ                                # (V·n) x K scores
        for s in (0, 1):                          # the crops assigned codes
            q_s = sinkhorn(exp([queue_s · Cᵀ; p_s] / ε))[-n:]   # n x K, equipartitioned over the
                                                  # global batch (and queue), 3 iterations
            queue_s ← [z_s; queue_s][:L]          # once the queue has started
            loss += mean_{v≠s} −Σ_k q_s log softmax(p_v / τ)
        loss /= 2

Sinkhorn-Knopp runs over the global batch without gathering it: each process's row and column
sums are all-reduced, as the official distributed_sinkhorn does. The queue (for small batches: it
gives Sinkhorn more samples to spread over the prototypes) holds the last L embeddings of the whole
global batch, identical on every process; each process feeds Sinkhorn its own L/world rows of it,
so the processes together feed each queued embedding once, as the official per-process queues do,
and rank 0's checkpoint holds all of it (the official code saves one queue file per process). The
queue is used once full (its last row non-zero), from --swav-queue-start epochs on.

Where this differs from the official code, deliberately: each resolution's crops pass through the
projection head's BatchNorm as their own batch (the official code runs the head once over every
crop); the queue is global rather than per process (the same rows reach Sinkhorn); LARS excludes
biases and BN parameters from the adaptation and weight decay (apex's LARC does not).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .method import Method

ASSIGNED_CROPS = (0, 1)  # crops_for_assign: the two crops at the input size


def logsumexp_all(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """log Σ exp(x) over every process's x along `dim` (kept), or over everything (a 1 x 1 result),
    stabilised by the largest term: max over the processes, then the sum of exp(x - max)."""
    if dim is None:
        return logsumexp_all(x.reshape(1, -1), dim=1)
    peak = distributed.all_reduce_max(x.amax(dim=dim, keepdim=True))
    return peak + distributed.all_reduce_sum((x - peak).exp().sum(dim=dim, keepdim=True)).log()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes Q (B x K) whose columns (prototypes) share the global batch equally and whose rows
    (samples) each sum to 1, from scores (B x K) of this process's samples; sums over every process.

    The official iteration, in the log domain: log Q = S/ε, and each division by a sum is the
    subtraction of a logsumexp. The same numbers where exp(S/ε) is representable; where it is not
    (ε < 1/88 in float32 for unit-norm scores, or a prototype whose every exp underflows, which the
    official code divides 0 by 0 for), still finite."""
    log_q = (scores.float() / epsilon).T  # K x B
    batch = log_q.shape[1] * distributed.get_world_size()
    log_prototypes, log_batch = math.log(log_q.shape[0]), math.log(batch)
    log_q = log_q - logsumexp_all(log_q)
    for _ in range(iterations):
        log_q = log_q - logsumexp_all(log_q, dim=1) - log_prototypes  # each prototype's total: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_batch  # each sample's total: 1/B
    return (log_q + log_batch).exp().T  # each sample's codes sum to 1


class SwAV(Method):
    """f and g as one module (a ResNet whose fc is the projection head), the prototypes, and the
    queue (2 x L x d: one per assigned crop, newest first). forward(*crops) returns every crop's
    scores (V·n x K) and the assigned crops' codes (2·n x K); `loss` is the swapped prediction."""

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 128,
        prototypes: int = 3000,
        T: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_start: int = 0,
        freeze_prototypes: int = 0,
    ) -> None:
        super().__init__()
        self.encoder, self.T = encoder, T
        self.epsilon, self.sinkhorn_iterations = epsilon, sinkhorn_iterations
        self.queue_start, self.freeze_prototypes = queue_start, freeze_prototypes  # in steps
        self.prototypes = nn.Linear(dim, prototypes, bias=False)
        self.register_buffer("queue", torch.zeros(len(ASSIGNED_CROPS), queue_length, dim))
        self.queue_on = False  # set by begin_step from the global step (not state: resume recomputes it)

    def begin_step(self, step: int) -> None:
        """Normalise the prototypes, and start filling the queue from its start step on."""
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.queue_on = self.queue.shape[1] > 0 and step >= self.queue_start

    def after_backward(self, step: int) -> None:
        """The prototypes get no update during the first iterations (their gradient is dropped)."""
        if step < self.freeze_prototypes:
            self.prototypes.weight.grad = None

    def _embed(self, crops: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Normalised embeddings of every crop, in crop order: one encoder pass per run of same-size crops."""
        out, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            out.append(self.encoder(torch.cat(crops[start:end])))
            start = end
        return F.normalize(torch.cat(out).float(), dim=1)

    @torch.no_grad()
    def _codes(self, z: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
        """The assigned crops' codes (2·n x K), with the queue's scores ahead of the batch's once it is full."""
        world, rank = distributed.get_world_size(), distributed.get_rank()
        length = self.queue.shape[1]
        codes = []
        for slot, crop in enumerate(ASSIGNED_CROPS):
            out = scores[crop * n : (crop + 1) * n]  # n x K
            if self.queue_on and bool(self.queue[slot, -1].any()):  # full: its oldest row is filled
                mine = self.queue[slot, rank * length // world : (rank + 1) * length // world]  # L/world x d
                out = torch.cat([mine @ self.prototypes.weight.T, out])
            codes.append(sinkhorn(out, self.epsilon, self.sinkhorn_iterations)[-n:])
            if self.queue_on:  # newest first: the global batch's embeddings, rank 0's first
                newest = distributed.concat_all_gather(z[crop * n : (crop + 1) * n])
                self.queue[slot] = torch.cat([newest, self.queue[slot, : length - newest.shape[0]]])
        return torch.cat(codes)

    def forward(self, *crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = crops[0].shape[0]
        z = self._embed(crops)  # (V·n) x d
        with torch.autocast(z.device.type, enabled=False):  # scores, exp(score / ε) and logs in float32
            scores = self.prototypes(z)  # (V·n) x K
            return scores, self._codes(z.detach(), scores.detach(), n)

    def loss(self, scores: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """For each assigned crop s, the mean over the other crops v of −Σ_k q_s log softmax(p_v / τ)."""
        n = codes.shape[0] // len(ASSIGNED_CROPS)
        crops = scores.shape[0] // n
        log_p = F.log_softmax(scores.float() / self.T, dim=1).view(crops, n, -1)  # V x n x K
        total = scores.new_zeros(())
        for slot, crop in enumerate(ASSIGNED_CROPS):
            q = codes[slot * n : (slot + 1) * n]
            others = [v for v in range(crops) if v != crop]
            total = total + sum(-(q * log_p[v]).sum(dim=1).mean() for v in others) / len(others)
        return total / len(ASSIGNED_CROPS)
