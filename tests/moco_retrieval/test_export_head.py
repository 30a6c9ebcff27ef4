"""Exports that keep the MoCo projection head serve its (e.g. 128-d) output exactly."""

from __future__ import annotations

import pytest
import torch

from moco_retrieval.export import ExportError, ExportMeta, embed, export_model, load_export, make_export
from moco_retrieval.fileio import atomic_torch_save
from moco_retrieval.preprocessing import Preprocessing
from moco_train.builder import build_encoder
from moco_train.checkpoint import to_export


@pytest.mark.parametrize("mlp", [False, True])
def test_keep_head_reproduces_encoder_output(tmp_path, mlp):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", dim=128, mlp=mlp, cifar_stem=True).eval()
    path = tmp_path / "head.pt"
    blob = make_export(
        encoder.state_dict(),
        arch="resnet18",
        cifar_stem=True,
        preprocessing=Preprocessing.for_input_size(32),
        keep_head=True,
    )
    atomic_torch_save(blob, path)
    meta = ExportMeta.from_dict(blob["meta"])
    assert (meta.head, meta.feature_dim) == ("mlp" if mlp else "linear", 128)
    model, loaded = load_export(path)
    assert loaded == meta
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(encoder(x), dim=1)
    assert torch.equal(embed(model, x), expected)


def test_default_export_drops_head(tmp_path):
    encoder = build_encoder("resnet18", dim=128, mlp=True, cifar_stem=True)
    blob = make_export(
        encoder.state_dict(), arch="resnet18", cifar_stem=True, preprocessing=Preprocessing.for_input_size(32)
    )
    meta = ExportMeta.from_dict(blob["meta"])
    assert (meta.head, meta.feature_dim) == ("none", 512)


def test_official_checkpoint_keep_head():
    encoder = build_encoder("resnet18", dim=128, mlp=True, cifar_stem=False)
    blob = {"arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}}
    model, meta = export_model(to_export(blob, "official.pth.tar", keep_head=True))
    assert (meta.head, meta.feature_dim) == ("mlp", 128)
    assert embed(model, torch.randn(2, 3, 64, 64)).shape == (2, 128)


def test_keep_head_without_head_is_an_error():
    encoder = build_encoder("resnet18", dim=128, mlp=False, cifar_stem=True)
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(ExportError, match="no projection head"):
        make_export(
            state, arch="resnet18", cifar_stem=True, preprocessing=Preprocessing.for_input_size(32), keep_head=True
        )
