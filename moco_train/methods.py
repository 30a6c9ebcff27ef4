"""The objectives the trainer can train (--method), each built from the options: its model (a
method.Method), the views its data gives it and how its BatchNorm runs under DDP. The trainer knows
no method by name; adding one is a module beside builder.py and an entry in SPECS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from moco_retrieval.architectures import build_resnet, feature_dim
from moco_retrieval.preprocessing import Preprocessing
from moco_retrieval.vit import VIT_ARCHS

from .barlow import BarlowTwins
from .builder import MoCo, build_encoder
from .builder_v3 import MoCoV3, build_base_encoder, build_mlp
from .byol import BYOL
from .config import ConfigError, Recipe, TrainConfig, auto_queue_size
from .instdisc import InstDisc
from .method import Method
from .simclr import SimCLR
from .swav import SwAV
from .transforms import ViewRecipe, simclr_view, swav_views, v1_v2_view, v3_views

SWAV_SMALL_CROP_SHARE = 96 / 224  # the official small crops' side relative to the large ones'


@dataclass(frozen=True)
class BuildContext:
    """What building a method needs besides the options: facts about the data and the processes."""

    cifar_stem: bool
    num_images: int
    global_batch: int
    steps_per_epoch: int
    bn_splits: int  # MoCo v1/v2: BatchNorm groups inside this process (split-BN)
    shuffle_keys: bool  # MoCo v1/v2: shuffle-BN


@dataclass(frozen=True)
class MethodSpec:
    label: str  # for the log: "v1/v2", "v3", "instdisc", ...
    views: Callable[[Preprocessing, TrainConfig, Recipe], list[ViewRecipe]]
    build: Callable[[TrainConfig, Recipe, BuildContext], Method]
    shuffle_bn: bool  # MoCo v1/v2: --bn applies; every other method's BatchNorms are global under DDP
    cosine: bool  # always warm-up then half-cosine (else --cos chooses against --schedule)


def resnet_with_head(
    arch: str, cifar_stem: bool, head: Callable[[int], nn.Module], zero_init_residual: bool = False
) -> nn.Module:
    """A ResNet (random weights) whose fc is head(backbone width): the method's exported encoder."""
    encoder = build_resnet(arch, cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)
    encoder.fc = head(feature_dim(encoder))
    return encoder


