"""Optimisers and per-step schedules: SGD, LARS and AdamW; lr warm-up then cosine (or steps); the key
encoder momentum's cosine ramp to 1 (MoCo v3, BYOL)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is rescaled to trust_coefficient x ‖w‖ /
    ‖g + wd·w‖ (You et al., 2017), as MoCo v3 trains ResNets. Biases and normalisation parameters
    (the 1-D tensors) get neither the rescaling nor weight decay. The momentum buffer `mu` is
    optimizer state, so checkpoints resume it exactly."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["trust_coefficient"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])


def build_optimizer(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float, momentum: float, bias_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """The optimizer over one group, or (bias_lr_scale != 1, Barlow Twins' official LARS) two: the
    weights at lr, then the biases and normalisation parameters (the 1-D tensors) at lr x bias_lr_scale.
    The lr schedule multiplies each group's own rate."""
    if bias_lr_scale != 1.0:
        params = [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "lr": lr * bias_lr_scale},
        ]
    if name == "sgd":
        return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(
    step: int, total_steps: int, steps_per_epoch: int, warmup_epochs: float, cos: bool, schedule: list[int]
) -> float:
    """The lr multiplier at a step: linear warm-up from 0 over warmup_epochs, then a half-cosine to
    0 over the remaining steps (cos), or x0.1 at each `schedule` epoch (MoCo v1's step schedule)."""
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return step / warmup
    if cos:
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))
    epoch = step // steps_per_epoch
    return 0.1 ** sum(epoch >= milestone for milestone in schedule)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """The key encoder momentum at a step: base at step 0, rising to 1 at the end on a half-cosine."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * (1.0 - base)
