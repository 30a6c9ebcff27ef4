"""Continued pretraining (`moco-train train --init FILE`): f_q and f_k start from weights that were
pretrained elsewhere, e.g. on a bigger corpus, instead of a random initialisation."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from moco_retrieval.architectures import head_prefix
from moco_retrieval.preprocessing import is_small

from .checkpoint import CheckpointError, EncoderWeights, encoder_weights, load_file

STEMS = {True: "the CIFAR stem (3x3 conv, no max-pool)", False: "the standard stem (7x7 conv, max-pool)"}
CIFAR_SIZE = 32  # the input size of a CIFAR-stem file that records none (a plain state dict)


def read_init(path: str | Path) -> EncoderWeights:
    """What --init FILE holds (a one-line CheckpointError where it holds no encoder)."""
    return encoder_weights(load_file(path), str(path))


def fit_to_init(
    weights: EncoderWeights, path: str | Path, crop_size: int | None, cifar_stem: str, data_size: int
) -> tuple[int | None, str, str | None]:
    """(--crop-size, --cifar-stem, a notice or None) for a run that starts from `weights` on images
    whose own training size is `data_size`: where the stem is left to auto and auto would not give
    the file's, the one flag that fixes it is set. A CIFAR-stem file on large images trains at its
    own input size (32 px for the committed encoder), where auto gives the CIFAR stem; a standard-
    stem file on small images trains with --cifar-stem off; with --crop-size given, the stem is the
    file's. An explicit --cifar-stem is kept, and a mismatch is then init_encoder's one-line error."""
    if cifar_stem != "auto":
        return crop_size, cifar_stem, None
    auto = is_small(crop_size or data_size)
    if auto == weights.cifar_stem:
        return crop_size, cifar_stem, None
    if weights.cifar_stem and crop_size is None:
        size = weights.preprocessing.input_size if weights.preprocessing else CIFAR_SIZE
        size = size if is_small(size) else CIFAR_SIZE
        return (
            size,
            cifar_stem,
            (
                f"--init {path} has {STEMS[True]} and was trained at {size} px: training at --crop-size {size} "
                "(--crop-size and --cifar-stem choose otherwise)"
            ),
        )
    stem = "on" if weights.cifar_stem else "off"
    return crop_size, stem, f"--init {path} has {STEMS[weights.cifar_stem]}: training with --cifar-stem {stem}"


def fits(module: nn.Module, state: dict[str, torch.Tensor] | None, prefix: str = "") -> bool:
    """Whether `state` holds exactly the keys of `module` under `prefix`, each of the same shape."""
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    if not state or {k for k in state if k.startswith(prefix)} != own.keys():
        return False
    return all(own[k].shape == state[k].shape for k in own)


def init_encoder(
    encoder: nn.Module,
    weights: EncoderWeights,
    path: str | Path,
    arch: str,
    cifar_stem: bool,
    predictor: nn.Module | None = None,
) -> str:
    """Load the starting weights of f_q (`encoder`; the trainer copies them into f_k) and, for MoCo
    v3, of its `predictor`, from any file that `checkpoint.encoder_weights` reads. The backbone must
    fit exactly: a wrong architecture or stem is a one-line CheckpointError. The projection head is
    taken when every one of its shapes fits (a MoCo file of the same --mlp/--moco-dim) and
    re-initialised otherwise (an ImageNet classifier, another head); so is v3's predictor (an
    official moco-v3 checkpoint's, ViT or ResNet, or ours). Returns what was loaded, for the log."""
    if weights.arch is not None and weights.arch != arch:
        raise CheckpointError(f"{path}: holds a {weights.arch}, but this run trains a {arch} (use -a {weights.arch})")
    if weights.cifar_stem != cifar_stem:
        raise CheckpointError(
            f"{path}: was trained with {STEMS[weights.cifar_stem]}, but this run uses "
            f"{STEMS[cifar_stem]}; set --cifar-stem or --crop-size to match"
        )
    own = encoder.state_dict()
    prefix = head_prefix(arch)
    head = {k: v for k, v in weights.state.items() if k.startswith(prefix)}
    own_head = {k for k in own if k.startswith(prefix)}
    head_fits = fits(encoder, head, prefix)
    state = {k: v for k, v in weights.state.items() if not k.startswith(prefix) or head_fits}
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise CheckpointError(f"{path}: weights do not fit {arch} ({str(exc).splitlines()[1].strip()})") from exc
    missing = [k for k in missing if k not in own_head]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    loaded = ["backbone", *(["projection head"] if head_fits else [])]
    if predictor is not None and fits(predictor, weights.predictor):
        predictor.load_state_dict(weights.predictor)
        loaded.append("predictor")
    fresh = [name for name in ("projection head", "predictor")[: 1 if predictor is None else 2] if name not in loaded]
    said = f"{weights.source}: {listing(loaded)}"
    return f"{said} ({listing(fresh)} re-initialised)" if fresh else said


def listing(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