def build_moco(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> MoCo:
    keys_per_step = ctx.global_batch * (2 if cfg.symmetric else 1)
    queue = cfg.moco_k or auto_queue_size(ctx.num_images, keys_per_step)
    if queue < keys_per_step:
        raise ConfigError(f"--moco-k {queue} is smaller than the {keys_per_step} keys enqueued per step")
    encoder = build_encoder(cfg.arch, recipe.moco_dim, cfg.mlp, ctx.cifar_stem, bn_splits=ctx.bn_splits)
    return MoCo(
        encoder,
        dim=recipe.moco_dim,
        K=queue,
        m=recipe.moco_m,
        T=recipe.moco_t,
        symmetric=cfg.symmetric,
        shuffle_keys=ctx.shuffle_keys,
    )


def build_moco_v3(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> MoCoV3:
    encoder = build_base_encoder(cfg.arch, recipe.moco_dim, recipe.mlp_dim, ctx.cifar_stem, cfg.stop_grad_conv1)
    return MoCoV3(
        encoder,
        dim=recipe.moco_dim,
        mlp_dim=recipe.mlp_dim,
        T=recipe.moco_t,
        m=recipe.moco_m,
        predictor_last_bn=cfg.arch in VIT_ARCHS,
    )


def build_instdisc(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> InstDisc:
    encoder = build_encoder(cfg.arch, recipe.moco_dim, mlp=False, cifar_stem=ctx.cifar_stem)  # linear 128-d head
    return InstDisc(
        encoder, ctx.num_images, recipe.moco_dim, cfg.nce_k, recipe.moco_t, momentum=cfg.nce_m, prox=cfg.nce_prox
    )


def build_simclr(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> SimCLR:
    if cfg.simclr_head == "linear":
        encoder = build_encoder(
            cfg.arch,
            recipe.moco_dim,
            mlp=False,
            cifar_stem=ctx.cifar_stem,
            zero_init_residual=recipe.zero_init_residual,
        )
    else:
        encoder = resnet_with_head(
            cfg.arch,
            ctx.cifar_stem,
            lambda width: build_mlp(2, width, recipe.mlp_dim, recipe.moco_dim),
            recipe.zero_init_residual,
        )
    return SimCLR(encoder, T=recipe.moco_t)


def build_byol(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> BYOL:
    def projector(width: int):
        return build_mlp(2, width, recipe.mlp_dim, recipe.moco_dim, last_bn=False, last_bias=True)

    encoder = resnet_with_head(cfg.arch, ctx.cifar_stem, projector, recipe.zero_init_residual)
    return BYOL(encoder, dim=recipe.moco_dim, mlp_dim=recipe.mlp_dim, m=recipe.moco_m)


def build_barlow(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> BarlowTwins:
    encoder = resnet_with_head(
        cfg.arch,
        ctx.cifar_stem,
        lambda width: build_mlp(3, width, recipe.mlp_dim, recipe.moco_dim, last_bn=False),
        recipe.zero_init_residual,
    )
    return BarlowTwins(encoder, recipe.moco_dim, lambd=cfg.barlow_lambda)


def build_swav(cfg: TrainConfig, recipe: Recipe, ctx: BuildContext) -> SwAV:
    def head(width: int):
        return build_mlp(2, width, recipe.mlp_dim, recipe.moco_dim, last_bn=False, last_bias=True)

    queue = cfg.swav_queue - cfg.swav_queue % ctx.global_batch  # whole global batches, as the official code
    return SwAV(
        resnet_with_head(cfg.arch, ctx.cifar_stem, head),
        dim=recipe.moco_dim,
        prototypes=cfg.swav_prototypes,
        T=recipe.moco_t,
        epsilon=cfg.swav_epsilon,
        sinkhorn_iterations=cfg.sinkhorn_iterations,
        queue_length=queue,
        queue_start=round(cfg.swav_queue_start * ctx.steps_per_epoch),
        freeze_prototypes=round(cfg.swav_freeze_prototypes * ctx.steps_per_epoch),
    )


def swav_crops(p: Preprocessing, cfg: TrainConfig, recipe: Recipe) -> list[ViewRecipe]:
    small_size = cfg.multi_crop_size or max(1, round(p.input_size * SWAV_SMALL_CROP_SHARE))
    return swav_views(p, recipe.crop_min, cfg.multi_crop, small_size)


SPECS: dict[str, MethodSpec] = {
    "v1/v2": MethodSpec(
        "v1/v2", lambda p, cfg, r: [v1_v2_view(p, cfg.aug_plus, r.crop_min)] * 2, build_moco, True, False
    ),
    "v3": MethodSpec("v3", lambda p, cfg, r: list(v3_views(p, r.crop_min)), build_moco_v3, False, True),
    "instdisc": MethodSpec(
        "instdisc", lambda p, cfg, r: [v1_v2_view(p, cfg.aug_plus, r.crop_min)], build_instdisc, False, False
    ),
    "simclr": MethodSpec("simclr", lambda p, cfg, r: [simclr_view(p, r.crop_min)] * 2, build_simclr, False, True),
    "byol": MethodSpec("byol", lambda p, cfg, r: list(v3_views(p, r.crop_min)), build_byol, False, True),
    "barlow": MethodSpec("barlow", lambda p, cfg, r: list(v3_views(p, r.crop_min)), build_barlow, False, True),
    "swav": MethodSpec("swav", swav_crops, build_swav, False, True),
}


def method_spec(cfg: TrainConfig) -> MethodSpec:
    """The spec of --method (moco: v1/v2, or v3 with --moco-v3)."""
    if cfg.method == "moco":
        return SPECS["v3" if cfg.moco_v3 else "v1/v2"]
    return SPECS[cfg.method]
