"""Instance discrimination with a memory bank (Wu, Xiong, Yu and Lin, CVPR 2018), as its reference
code zhirongw/lemniscate.pytorch trains it (lib/NCEAverage.py, lib/NCECriterion.py):

    memory: N x D, one L2-normalised feature per training image
    for x, i in loader:                           # one augmented view per image, and its index
        v = normalize(f(x))                       # B x D
        idx = [i, m noise indices drawn uniformly from 0..N-1]          # B x (1+m)
        P = exp(memory[idx] · v / τ) / Z          # B x (1+m); Z = N · mean(exp(...)) at the first step
        h = P / (P + m/N)                         # NCE: the chance that a score is the data's, not noise
        loss = -(Σ log h[:, 0] + Σ log(1 - h[:, 1:])) / B
        memory[i] = normalize(0.5 · memory[i] + 0.5 · v)                # after the scores are read

Under several processes the bank is replicated, not sharded: every process holds all N rows and
applies the same update from the gathered (index, feature) pairs of the global batch, so each
scores its images against the bank locally (a sharded bank would add an all-gather of the queries
and an all-to-all of their scores every step), and rank 0's checkpoint holds the whole bank
(N x 128 floats: 26 MB for CIFAR-10's 50,000 images, 655 MB for ImageNet's 1.28M). The noise of
the global batch is drawn on every process from the same RNG stream and each takes its own rows,
so one process and several train alike.

Where this differs from the reference code, deliberately:
  * the bank starts as random unit vectors (the paper's words) where lemniscate draws uniform values
    of about unit norm;
  * the bank is updated in the forward, after the scores are read, instead of in NCEFunction's
    backward: the same values (the update reads the forward's features) without a custom autograd op;
  * the scores are read from v · memoryᵀ (B x N) at the drawn columns: the same numbers as the
    reference code's lookup of 1 + m rows per image (B x (1 + m) x D floats: 268 MB at B 128 and
    m 4096) in a tenth of the memory on CIFAR-10, and under 1% of a ResNet-18 step's arithmetic
    there (for banks of over (1 + m) x D images, ~500k, the lookup would be the smaller);
  * Z is estimated once as in the code, but averaged over the processes' first batches;
  * the optional proximal term (the paper's Eq. 8, absent from the reference code) adds
    λ · ‖v - memory[i]‖² per image to the loss (`prox`; 0, the default, leaves it out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .method import Method

NCE_EPS = 1e-7  # lemniscate's NCECriterion


def nce_loss(probs: torch.Tensor, num_images: int) -> torch.Tensor:
    """The NCE loss of scores P (B, 1 + m), data in column 0 and m noise samples after it, with a
    uniform noise distribution P_n = 1 / num_images (lemniscate's NCECriterion)."""
    m = probs.shape[1] - 1
    noise = m / num_images  # m · P_n
    log_h_data = torch.log(probs[:, 0] / (probs[:, 0] + noise + NCE_EPS))
    log_h_noise = torch.log(noise / (probs[:, 1:] + noise + NCE_EPS))
    return -(log_h_data.sum() + log_h_noise.sum()) / probs.shape[0]


class InstDisc(Method):
    """f (a ResNet whose fc is the 128-d linear projection), the memory bank and Z. forward(x, index)
    returns (P, v, the positives' bank rows); `loss` is the NCE loss plus the proximal term."""

    def __init__(
        self,
        encoder: nn.Module,
        num_images: int,
        dim: int = 128,
        nce_k: int = 4096,
        T: float = 0.07,
        momentum: float = 0.5,
        prox: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_images, self.nce_k, self.T = num_images, nce_k, T
        self.momentum, self.prox = momentum, prox
        self.register_buffer("memory", F.normalize(torch.randn(num_images, dim), dim=1))
        self.register_buffer("Z", torch.tensor(-1.0))  # the normalising constant; < 0 until the first step

    def inputs(self, views: Sequence[torch.Tensor], index: torch.Tensor) -> tuple:
        return views[0], index.to(views[0].device)

    def knn_bank(self) -> torch.Tensor:
        return self.memory

    @torch.no_grad()
    def _noise(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, m) indices drawn uniformly from the whole bank (the reference code's AliasMethod
        over uniform unigrams), this process's rows of the global batch's draw."""
        world, rank = distributed.get_world_size(), distributed.get_rank()
        drawn = torch.randint(self.num_images, (batch * world, self.nce_k), device=device)
        return drawn[rank * batch : (rank + 1) * batch]

    @torch.no_grad()
    def _update_memory(self, v: torch.Tensor, index: torch.Tensor) -> None:
        """memory[i] ← normalize(m · memory[i] + (1 − m) · v_i) for every image of the global batch,
        into a new tensor: the forward's product still holds the old bank for its backward."""
        v, index = distributed.concat_all_gather(v), distributed.concat_all_gather(index)
        mixed = self.memory[index] * self.momentum + v * (1 - self.momentum)
        self.memory = self.memory.index_copy(0, index, F.normalize(mixed, dim=1))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = F.normalize(self.encoder(x).float(), dim=1)  # B x D
        with torch.no_grad():
            idx = torch.cat([index[:, None], self._noise(x.shape[0], x.device)], dim=1)  # B x (1 + m), data first
            previous = self.memory[index]  # B x D, the positives' rows before this step's update
        with torch.autocast(x.device.type, enabled=False):  # exp(1/τ) scores in float32
            scores = torch.exp((v @ self.memory.T).gather(1, idx) / self.T)  # B x N -> B x (1 + m)
            if self.Z < 0:
                with torch.no_grad():
                    self.Z.fill_(distributed.all_reduce_mean(scores.mean()) * self.num_images)
            probs = scores / self.Z
        self._update_memory(v.detach(), index)
        return probs, v, previous

    def loss(self, probs: torch.Tensor, v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """NCE, plus λ · mean ‖v_i − memory_i‖² with the proximal term on."""
        loss = nce_loss(probs, self.num_images)
        if self.prox:
            loss = loss + self.prox * (v - previous).pow(2).sum(dim=1).mean()
        return loss

    def accuracy(self, probs: torch.Tensor, v: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """How often the image's own bank row outscores all its m noise rows."""
        return (probs.argmax(dim=1) == 0).float().mean()
