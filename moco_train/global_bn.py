"""BatchNorm over the global batch of all processes, on any device and backend.

torch's SyncBatchNorm runs on GPUs only (NCCL); GlobalBatchNorm does the same arithmetic with
an autograd-aware all_reduce (distributed.all_reduce_sum), so it also runs over gloo on CPUs. Its statistics
are computed and all-reduced in float32 whatever the autocast dtype (bf16 sums of a few thousand
activations lose most of their digits, and the float32 running buffers cannot take a bf16 update),
and the output is cast back to the input's dtype, as BatchNorm under autocast returns it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed


class _GlobalBatchNorm:
    """forward() for the BatchNorm classes below: in training under torch.distributed, normalise
    by the mean and (biased) variance of all processes' samples, with the gradient flowing through
    the global statistics as in SyncBatchNorm; otherwise, the plain BatchNorm of its base class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.is_distributed()):
            return super().forward(x)
        all_reduce = distributed.all_reduce_sum
        dims = [0, *range(2, x.dim())]  # all but the channels: (N,) or (N, H, W)
        shape = [1, -1] + [1] * (x.dim() - 2)  # a per-channel vector broadcast over x
        n = x.numel() // x.shape[1] * distributed.get_world_size()
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            mean = all_reduce(xf.sum(dims)) / n
            centred = xf - mean.view(shape)
            var = all_reduce((centred * centred).sum(dims)) / n  # two passes: no E[x²] - E[x]² cancellation
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), self.momentum)
                self.num_batches_tracked.add_(1)
            out = centred * torch.rsqrt(var + self.eps).view(shape)
            if self.affine:
                out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d over the global batch (MoCo v3's MLPs)."""


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d over the global batch (a ResNet backbone)."""


def has_global_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _GlobalBatchNorm) for m in module.modules())


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1d/2d replaced by its global counterpart, parameters and
    running statistics kept (the state dict's keys and values are unchanged)."""
    for cls, global_cls in ((nn.BatchNorm1d, GlobalBatchNorm1d), (nn.BatchNorm2d, GlobalBatchNorm2d)):
        if type(module) is cls:
            converted = global_cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            ).to(module.running_mean.device)
            converted.load_state_dict(module.state_dict())
            converted.train(module.training)
            return converted
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child))
    return module


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` over the global batch, as the official MoCo v3 code does under
    DDP (convert_sync_batchnorm on the whole model): SyncBatchNorm's fused kernels on GPUs,
    GlobalBatchNorm elsewhere. In one process, the module unchanged."""
    if not distributed.is_distributed():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_global_batchnorm(module)
