"""Which device computes: one rule for training, evaluation and serving."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """auto: this process's GPU when CUDA is available (LOCAL_RANK under torchrun, else 0), else the
    CPU; cpu, cuda and cuda:N as given. A CUDA device on a machine without one is a DeviceError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was given but no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo (elsewhere CPU bf16 is emulated and slower than float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_supports_fp16_autocast() -> bool:
    """Whether this torch build autocasts to float16 on the CPU (it does from 2.x on; it is
    emulated on most CPUs and slow, so it is never chosen automatically: --amp fp16 only)."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
    except RuntimeError:
        return False
    return out.dtype == torch.float16
