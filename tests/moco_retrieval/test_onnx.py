"""ONNX exports: the served embedding (encoder + L2 normalisation) from ONNX Runtime equals PyTorch's,
for ResNets and ViTs, at any batch size; the export's metadata rides along; `--fp16` exports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from moco_retrieval.architectures import build_backbone
from moco_retrieval.export import embed, export_model, load_export, make_export
from moco_retrieval.fileio import atomic_torch_save
from moco_retrieval.onnx import META_KEY, OnnxEncoder, to_onnx
from moco_retrieval.preprocessing import Preprocessing
from tests import REPO


def random_export(arch: str) -> dict:
    torch.manual_seed(4)
    cifar_stem = arch.startswith("resnet")
    model = build_backbone(arch, cifar_stem=cifar_stem)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return make_export(
        model.state_dict(), arch=arch, cifar_stem=cifar_stem, preprocessing=Preprocessing.for_input_size(32)
    )


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_32"])
def test_onnx_runtime_reproduces_the_pytorch_embeddings(arch):
    model, meta = export_model(random_export(arch))
    onnx_model = to_onnx(model, meta)
    encoder = OnnxEncoder(onnx_model)
    for batch in (1, 5):  # the batch dimension is dynamic
        images = torch.randn(batch, 3, 32, 32)
        expected = embed(model, images).numpy()
        got = encoder(images.numpy())
        assert got.shape == (batch, meta.feature_dim)
        assert np.abs(got - expected).max() < 1e-5, np.abs(got - expected).max()
    props = {p.key: p.value for p in onnx.load_from_string(onnx_model).metadata_props}
    assert json.loads(props[META_KEY]) == meta.to_dict()


def moco_train(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "moco_train", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_export_cli_writes_onnx_and_half_precision_files(tmp_path):
    atomic_torch_save(random_export("resnet18"), tmp_path / "encoder.pt")
    moco_train("export", tmp_path / "encoder.pt", tmp_path / "encoder.onnx", "--format", "onnx")
    model, _ = load_export(tmp_path / "encoder.pt")
    images = torch.randn(3, 3, 32, 32)
    onnx_out = OnnxEncoder((tmp_path / "encoder.onnx").read_bytes())(images.numpy())
    assert np.abs(onnx_out - embed(model, images).numpy()).max() < 1e-5

    moco_train("export", tmp_path / "encoder.pt", tmp_path / "half.pt", "--fp16")
    half, meta = load_export(tmp_path / "half.pt")  # the fingerprint covers the float16 weights
    assert (tmp_path / "half.pt").stat().st_size < 0.55 * (tmp_path / "encoder.pt").stat().st_size
    assert np.abs(embed(half, images).numpy() - embed(model, images).numpy()).max() < 1e-2
