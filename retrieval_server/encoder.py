"""The served encoder: an export loaded with the shared loader, the shared eval preprocessing and the
shared decoder, so a served embedding equals `moco-train knn`'s for the same image bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moco_retrieval.devices import DeviceError, resolve_device
from moco_retrieval.export import embed, load_export
from moco_retrieval.images import decode_image
from moco_retrieval.onnx import OnnxEncoder, to_onnx
from moco_retrieval.preprocessing import eval_transform


class Encoder:
    """Decodes + preprocesses images (thread-safe, CPU) and embeds preprocessed batches (one caller).

    runtime: "torch" runs the export with PyTorch; "onnx" runs the same export converted to ONNX
    (moco_retrieval.onnx) with ONNX Runtime, CPU only; "auto" is ONNX Runtime on the CPU, faster
    than PyTorch's float32 there in the server benchmark, and PyTorch on a GPU."""

    def __init__(
        self, model_path: str | Path, device: str = "auto", max_pixels: int | None = None, runtime: str = "auto"
    ) -> None:
        self.device = str(resolve_device(device))
        if runtime == "auto":
            runtime = "onnx" if self.device == "cpu" else "torch"
        if runtime == "onnx" and self.device != "cpu":
            raise DeviceError("--encoder onnx runs on the CPU: use --device cpu, or --encoder torch on a GPU")
        self.runtime = runtime
        self.model, self.meta = load_export(model_path, self.device)
        self.transform = eval_transform(self.meta.preprocessing)
        self.max_pixels = max_pixels
        self._onnx = OnnxEncoder(to_onnx(self.model, self.meta)) if runtime == "onnx" else None

    @property
    def dim(self) -> int:
        return self.meta.feature_dim

    def preprocess(self, image_bytes: bytes) -> torch.Tensor:
        """Image bytes -> (3, S, S) float tensor; raises ImageDecodeError / ImageTooLargeError."""
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        return self.transform(decode_image(image_bytes, **kwargs))

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) -> (B, D) L2-normalised float32, C-contiguous, on the CPU."""
        if self._onnx is not None:
            return np.ascontiguousarray(self._onnx(batch.numpy()), dtype=np.float32)
        if self.device != "cpu":
            batch = batch.pin_memory()  # page-locked: embed's non-blocking copy overlaps the transfer
        with torch.inference_mode():
            out = embed(self.model, batch)
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
