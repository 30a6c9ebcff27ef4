"""Training checkpoints: atomic save with rotation, RNG capture, resume from the newest valid file,
and conversion of a checkpoint (ours or an official MoCo one) into the export format."""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco_retrieval.export import EXPORT_FORMAT, ExportError, ExportMeta, make_export
from moco_retrieval.fileio import atomic_torch_save
from moco_retrieval.preprocessing import Preprocessing

CHECKPOINT_FORMAT = "moco-retrieval.checkpoint"
CHECKPOINT_VERSION = 1
# f_q inside the official checkpoints: facebookresearch/moco (v1/v2) and facebookresearch/moco-v3. The
# other methods' encoders are ResNets, written in v1/v2's layout.
OFFICIAL_PREFIX = {"v2": "module.encoder_q.", "v3": "module.base_encoder."}
# ... and inside ours (the MoCo and MoCoV3 modules' attribute names), for checkpoints written before
# they recorded their method's encoder_prefix.
QUERY_PREFIX = {"v2": "encoder_q.", "v3": "base_encoder."}
# Our own metadata inside a --format official file (the official scripts ignore unknown keys).
OFFICIAL_EXTRA = "moco_retrieval"
_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or is not one of ours."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{global_step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """This run's checkpoints, oldest first (ordered by global step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint_<global step>.pt atomically, then delete all but the newest `keep`."""
    path = atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state},
        checkpoint_path(Path(run_dir), state["global_step"]),
    )
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_file(path: str | Path) -> dict[str, Any]:
    """torch.load a checkpoint/export file safely (weights_only) on the CPU."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such file") from exc
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt/foreign files are all the same error
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: not a checkpoint")
    return blob


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    blob = load_file(path)
    if blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a moco-train checkpoint")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {blob.get('version')} is not supported")
    return blob


def find_resume(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of the run that loads; unreadable (e.g. truncated) ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"ignoring {exc}", stacklevel=2)
    return None


@dataclass(frozen=True)
class EncoderWeights:
    """f_q's weights as a file holds them, and what the file says about them.

    state: the encoder's own keys (conv1.weight, layer1.0.bn1.weight, ... or a ViT's blocks.0.attn...,
    and its projection head or classifier: a ResNet's fc.*, a ViT's head.*); arch: None when the
    file does not name it (a plain state dict); preprocessing: None when the file does not record
    it; layout: the official checkpoint layout it converts to, "v2" (module.encoder_q.*: MoCo v1/v2 and
    every other method's ResNet) or "v3" (module.base_encoder.*); predictor: the prediction MLP of
    a v3 (or BYOL) checkpoint (its keys 0.weight, 1.weight, ...), None elsewhere."""

    state: dict[str, torch.Tensor]
    arch: str | None
    cifar_stem: bool
    preprocessing: Preprocessing | None
    train_args: dict[str, Any]
    source: str
    layout: str = "v2"
    predictor: dict[str, torch.Tensor] | None = None


def has_cifar_stem(state: dict[str, torch.Tensor]) -> bool:
    """A ResNet whose first conv is 3x3 has the CIFAR stem (the standard stem's is 7x7; ViTs have neither)."""
    return "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3


def is_resnet_state_dict(blob: Any) -> bool:
    return isinstance(blob, dict) and "conv1.weight" in blob and "layer1.0.conv1.weight" in blob


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export_layout(train_args: dict[str, Any]) -> str:
    """The official layout of an export's encoder: recorded as "layout", or (exports written before
    --method) as "method"."""
    return train_args.get("layout") or train_args.get("method", "v2")


def official_method(blob: Any) -> str | None:
    """ "v2" or "v3" for a facebookresearch/moco or moco-v3 checkpoint (state_dict with module.*), else None."""
    state = blob.get("state_dict") if isinstance(blob, dict) else None
    if isinstance(state, dict):
        for method, prefix in OFFICIAL_PREFIX.items():
            if any(k.startswith(prefix) for k in state):
                return method
    return None


def encoder_weights(blob: dict[str, Any], source: str) -> EncoderWeights:
    """The f_q weights of an export, one of our checkpoints (v1/v2 or v3), an official checkpoint
    of facebookresearch/moco or moco-v3 (ours in --format official too), or a plain torchvision
    ResNet state dict (bare, or under "state_dict" / "model")."""
    if blob.get("format") == EXPORT_FORMAT:
        meta = ExportMeta.from_dict(blob["meta"])
        return EncoderWeights(
            blob["state_dict"],
            meta.arch,
            meta.cifar_stem,
            meta.preprocessing,
            meta.train_args,
            meta.source or source,
            export_layout(meta.train_args),
        )
    if blob.get("format") == CHECKPOINT_FORMAT:
        layout = "v3" if blob["args"].get("moco_v3") else "v2"
        return EncoderWeights(
            strip_prefix(blob["model"], blob.get("encoder_prefix", QUERY_PREFIX[layout])),
            blob["arch"],
            blob["cifar_stem"],
            Preprocessing.from_dict(blob["preprocessing"]),
            {**blob["args"], "layout": layout},
            f"{source} (step {blob['global_step']})",
            layout,
            strip_prefix(blob["model"], "predictor.") or None,
        )
    method = official_method(blob)
    if method is not None:
        state = strip_prefix(blob["state_dict"], OFFICIAL_PREFIX[method])
        ours = blob.get(OFFICIAL_EXTRA, {})  # present when moco-train wrote the file
        preprocessing = Preprocessing.from_dict(ours["preprocessing"]) if "preprocessing" in ours else Preprocessing()
        return EncoderWeights(
            state,
            blob.get("arch", "resnet50"),
            has_cifar_stem(state),
            preprocessing,
            {},
            ours.get("source", f"{source} (official MoCo checkpoint)"),
            method,
            strip_prefix(blob["state_dict"], "module.predictor.") if method == "v3" else None,
        )
    plain = next((b for b in (blob, blob.get("state_dict"), blob.get("model")) if is_resnet_state_dict(b)), None)
    if plain is not None:
        return EncoderWeights(dict(plain), None, has_cifar_stem(plain), None, {}, f"{source} (ResNet state dict)")
    raise CheckpointError(f"{source}: neither a moco-train checkpoint, an export, nor an official MoCo checkpoint")


def to_export(blob: dict[str, Any], source: str, keep_head: bool = False) -> dict[str, Any]:
    """The export dict of a file's contents: an export as is, else the f_q of our checkpoint or of
    an official MoCo checkpoint (ImageNet preprocessing unless the file records its own); the
    backbone alone unless keep_head (see export.make_export)."""
    if blob.get("format") == EXPORT_FORMAT:
        return blob
    weights = encoder_weights(blob, source)
    if weights.arch is None:
        raise CheckpointError(
            f"{source}: a plain state dict names no architecture; it can start training (--init) but not be exported"
        )
    try:
        return make_export(
            weights.state,
            arch=weights.arch,
            cifar_stem=weights.cifar_stem,
            preprocessing=weights.preprocessing or Preprocessing(),
            train_args=weights.train_args,
            source=weights.source,
            keep_head=keep_head,
        )
    except RuntimeError as exc:
        raise ExportError(f"{source}: weights do not fit {weights.arch} ({str(exc).splitlines()[0]})") from exc


def to_official(blob: dict[str, Any], source: str) -> dict[str, Any]:
    """The layout of facebookresearch/moco's main_moco.py checkpoints: f_q's weights (with the
    projection head when the file has it) under state_dict as module.encoder_q.*, which its
    main_lincls.py --pretrained and detection/convert-pretrain-to-detectron2.py read (a v3 encoder:
    module.base_encoder.*, as moco-v3's main_moco.py saves and its main_lincls.py reads). Tensors and
    plain values only, so torch.load(weights_only=True) reads it too. What those scripts ignore
    (stem, preprocessing) rides along under OFFICIAL_EXTRA, so the file converts back exactly."""
    weights = encoder_weights(blob, source)
    if weights.arch is None:
        raise CheckpointError(f"{source}: a plain state dict names no architecture")
    prefix = OFFICIAL_PREFIX[weights.layout]
    return {
        "arch": weights.arch,
        "state_dict": {f"{prefix}{k}": v.detach().cpu().clone() for k, v in weights.state.items()},
        OFFICIAL_EXTRA: {
            "cifar_stem": weights.cifar_stem,
            "source": weights.source,
            "preprocessing": (weights.preprocessing or Preprocessing()).to_dict(),
        },
    }
