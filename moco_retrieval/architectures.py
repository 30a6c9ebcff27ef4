"""The architectures an export can name: any torchvision ResNet (optionally with the CIFAR stem) and
the ViTs of moco_retrieval.vit, and the exported encoder (backbone, or a MoCo v1/v2 head) built from them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .vit import VIT_ARCHS, build_vit

RESNET_ARCHS = tuple(
    name
    for name in torchvision.models.list_models(module=torchvision.models)
    if name.startswith(("resnet", "resnext", "wide_resnet"))
)


class CentreTapConv2d(nn.Conv2d):
    """A strided 'same'-padded convolution that computes a 1 x 1 input as what it is: the output is
    1 x 1 and only the kernel's centre tap meets data (every other tap reads padding), so it is the
    1 x 1 convolution by that tap, exactly, in value and gradient.

    Why: oneDNN's bf16 weight-gradient kernel for a 3 x 3, stride-2, padding-1 convolution of a 1 x 1
    input (torch 2.14 on CPUs with AVX512-BF16) reads memory it never wrote, so the gradient of the
    outer taps is whatever the heap held: usually near zero, sometimes 1e30 or NaN (every trial once
    the heap holds NaNs; tests/moco_retrieval/test_architectures.py). ResNets reach that case when a
    crop is 4 px or less before layer4 (CIFAR stem: crops of 4 px or less; standard stem: 16 px or
    less, e.g. SwAV's small crops of 32 px images), and a SwAV step in bf16 then wrote NaN weights."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            kh, kw = self.kernel_size
            return F.conv2d(x, weight[:, :, kh // 2 : kh // 2 + 1, kw // 2 : kw // 2 + 1], bias, groups=self.groups)
        return super()._conv_forward(x, weight, bias)


def centre_tap_convs(model: nn.Module) -> nn.Module:
    """Make every strided, odd-kernel (larger than 1), 'same'-padded convolution of `model` a
    CentreTapConv2d (in place: the same parameters under the same names)."""
    for module in model.modules():
        if type(module) is nn.Conv2d and max(module.stride) > 1 and module.padding_mode == "zeros":
            kh, kw = module.kernel_size
            odd = kh % 2 and kw % 2 and max(kh, kw) > 1
            if odd and module.padding == (kh // 2, kw // 2) and module.dilation == (1, 1):
                module.__class__ = CentreTapConv2d
    return model


def build_resnet(
    arch: str,
    num_classes: int = 1000,
    cifar_stem: bool = False,
    norm_layer: Callable[[int], nn.Module] | None = None,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A torchvision ResNet with random weights (never downloaded).

    cifar_stem: 3x3 stride-1 first conv and no max-pool, for images of 64 px or less.
    norm_layer: the BatchNorm to use (training passes split or synchronised BatchNorm).
    zero_init_residual: the last BN of each residual block starts at zero (MoCo v3's ResNets).
    Its strided convolutions are CentreTapConv2d (a 1 x 1 input computed exactly on every backend).
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(RESNET_ARCHS)}")
    model = torchvision.models.get_model(
        arch, weights=None, num_classes=num_classes, norm_layer=norm_layer, zero_init_residual=zero_init_residual
    )
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return centre_tap_convs(model)


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
    """Width of the backbone's feature: pooled ResNet features, a ViT's class token. The ResNet is
    built on the meta device: no weights are allocated and no random numbers drawn."""
    if arch in VIT_ARCHS:
        return VIT_ARCHS[arch].embed_dim
    with torch.device("meta"):
        return feature_dim(build_resnet(arch))


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
