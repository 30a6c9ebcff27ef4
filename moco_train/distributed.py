"""The trainer's collectives, with and without gradients: MoCo's batch shuffle for shuffle-BN, BN
statistics and loss averaging, gathers of the global batch (the process-group helpers live in
moco_retrieval.process_group and are re-exported here).

In one process the key batch is permuted locally (SplitBatchNorm2d then normalises it in groups,
as separate GPUs would); under torch.distributed the batch is gathered from all processes,
permuted with a permutation broadcast from rank 0, and scattered back, exactly as in the official
facebookresearch/moco code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moco_retrieval.process_group import (
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed,
    init_process_group,
    is_distributed,
)

__all__ = [
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "average_batchnorm_statistics",
    "barrier",
    "batch_shuffle",
    "batch_unshuffle",
    "broadcast_object",
    "concat_all_gather",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "init_process_group",
    "is_distributed",
]


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over processes of each rank's tensor (e.g. the per-process losses, for logging)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over processes (SwAV's Sinkhorn in the log domain)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def average_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Replace every BatchNorm's running mean and variance by their mean over the processes.

    Under per-process BatchNorm (MoCo's shuffle-BN, split BN) each process's running statistics
    follow only its own share of the batch, and rank 0's are the ones checkpointed and exported.
    The update r <- (1 - m)·r + m·s is linear, so the mean over processes of their running
    statistics is what one process normalising the same groups would hold; averaging them before
    each checkpoint makes the saved statistics those of the global batch and independent of the
    process count (BN statistics that are already global are left as they are)."""
    if not is_distributed():
        return
    buffers = [
        buf
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        for buf in (module.running_mean, module.running_var)
    ]
    flat = torch.cat([buf.flatten() for buf in buffers])
    dist.all_reduce(flat)
    flat /= get_world_size()
    for buf, mean in zip(buffers, flat.split([buf.numel() for buf in buffers])):
        buf.copy_(mean.view_as(buf))


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' tensors concatenated along dim 0 (no gradient flows back); identity in one process."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the (global) batch; returns this process's shuffled part and the inverse permutation."""
    if not is_distributed():
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_procs = x_gather.shape[0] // batch_size_this
    idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(num_procs, -1)[get_rank()]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo batch_shuffle: this process gets back the keys of its own (unshuffled) samples."""
    if not is_distributed():
        return x[idx_unshuffle]
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    num_procs = x_gather.shape[0] // batch_size_this
    idx_this = idx_unshuffle.view(num_procs, -1)[get_rank()]
    return x_gather[idx_this]


class _AllReduceSum(torch.autograd.Function):
    """The sum over processes of each process's tensor; the gradient is summed the same way (each
    process's loss depends on every process's contribution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes, with the gradient flowing back to every process's tensor (identity in
    one process): global BatchNorm's statistics, Barlow Twins' cross-correlation."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' tensors concatenated along dim 0 (rank 0's first), differentiable: each process
    receives the gradient of every process's loss with respect to its own rows (identity in one
    process). SimCLR's negatives are the other processes' embeddings, with their gradients, as the
    official code's cross-replica concatenation (a sum of zero-padded blocks) gives them."""
    if not is_distributed():
        return tensor
    n, world, rank = tensor.shape[0], get_world_size(), get_rank()
    padded = tensor.new_zeros((world, *tensor.shape))
    padded = padded.index_copy(0, torch.tensor([rank], device=tensor.device), tensor.unsqueeze(0))
    return all_reduce_sum(padded).reshape(world * n, *tensor.shape[1:])
