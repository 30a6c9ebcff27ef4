"""What the trainer needs of a self-supervised objective: one interface shared by MoCo v1/v2 and v3,
InstDisc, SimCLR, BYOL, Barlow Twins and SwAV, so that data, precision, DDP, checkpoints, the kNN
monitor and export are written once.

A training step, as the trainer runs it:

    method.begin_step(step)                         # step-dependent state (SwAV's queue start)
    output = ddp(*method.inputs(views, index))      # forward: the method's own tensors
    loss = method.loss(*output)                     # the paper's objective, float32
    loss.backward(); method.after_backward(step)    # e.g. SwAV's frozen prototypes
    optimizer.step(); log loss and method.accuracy(*output)

A method is an nn.Module whose state dict holds everything a checkpoint must resume (momentum
copies, queues, memory banks, their pointers). The encoder that is exported and served is
`encoders()[0]`: a ResNet (or ViT) whose `fc` (`head`) is the projection head, stored under
`query_prefix` in the state dict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


class Method(nn.Module):
    """The base of every objective; the defaults suit a method that takes all the views and has no
    step-dependent state."""

    query_prefix = "encoder."  # where encoders()[0] lives in the state dict (what export takes)

    def encoders(self) -> tuple[nn.Module, ...]:
        """(the trained encoder, then its momentum copies): compiled by --compile, and --init loads
        the first and copies it into the others."""
        return (self.encoder,)

    def inputs(self, views: Sequence[torch.Tensor], index: torch.Tensor) -> tuple:
        """forward's arguments from a batch's views and its samples' dataset indices."""
        return tuple(views)

    def begin_step(self, step: int) -> None:
        """Set what depends on the global step, before the forward (nothing by default)."""

    def after_backward(self, step: int) -> None:
        """Adjust the gradients of this step before the optimizer uses them (nothing by default)."""

    def loss(self, *output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def accuracy(self, *output: torch.Tensor) -> torch.Tensor | None:
        """The share of this batch's queries whose positive scores highest (a progress signal for the
        contrastive methods), or None where the objective has no such task."""
        return None

    def knn_bank(self) -> torch.Tensor | None:
        """(N, D) features of the training images, one per dataset index, for the kNN monitor; None:
        the monitor embeds its labelled bank with the exported encoder."""
        return None


class Contrastive(Method):
    """A method whose forward returns (logits, labels): each query's positive among its negatives,
    the labels naming the positive's column (MoCo v1/v2 and v3, SimCLR)."""

    def accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(dim=1) == labels).float().mean()
