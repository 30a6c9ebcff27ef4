"""MoCo v3 against its pseudocode: the symmetric InfoNCE with the 2τ factor, the predictor, the frozen
patch projection, the momentum schedule, LARS, the ViT, and official moco-v3 checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_retrieval.export import embed, export_model
from moco_retrieval.vit import VIT_ARCHS, build_vit, sincos_position_embedding
from moco_train.builder_v3 import MoCoV3, build_base_encoder, build_mlp
from moco_train.checkpoint import load_file, to_export
from moco_train.config import ConfigError, TrainConfig, resolve
from moco_train.optim import LARS, cosine_momentum, lr_factor
from moco_train.trainer import Trainer
from tests.images import noise_images


def tiny_base(dim: int = 8) -> nn.Module:
    """A linear "backbone" on 2x2 images and the 2-layer projection MLP."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 16), build_mlp(2, 16, 32, dim))


def test_loss_is_the_symmetric_infonce_times_two_tau():
    torch.manual_seed(0)
    model = MoCoV3(tiny_base(), dim=8, mlp_dim=32, T=0.5, m=0.99)
    x1, x2 = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    logits, labels = model(x1, x2)
    # By hand: q = predictor(base(x)), k = momentum(x) (after the momentum update; equal weights at
    # step 0, so f_k == f_q's base), logits q·k / τ, positives on the diagonal.
    with torch.no_grad():
        q1, q2 = (F.normalize(model.predictor(model.base_encoder(x)), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(model.momentum_encoder(x), dim=1) for x in (x1, x2))
    torch.testing.assert_close(logits, torch.cat([q1 @ k2.T, q2 @ k1.T]) / 0.5)
    assert torch.equal(labels, torch.cat([torch.arange(6), torch.arange(6)]))

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # -log softmax of the diagonal, times 2τ
        sims = q @ k.T / 0.5
        return (-(sims.diag() - sims.logsumexp(dim=1))).mean() * 2 * 0.5

    torch.testing.assert_close(model.loss(logits, labels), ctr(q1, k2) + ctr(q2, k1))


def test_only_the_base_encoder_and_predictor_learn_and_the_key_encoder_follows_by_momentum():
    torch.manual_seed(0)
    model = MoCoV3(tiny_base(), dim=8, mlp_dim=32, T=0.2, m=0.9)
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    assert not hasattr(model.momentum_encoder, "predictor")  # f_k has no predictor
    logits, labels = model(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))
    model.loss(logits, labels).backward()
    assert all(p.grad is not None for p in [*model.base_encoder.parameters(), *model.predictor.parameters()])
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    model._update_momentum_encoder()
    for old, q, k in zip(before, model.base_encoder.parameters(), model.momentum_encoder.parameters()):
        assert torch.equal(k, old.mul(0.9).add(q, alpha=0.1))


def test_mlps_have_the_official_layout():
    projector = build_mlp(3, 384, 4096, 256)
    assert [type(m).__name__ for m in projector] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert projector[0].bias is None and not projector[7].affine  # no bias; last BN without affine
    assert [type(m).__name__ for m in build_mlp(2, 256, 4096, 256, last_bn=False)][-1] == "Linear"
    # The predictor: official MoCo_ResNet drops its last BN, MoCo_ViT keeps it (predictor.4).
    resnet = MoCoV3(build_base_encoder("resnet18", 16, 32, cifar_stem=True, stop_grad_conv1=False), 16, 32)
    vit = MoCoV3(build_base_encoder("vit_tiny_32", 16, 32, False, True), 16, 32, predictor_last_bn=True)
    assert [type(m).__name__ for m in resnet.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in vit.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert "predictor.4.running_mean" in vit.state_dict() and not vit.predictor[4].affine


def test_momentum_schedule_runs_from_099_to_1_and_lr_warms_up_then_decays():
    assert cosine_momentum(0, 1000, 0.99) == 0.99
    assert cosine_momentum(1000, 1000, 0.99) == 1.0
    assert cosine_momentum(500, 1000, 0.99) == pytest.approx(0.995)
    assert lr_factor(0, 100, 10, warmup_epochs=2, cos=True, schedule=[]) == 0.0
    assert lr_factor(10, 100, 10, warmup_epochs=2, cos=True, schedule=[]) == 0.5
    assert lr_factor(20, 100, 10, warmup_epochs=2, cos=True, schedule=[]) == 1.0
    assert lr_factor(60, 100, 10, warmup_epochs=2, cos=True, schedule=[]) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, warmup_epochs=2, cos=True, schedule=[]) == pytest.approx(0.0)


