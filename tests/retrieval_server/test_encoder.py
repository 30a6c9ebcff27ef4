"""The server's encoder runtimes: ONNX Runtime (the CPU default) and PyTorch embed alike."""

from __future__ import annotations

import numpy as np
import pytest

from moco_retrieval.devices import DeviceError
from retrieval_server.encoder import Encoder
from tests.server_harness import make_export, png_bytes


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_32"])
def test_onnx_and_torch_runtimes_agree(tmp_path, arch):
    model = make_export(tmp_path, seed=2, arch=arch)
    torch_encoder = Encoder(model, device="cpu", runtime="torch")
    onnx_encoder = Encoder(model, device="cpu")  # auto: ONNX Runtime on the CPU
    assert (torch_encoder.runtime, onnx_encoder.runtime) == ("torch", "onnx")
    batch = torch_encoder.preprocess(png_bytes(1))[None].repeat(4, 1, 1, 1)
    batch[1:] = torch_encoder.preprocess(png_bytes(2))
    a, b = torch_encoder.forward(batch), onnx_encoder.forward(batch)
    assert a.dtype == b.dtype == np.float32 and a.flags.c_contiguous and b.flags.c_contiguous
    assert np.abs(a - b).max() < 1e-5


def test_onnx_runtime_is_for_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr("retrieval_server.encoder.resolve_device", lambda device: "cuda:0")
    with pytest.raises(DeviceError, match="runs on the CPU"):
        Encoder(make_export(tmp_path), device="cuda", runtime="onnx")
