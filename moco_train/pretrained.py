"""Continued pretraining (`moco-train train --init FILE`): f_q and f_k start from weights that were
pretrained elsewhere, e.g. on a bigger corpus, instead of a random initialisation."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from moco_retrieval.architectures import head_prefix

from .checkpoint import CheckpointError, encoder_weights, load_file


def init_encoder(encoder: nn.Module, path: str | Path, arch: str, cifar_stem: bool) -> str:
    """Load the starting weights of `encoder` (MoCo copies them into f_k) from any file that
    `checkpoint.encoder_weights` reads. The backbone must fit exactly: a wrong architecture or stem
    is a one-line CheckpointError. The projection head is taken when every one of its shapes fits
    (a MoCo file of the same --mlp/--moco-dim) and re-initialised otherwise (an ImageNet classifier,
    another head). Returns what was loaded, for the log."""
    weights = encoder_weights(load_file(path), str(path))
    if weights.arch is not None and weights.arch != arch:
        raise CheckpointError(f"{path}: holds a {weights.arch}, but this run trains a {arch} (use -a {weights.arch})")
    if weights.cifar_stem != cifar_stem:
        stem = {True: "the CIFAR stem (3x3 conv, no max-pool)", False: "the standard stem (7x7 conv, max-pool)"}
        raise CheckpointError(
            f"{path}: was trained with {stem[weights.cifar_stem]}, but this run uses "
            f"{stem[cifar_stem]}; set --cifar-stem or --crop-size to match"
        )
    own = encoder.state_dict()
    prefix = head_prefix(arch)
    head = {k: v for k, v in weights.state.items() if k.startswith(prefix)}
    own_head = {k for k in own if k.startswith(prefix)}
    head_fits = head.keys() == own_head and all(own[k].shape == v.shape for k, v in head.items())
    state = {k: v for k, v in weights.state.items() if not k.startswith(prefix) or head_fits}
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise CheckpointError(f"{path}: weights do not fit {arch} ({str(exc).splitlines()[1].strip()})") from exc
    missing = [k for k in missing if k not in own_head]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return (
        f"{weights.source}: backbone and projection head"
        if head_fits
        else f"{weights.source}: backbone (projection head re-initialised)"
    )
