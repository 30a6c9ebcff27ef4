"""Backbones: any torchvision ResNet (with the CIFAR stem and split BatchNorm), and the exported
encoder built from a ResNet or a ViT."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .vit import VIT_ARCHS, build_vit

RESNET_ARCHS = tuple(
    name for name in torchvision.models.list_models(module=torchvision.models)
    if name.startswith(("resnet", "resnext", "wide_resnet"))
)


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
            grouped, running_mean, running_var,
            self.weight.repeat(splits), self.bias.repeat(splits),
            True, self.momentum if self.momentum is not None else 0.1, self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, c).mean(0))
            self.running_var.copy_(running_var.view(splits, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.reshape(n // splits, splits, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def build_resnet(arch: str, num_classes: int = 1000, cifar_stem: bool = False,
                 bn_splits: int = 1, sync_bn: bool = False, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet with random weights (never downloaded).

    cifar_stem: 3x3 stride-1 first conv and no max-pool, for images of 64 px or less.
    bn_splits > 1: SplitBatchNorm2d everywhere (single-device shuffle-BN emulation).
    sync_bn: convert BatchNorm to SyncBatchNorm (multi-process alternative to shuffle-BN).
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(RESNET_ARCHS)}")
    norm_layer = partial(SplitBatchNorm2d, num_splits=bn_splits) if bn_splits > 1 else None
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, norm_layer=norm_layer,
                                         zero_init_residual=zero_init_residual)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features that feed the ResNet's classifier (512 for ResNet-18/34)."""
    fc = model.fc
    if isinstance(fc, nn.Linear):
        return fc.in_features
    first = next(m for m in fc.modules() if isinstance(m, nn.Linear))
    return first.in_features


HEADS = ("none", "linear", "mlp")


def head_prefix(arch: str) -> str:
    """Where an encoder's projection head (or classifier) lives: a ResNet's fc, a ViT's head."""
    return "head." if arch in VIT_ARCHS else "fc."


def backbone_dim(arch: str) -> int:
    """Width of the backbone's feature: pooled ResNet features, a ViT's class token."""
    return VIT_ARCHS[arch].embed_dim if arch in VIT_ARCHS else feature_dim(build_resnet(arch))


def build_backbone(arch: str, cifar_stem: bool, head: str = "none", head_dim: int = 128) -> nn.Module:
    """The exported/served encoder: a ResNet or ViT whose output is the backbone feature (head
    "none"), or a ResNet's MoCo projection head output: "linear" (v1) or "mlp" (v2: fc.0, ReLU, fc.2)."""
    if arch in VIT_ARCHS:
        if head != "none":
            raise ValueError(f"a {arch} export serves its class token (head none), not a {head} head")
        return build_vit(arch)
    model = build_resnet(arch, cifar_stem=cifar_stem)
    width = feature_dim(model)
    if head == "none":
        model.fc = nn.Identity()
    elif head == "linear":
        model.fc = nn.Linear(width, head_dim)
    elif head == "mlp":
        model.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, head_dim))
    else:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    return model
