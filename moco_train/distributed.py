"""Process-group helpers, collectives with and without gradients, and MoCo's batch shuffle for shuffle-BN.

In one process the key batch is permuted locally (SplitBatchNorm2d then normalises it in groups,
as separate GPUs would); under torch.distributed the batch is gathered from all processes,
permuted with a permutation broadcast from rank 0, and scattered back, exactly as in the official
facebookresearch/moco code.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_process_group(backend: str) -> None:
    """Join the process group described by the environment (torchrun, `--nproc`: env:// rendezvous).

    torchrun's c10d and static rendezvous hand the workers the agent's own TCPStore, and that store
    outlives a restart round (TORCHELASTIC_USE_AGENT_STORE=True). Workers restarted by
    `--max-restarts` could then read the keys of the round that failed, such as a dead peer's
    address, and hang or fail to connect (pytorch/pytorch#135712). On one node the agent's restart
    count names the round for every worker, so the group's keys are prefixed with it. Across
    nodes the agents count restarts apart, and only a fresh store per round is safe: that is
    torchrun's TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which we ask for when restarts are enabled.
    """
    env = os.environ
    shared_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if shared_store and int(env.get("GROUP_WORLD_SIZE", "1")) == 1:
        agent_store = dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=dist.constants.default_pg_timeout
        )
        store = dist.PrefixStore(f"moco_train/restart_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)
        dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
        return
    if shared_store and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env.get("RANK") == "0":
        warnings.warn(
            "torchrun shares its store with the workers across restarts on several nodes; "
            "set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun so that a restarted round "
            "cannot read a failed round's keys (pytorch/pytorch#135712)",
            stacklevel=2,
        )
    dist.init_process_group(backend)


def init_distributed(device_name: str) -> None:
    """Join the process group that torchrun (or `--nproc`) describes in the environment (env://
    rendezvous; no-op for one process): NCCL with each process pinned to GPU LOCAL_RANK, or gloo on
    the CPU, where the cores are divided among the node's processes (torchrun's default is one
    thread each)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
        init_process_group("nccl" if use_cuda else "gloo")


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's picklable value on every process (e.g. the checkpoint that all ranks resume from)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over processes of each rank's tensor (e.g. the per-process losses, for logging)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


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
