"""ResNets, the CIFAR stem and split BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moco_retrieval.architectures import build_backbone, build_resnet, feature_dim
from moco_train.builder import build_encoder
from moco_train.global_bn import GlobalBatchNorm1d, GlobalBatchNorm2d, convert_global_batchnorm, synchronise_batchnorm
from moco_train.split_bn import SplitBatchNorm2d


def test_cifar_stem_keeps_resolution():
    model = build_resnet("resnet18", num_classes=10, cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_backbone_outputs_pooled_features():
    assert feature_dim(build_resnet("resnet18")) == 512
    assert feature_dim(build_resnet("resnet50")) == 2048
    model = build_backbone("resnet18", cifar_stem=True).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_resnet("vgg16")


def test_split_batchnorm_normalises_each_group_with_its_own_statistics():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, num_splits=2)
    x = torch.randn(8, 3, 4, 4)
    x[4:] = x[4:] * 5 + 3  # the second group has other statistics
    out = bn(x)
    for g in (slice(0, 4), slice(4, 8)):
        xg = x[g]
        mean = xg.mean(dim=(0, 2, 3), keepdim=True)
        var = xg.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(out[g], (xg - mean) / torch.sqrt(var + bn.eps))
    # running statistics: average over groups of each group's momentum update
    n = 4 * 4 * 4
    group_means = torch.stack([x[g].mean(dim=(0, 2, 3)) for g in (slice(0, 4), slice(4, 8))])
    group_vars = torch.stack(
        [x[g].var(dim=(0, 2, 3), unbiased=False) * n / (n - 1) for g in (slice(0, 4), slice(4, 8))]
    )
    torch.testing.assert_close(bn.running_mean, (0.1 * group_means).mean(0))
    torch.testing.assert_close(bn.running_var, (0.9 + 0.1 * group_vars).mean(0))


def test_split_batchnorm_differs_from_whole_batch_bn_but_shares_its_state_dict():
    torch.manual_seed(0)
    split, plain = SplitBatchNorm2d(3, num_splits=4), nn.BatchNorm2d(3)
    assert set(split.state_dict()) == set(plain.state_dict())
    x = torch.randn(8, 3, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)
    assert not torch.allclose(split(x), plain(x))
    split.eval(), plain.load_state_dict(split.state_dict()), plain.eval()
    torch.testing.assert_close(split(x), plain(x))  # eval: plain BatchNorm with the running stats


def test_split_batchnorm_needs_a_divisible_batch():
    with pytest.raises(ValueError, match="divisible"):
        SplitBatchNorm2d(3, num_splits=4)(torch.randn(6, 3, 2, 2))


def test_split_bn_resnets_and_the_global_bn_conversion_keeps_every_weight():
    split = build_encoder("resnet18", 128, mlp=False, cifar_stem=True, bn_splits=4)
    assert isinstance(split.bn1, SplitBatchNorm2d) and split.bn1.num_splits == 4
    torch.manual_seed(0)
    plain = nn.Sequential(build_encoder("resnet18", 8, mlp=True, cifar_stem=True), nn.BatchNorm1d(8, affine=False))
    for module in plain.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # non-trivial statistics to carry over
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    converted = convert_global_batchnorm(plain)
    assert isinstance(converted[0].bn1, GlobalBatchNorm2d) and isinstance(converted[1], GlobalBatchNorm1d)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert synchronise_batchnorm(plain, torch.device("cpu")) is plain  # one process: nothing to synchronise
    x = torch.randn(4, 3, 16, 16)
    reference = nn.Sequential(build_encoder("resnet18", 8, mlp=True, cifar_stem=True), nn.BatchNorm1d(8, affine=False))
    reference.load_state_dict(before)
    for mode in (True, False):  # one process: plain BatchNorm in training and eval
        torch.testing.assert_close(converted.train(mode)(x), reference.train(mode)(x))
