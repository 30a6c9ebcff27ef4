"""Training checkpoints: atomic save with rotation, RNG capture, resume from the newest valid file,
and conversion of a checkpoint (ours or an official MoCo one) into the export format."""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .export import (EXPORT_FORMAT, ExportError, is_official_moco_checkpoint, make_export,
                     official_moco_encoder)
from .fileio import atomic_torch_save
from .transforms import Preprocessing

CHECKPOINT_FORMAT = "moco-retrieval.checkpoint"
CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^checkpoint_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or is not one of ours."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
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
    path = atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state},
                             checkpoint_path(Path(run_dir), state["global_step"]))
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


def to_export(blob: dict[str, Any], source: str, keep_head: bool = False) -> dict[str, Any]:
    """The export dict of a file's contents: an export as is, our checkpoint's f_q, or an official
    facebookresearch/moco checkpoint's (ImageNet preprocessing, standard stem); the f_q backbone
    alone unless keep_head (see export.make_export)."""
    if blob.get("format") == EXPORT_FORMAT:
        return blob
    if blob.get("format") == CHECKPOINT_FORMAT:
        prefix = "encoder_q."
        state = {k[len(prefix):]: v for k, v in blob["model"].items() if k.startswith(prefix)}
        return make_export(state, arch=blob["arch"], cifar_stem=blob["cifar_stem"],
                           preprocessing=Preprocessing.from_dict(blob["preprocessing"]),
                           train_args=blob["args"], source=f"{source} (step {blob['global_step']})",
                           keep_head=keep_head)
    if is_official_moco_checkpoint(blob):
        arch, state = official_moco_encoder(blob)
        try:
            return make_export(state, arch=arch, cifar_stem=False, preprocessing=Preprocessing(),
                               source=f"{source} (official MoCo checkpoint)", keep_head=keep_head)
        except RuntimeError as exc:
            raise ExportError(f"{source}: weights do not fit {arch} ({str(exc).splitlines()[0]})") from exc
    raise CheckpointError(f"{source}: neither a moco-train checkpoint, an export, nor an official MoCo checkpoint")
