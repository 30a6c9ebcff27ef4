"""`moco-train train --nproc N`: N training processes on this machine, wired like torchrun (env://).

Each child runs the same command line with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and a
free MASTER_PORT on 127.0.0.1 set; if one exits with an error the others are stopped. For several
machines, elastic restarts (--max-restarts) or rendezvous options, use torchrun itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from moco_retrieval.net import free_port

from .config import ConfigError


def launch(argv: list[str], nproc: int, device: str, batch_size: int) -> int:
    """Run `python -m moco_train ARGV` as ranks 0..nproc-1; the exit status of the first to fail, else 0."""
    import torch

    if nproc < 1:
        raise ConfigError("--nproc must be at least 1")
    if batch_size % nproc:
        raise ConfigError(f"batch size {batch_size} is not divisible by {nproc} processes")
    if device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} exceeds the {torch.cuda.device_count()} visible GPUs")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    procs = [
        subprocess.Popen([sys.executable, "-m", "moco_train", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(nproc)
    ]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return failed[0] if failed else 0
