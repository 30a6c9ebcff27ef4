"""The served encoder: an export loaded with the shared loader, the shared eval preprocessing and the
shared decoder, so a served embedding equals `moco-train knn`'s for the same image bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moco_retrieval.devices import resolve_device
from moco_retrieval.export import embed, load_export
from moco_retrieval.images import decode_image
from moco_retrieval.preprocessing import eval_transform


class Encoder:
    """Decodes + preprocesses images (thread-safe, CPU) and embeds preprocessed batches (one caller)."""

    def __init__(self, model_path: str | Path, device: str = "auto", max_pixels: int | None = None) -> None:
        self.device = str(resolve_device(device))
        self.model, self.meta = load_export(model_path, self.device)
        self.transform = eval_transform(self.meta.preprocessing)
        self.max_pixels = max_pixels

    @property
    def dim(self) -> int:
        return self.meta.feature_dim

    def preprocess(self, image_bytes: bytes) -> torch.Tensor:
        """Image bytes -> (3, S, S) float tensor; raises ImageDecodeError / ImageTooLargeError."""
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        return self.transform(decode_image(image_bytes, **kwargs))

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) -> (B, D) L2-normalised float32, C-contiguous, on the CPU."""
        with torch.inference_mode():
            out = embed(self.model, batch)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
