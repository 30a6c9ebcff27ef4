"""The ResNets' strided convolutions on a 1 x 1 input (CentreTapConv2d): exact in value and gradient,
and right in bf16 where oneDNN's own kernel returned garbage weight gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moco_retrieval.architectures import CentreTapConv2d, build_resnet


def scribble_heap(dtype: torch.dtype) -> None:
    """Free a few MB of NaNs, so that a kernel reading memory it never wrote reads NaNs."""
    junk = [torch.full((1 << 18,), float("nan"), dtype=dtype) for _ in range(8)]
    del junk


@pytest.mark.parametrize("cifar_stem", (True, False))
def test_every_strided_same_padded_conv_is_centre_tap(cifar_stem):
    model = build_resnet("resnet18", cifar_stem=cifar_stem)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    kinds = {(type(m), m.kernel_size) for m in strided}
    # the 3x3 convs opening layers 2-4 (and the 7x7 stem) take the centre tap; the 1x1 downsamples need none
    assert (CentreTapConv2d, (3, 3)) in kinds and (nn.Conv2d, (1, 1)) in kinds
    assert ((CentreTapConv2d, (7, 7)) in kinds) == (not cifar_stem)
    assert model.state_dict().keys() == build_resnet("resnet18", cifar_stem=cifar_stem).state_dict().keys()


@pytest.mark.parametrize("size", (1, 2, 5))
def test_centre_tap_equals_the_convolution_in_float64(size):
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True).double()
    tap = CentreTapConv2d(8, 16, 3, stride=2, padding=1, bias=True).double()
    tap.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8, size, size, dtype=torch.float64)
    grads = []
    for conv in (plain, tap):
        xi = x.clone().requires_grad_(True)
        out = conv(xi)
        out.backward(torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).view_as(out) / 100)
        grads.append((out.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_bf16_weight_gradient_of_a_1x1_input_is_right():
    """layer4's first conv of a CIFAR-stem ResNet-18 on a 4 px crop's 1 x 1 feature map, in bf16, 20
    times with NaNs freed on the heap before each: its weight gradient matches float64 every time.
    With a plain Conv2d this failed 20 of 20 on a CPU with AVX512-BF16 (oneDNN's kernel); where bf16
    is emulated, torch's own path was already right."""
    torch.manual_seed(0)
    conv = build_resnet("resnet18", cifar_stem=True).layer4[0].conv1  # 256 -> 512, 3x3, stride 2
    x, g = torch.randn(8, 256, 1, 1), torch.randn(8, 512, 1, 1)
    weight = conv.weight.detach().clone()
    reference = torch.nn.grad.conv2d_weight(x.double(), weight.shape, g.double(), stride=2, padding=1)
    for _ in range(20):
        scribble_heap(torch.bfloat16)
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.backward(g.to(out.dtype))
        error = (conv.weight.grad.double() - reference).abs().max().item()
        assert error <= 0.02 * reference.abs().max().item(), error
