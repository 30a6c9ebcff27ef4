"""The process group of a job launched by torchrun (or `moco-train train --nproc`), shared by every
multi-process command: training, `moco-train embed` and `retrieval-server migrate`. One process is
a group of one: every helper is then a no-op."""

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
        store = dist.PrefixStore(f"moco_retrieval/restart_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)
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


def destroy() -> None:
    """Leave the process group (no-op in one process)."""
    if is_distributed():
        dist.destroy_process_group()
