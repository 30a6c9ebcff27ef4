"""Split BatchNorm: MoCo's shuffle-BN on one device (BatchNorm in groups, as separate GPUs would)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises the batch in `num_splits` contiguous groups while training.

    On one device this emulates the per-GPU BatchNorm of MoCo's multi-GPU shuffle-BN: with the
    key batch shuffled, no group's statistics tell a query which key is its positive. Group g
    holds samples [g*n, (g+1)*n), as process g would under DDP. Parameters and buffers are those
    of nn.BatchNorm2d, so state dicts are interchangeable; in eval mode it is plain BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = self.num_splits
        if not self.training or splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % splits:
            raise ValueError(f"split BatchNorm needs a batch divisible by {splits}, got {n}")
        # (S*m, C, H, W) -> (m, S*C, H, W): channel block g holds group g's samples.
        grouped = x.reshape(splits, n // splits, c, h, w).transpose(0, 1).reshape(n // splits, splits * c, h, w)
        running_mean = self.running_mean.repeat(splits)
        running_var = self.running_var.repeat(splits)
        out = F.batch_norm(
            grouped,
            running_mean,
            running_var,
            self.weight.repeat(splits),
            self.bias.repeat(splits),
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, c).mean(0))
            self.running_var.copy_(running_var.view(splits, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.reshape(n // splits, splits, c, h, w).transpose(0, 1).reshape(n, c, h, w)