def test_lars_scales_weight_matrices_and_leaves_biases_and_norms_alone():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    update = gw + 0.1 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * update * (0.001 * w0.norm() / update.norm()))
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # no decay, no trust ratio
    w.grad, b.grad = gw, gb
    opt.step()  # the momentum buffer carries the first update
    assert set(opt.state_dict()["state"][0]) == {"mu"}


def test_vit_shapes_position_embedding_and_official_names():
    model = build_vit("vit_tiny_32")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    pos = sincos_position_embedding(8, 192)
    assert pos.shape == (1, 65, 192) and torch.equal(pos[0, 0], torch.zeros(192))
    assert torch.equal(model.pos_embed, pos) and not model.pos_embed.requires_grad
    names = set(model.state_dict())
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.11.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
    } <= names  # timm's names, which the official moco-v3 checkpoints use
    with pytest.raises(ValueError, match="32 px model got a 64 px input"):
        model(torch.randn(1, 3, 64, 64))
    assert VIT_ARCHS["vit_small"].num_heads == 12  # MoCo v3's ViT-S


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return noise_images(tmp_path_factory.mktemp("imgs"), 16, size=(32, 32))


def vit_trainer(images, run_dir, **kwargs) -> Trainer:
    return Trainer(
        TrainConfig(
            data=str(images),
            run_dir=str(run_dir),
            **{"moco_v3": True, "arch": "vit_tiny_32", **kwargs},
            batch_size=8,
            moco_mlp_dim=32,
            moco_dim=16,
            workers=0,
            warmup_epochs=0.5,
            lr=1e-3,
            progress=False,
        )
    )


