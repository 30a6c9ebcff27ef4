"""An export as an ONNX graph: the encoder and its L2 normalisation, so ONNX Runtime returns the
served embedding itself. `moco-train export --format onnx` writes it (for other runtimes), and the
server's CPU encoder runs it (`--encoder onnx`), built from the same export at start.

The export's metadata (preprocessing, fingerprint, ...) rides along as the model's metadata property
`moco_retrieval.meta` (JSON), so a consumer preprocesses images exactly as the server does.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
import torch.nn as nn

from .export import ExportMeta

META_KEY = "moco_retrieval.meta"
INPUT, OUTPUT = "images", "embeddings"


class _Normalised(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.encoder(images), dim=1)


def to_onnx(model: nn.Module, meta: ExportMeta) -> bytes:
    """The ONNX model (bytes) of an eval-mode export model: float32 (N, 3, S, S) images in,
    L2-normalised float32 (N, D) embeddings out, any N."""
    import onnx  # only needed to attach the metadata

    size = meta.preprocessing.input_size
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its successor
        torch.onnx.export(
            _Normalised(model.cpu()).eval(),
            (torch.zeros(1, 3, size, size),),
            buf,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            dynamo=False,
        )
    graph = onnx.load_from_string(buf.getvalue())
    entry = graph.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta.to_dict())
    return graph.SerializeToString()


class OnnxEncoder:
    """Runs an ONNX export with ONNX Runtime on the CPU: (B, 3, S, S) -> (B, D) float32."""

    def __init__(self, onnx_model: bytes, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (the physical cores)
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.float32)})[0]
