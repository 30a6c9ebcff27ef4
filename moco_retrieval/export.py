"""The export format: the query encoder f_q (by default without its projection head), plus everything
a server needs to reproduce its features exactly. One format, one loader, shared by training and serving."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .architectures import backbone_dim, build_backbone, head_prefix
from .preprocessing import Preprocessing

EXPORT_FORMAT = "moco-retrieval.encoder"
EXPORT_VERSION = 1


class ExportError(ValueError):
    """The file is not a valid export, its weights do not fit its architecture, or they do not match
    its fingerprint."""


@dataclass(frozen=True)
class ExportMeta:
    arch: str
    cifar_stem: bool
    feature_dim: int
    preprocessing: Preprocessing
    fingerprint: str
    train_args: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    # "none": pooled backbone features; "linear"/"mlp": the projection head's output is served.
    head: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "cifar_stem": self.cifar_stem,
            "feature_dim": self.feature_dim,
            "preprocessing": self.preprocessing.to_dict(),
            "fingerprint": self.fingerprint,
            "train_args": self.train_args,
            "source": self.source,
            "head": self.head,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportMeta:
        return cls(
            arch=d["arch"],
            cifar_stem=bool(d["cifar_stem"]),
            feature_dim=int(d["feature_dim"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            fingerprint=d["fingerprint"],
            train_args=dict(d.get("train_args", {})),
            source=d.get("source", ""),
            head=d.get("head", "none"),
        )


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def backbone_state_dict(encoder_state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """An encoder's state dict without its classifier/projection head (a ResNet's fc.*, a ViT's head.*), on the CPU."""
    prefix = head_prefix(arch)
    return {k: v.detach().cpu().clone() for k, v in encoder_state.items() if not k.startswith(prefix)}


def projection_head(encoder_state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(kind, output dim) of an encoder's projection head: MoCo v1's Linear or v2's MLP."""
    if "fc.weight" in encoder_state:
        return "linear", int(encoder_state["fc.weight"].shape[0])
    if "fc.2.weight" in encoder_state and "fc.0.weight" in encoder_state and "fc.1.weight" not in encoder_state:
        return "mlp", int(encoder_state["fc.2.weight"].shape[0])
    raise ExportError(
        "the encoder has no projection head of MoCo v1/v2 to keep (--keep-head serves v1's linear or "
        "v2's MLP head; v3 and ViT exports serve the backbone)"
    )


def make_export(
    encoder_state: dict[str, torch.Tensor],
    *,
    arch: str,
    cifar_stem: bool,
    preprocessing: Preprocessing,
    train_args: dict[str, Any] | None = None,
    source: str = "",
    keep_head: bool = False,
) -> dict[str, Any]:
    """The export as an in-memory dict (fileio.atomic_torch_save writes it); validates the weights by building
    the model. keep_head serves the projection head's output (e.g. 128-d, a 4x smaller index than
    ResNet-18's 512-d pooled features) instead of the pooled backbone features."""
    if keep_head:
        head, dim = projection_head(encoder_state)
        state = {k: v.detach().cpu().clone() for k, v in encoder_state.items()}
    else:
        head, dim = "none", backbone_dim(arch)
        state = backbone_state_dict(encoder_state, arch)
    model = build_backbone(arch, cifar_stem, head, dim)
    model.load_state_dict(state, strict=True)
    meta = ExportMeta(
        arch=arch,
        cifar_stem=cifar_stem,
        feature_dim=dim,
        preprocessing=preprocessing,
        fingerprint=fingerprint_state_dict(state),
        train_args=dict(train_args or {}),
        source=source,
        head=head,
    )
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "meta": meta.to_dict(), "state_dict": state}


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors in float16 (half the file; models load them back into float32)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def half_precision(blob: dict[str, Any]) -> dict[str, Any]:
    """An export dict with float16 weights, its fingerprint recomputed over them."""
    state = half(blob["state_dict"])
    meta = {**blob["meta"], "fingerprint": fingerprint_state_dict(state)}
    return {**blob, "meta": meta, "state_dict": state}


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExportMeta]:
    """Load an export as an eval-mode backbone on `device`, verifying its fingerprint."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ExportError(f"{path}: not a readable export ({exc})") from exc
    return export_model(blob, str(path), device)


def export_model(blob: Any, name: str = "export", device: str | torch.device = "cpu") -> tuple[nn.Module, ExportMeta]:
    """The eval-mode backbone and metadata of an export dict (from a file or from make_export)."""
    if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{name}: not a {EXPORT_FORMAT} file (use `moco-train export` to make one)")
    if blob.get("version") != EXPORT_VERSION:
        raise ExportError(f"{name}: export version {blob.get('version')} is not supported (expected {EXPORT_VERSION})")
    meta = ExportMeta.from_dict(blob["meta"])
    state = blob["state_dict"]
    if fingerprint_state_dict(state) != meta.fingerprint:
        raise ExportError(f"{name}: weights do not match the recorded fingerprint (file corrupted?)")
    model = build_backbone(meta.arch, meta.cifar_stem, meta.head, meta.feature_dim)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


@torch.no_grad()
def pooled(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's float32 output for a preprocessed batch (a backbone's pooled features), computed on
    the model's device: what a linear probe reads."""
    device = next(model.parameters()).device
    return model(images.to(device, non_blocking=True)).float()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 features of a preprocessed batch, computed on the model's device."""
    return nn.functional.normalize(pooled(model, images), dim=1)