def test_the_patch_projection_stays_frozen_while_the_rest_trains(images, tmp_path):
    trainer = vit_trainer(images, tmp_path, max_steps=3)
    proj = trainer.model.base_encoder.patch_embed.proj
    before = {k: v.clone() for k, v in trainer.model.base_encoder.state_dict().items()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(proj.weight) not in optimised and id(proj.bias) not in optimised
    trainer.fit()
    after = trainer.model.base_encoder.state_dict()
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert torch.equal(after["patch_embed.proj.bias"], before["patch_embed.proj.bias"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    # The momentum followed its schedule: after the last step's update it is the step-2 value.
    assert trainer.model.m == pytest.approx(cosine_momentum(2, 3, 0.99))

    unfrozen = vit_trainer(images, tmp_path / "b", max_steps=1, stop_grad_conv1=False)
    assert unfrozen.model.base_encoder.patch_embed.proj.weight.requires_grad


def test_official_moco_v3_vit_checkpoint_converts(tmp_path):
    """What facebookresearch/moco-v3's main_moco.py saves: module.base_encoder.* (head = projector),
    module.momentum_encoder.*, module.predictor.*."""
    torch.manual_seed(2)
    base = build_base_encoder("vit_tiny_32", 16, 32, cifar_stem=False, stop_grad_conv1=True)
    state = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": v.clone() for k, v in base.state_dict().items()})
    state["module.predictor.0.weight"] = torch.randn(32, 16)
    torch.save({"epoch": 300, "arch": "vit_tiny_32", "state_dict": state}, tmp_path / "vit.pth.tar")
    model, meta = export_model(to_export(load_file(tmp_path / "vit.pth.tar"), "vit.pth.tar"))
    assert (meta.arch, meta.feature_dim, meta.head) == ("vit_tiny_32", 192, "none")
    reference = build_vit("vit_tiny_32")
    reference.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("head.")})
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(embed(model, x), F.normalize(reference.eval()(x), dim=1), rtol=0, atol=0)
    assert math.isclose(float(embed(model, x).norm(dim=1)[0]), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("arch", ["vit_tiny_32", "resnet18"])
def test_init_from_an_official_v3_checkpoint_takes_backbone_head_and_predictor(images, tmp_path, arch):
    """A checkpoint in moco-v3's main_moco.py layout (module.base_encoder.*, module.momentum_encoder.*,
    module.predictor.*; a ViT's predictor ends in a BN without affine, predictor.4): --init loads
    f_q's backbone and projector and the predictor, and f_k starts as f_q."""
    torch.manual_seed(5)
    vit = arch in VIT_ARCHS
    official = MoCoV3(build_base_encoder(arch, 16, 32, True, True), 16, 32, predictor_last_bn=vit)
    for module in official.modules():
        if isinstance(module, nn.BatchNorm1d):  # statistics unlike a fresh model's
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    state = {f"module.{k}": v for k, v in official.state_dict().items()}
    assert ("module.predictor.4.running_var" in state) == vit
    torch.save({"epoch": 300, "arch": arch, "state_dict": state}, tmp_path / "official.pth.tar")
    crop = {} if vit else {"crop_size": 32}
    args = dict(arch=arch, seed=1, init=str(tmp_path / "official.pth.tar"), **crop)
    trainer = vit_trainer(images, tmp_path / "run", max_steps=1, **args)
    assert trainer.init_source.endswith("backbone, projection head and predictor")
    expected = official.state_dict()
    for name, value in trainer.model.state_dict().items():
        source = "base_encoder." + name.split(".", 1)[1] if name.startswith("momentum_encoder.") else name
        assert torch.equal(value, expected[source]), name


def test_official_recipe_defaults_and_the_v3_learning_rate_rule():
    """v3's --lr is moco-v3's base rate (x batch/256); v1/v2's is the rate itself, as in moco's code.
    Warm-up and crop-min follow the official recipe of each architecture; small crops keep 0.08."""
    official_vit = TrainConfig(data="d", run_dir="r", moco_v3=True, arch="vit_small", batch_size=1024, epochs=300)
    v3_vit = resolve(official_vit, small=False)
    assert (v3_vit.optimizer, v3_vit.warmup_epochs, v3_vit.crop_min) == ("adamw", 40, 0.08)
    assert v3_vit.lr == pytest.approx(1.5e-4 * 1024 / 256)
    official_r50 = TrainConfig(
        data="d", run_dir="r", moco_v3=True, arch="resnet50", batch_size=4096, lr=0.6, epochs=100
    )
    v3_resnet = resolve(official_r50, small=False)
    assert (v3_resnet.optimizer, v3_resnet.warmup_epochs, v3_resnet.crop_min) == ("lars", 10, 0.2)
    assert v3_resnet.lr == pytest.approx(9.6)  # CONFIG.md's 100-epoch ResNet-50: 0.6 x 4096/256
    assert resolve(TrainConfig(data="d", run_dir="r", moco_v3=True), small=True).crop_min == 0.08
    v2 = TrainConfig(data="d", run_dir="r", batch_size=512, lr=0.06)
    v2.apply_v2()
    assert (resolve(v2, small=False).lr, resolve(v2, small=False).crop_min, resolve(v2, small=True).crop_min) == (
        0.06,
        0.2,
        0.08,
    )
    assert resolve(TrainConfig(data="d", run_dir="r", crop_min=0.5), small=True).crop_min == 0.5
    with pytest.raises(ConfigError, match="--crop-min 0"):
        resolve(TrainConfig(data="d", run_dir="r", crop_min=0.0), small=True)
