"""Export: a checkpoint's export reproduces its embeddings; official MoCo checkpoints convert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from moco_retrieval.architectures import build_backbone
from moco_retrieval.export import ExportError, embed, export_model, load_export
from moco_retrieval.fileio import atomic_torch_save
from moco_train.builder import build_encoder
from moco_train.checkpoint import CheckpointError, load_file, save_checkpoint, to_export, to_official
from moco_train.config import TrainConfig
from moco_train.trainer import Trainer
from tests.images import noise_images


def backbone_from(state: dict[str, torch.Tensor], prefix: str, arch: str, cifar_stem: bool) -> torch.nn.Module:
    """The reference: a plain backbone loaded by hand with the encoder's non-head weights."""
    model = build_backbone(arch, cifar_stem)
    model.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
    )
    return model.eval()


@pytest.fixture
def checkpoint(tmp_path):
    data = noise_images(tmp_path / "data", 8)
    trainer = Trainer(
        TrainConfig(
            data=str(data), run_dir=str(tmp_path / "run"), batch_size=4, moco_k=8, bn_splits=2, mlp=True, progress=False
        )
    )
    with torch.no_grad():  # make the BN running statistics non-trivial, as after training
        for name, buf in trainer.model.encoder_q.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return save_checkpoint(tmp_path / "run", trainer.state(), keep=1), trainer


def test_export_reproduces_the_checkpoint_embeddings(checkpoint, tmp_path):
    path, trainer = checkpoint
    blob = to_export(load_file(path), str(path))
    atomic_torch_save(blob, tmp_path / "encoder.pt")
    model, meta = load_export(tmp_path / "encoder.pt")
    assert (meta.arch, meta.cifar_stem, meta.feature_dim, meta.preprocessing.input_size) == ("resnet18", True, 512, 16)
    assert meta.train_args["mlp"] is True and not any(k.startswith("fc.") for k in blob["state_dict"])
    images = torch.randn(5, 3, 16, 16)
    reference = backbone_from(trainer.model.state_dict(), "encoder_q.", "resnet18", cifar_stem=True)
    expected = torch.nn.functional.normalize(reference(images), dim=1)
    assert torch.equal(embed(model, images), expected)
    in_memory, _ = export_model(to_export(load_file(path), str(path)))  # what `knn --checkpoint` uses
    assert torch.equal(embed(in_memory, images), expected)


def test_tampered_export_is_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    blob = to_export(load_file(path), str(path))
    blob["state_dict"]["conv1.weight"] = blob["state_dict"]["conv1.weight"] + 1e-3
    atomic_torch_save(blob, tmp_path / "bad.pt")
    with pytest.raises(ExportError, match="fingerprint"):
        load_export(tmp_path / "bad.pt")
    with pytest.raises(ExportError, match="not a readable export"):
        load_export(path.with_name("missing.pt"))


def official_checkpoint(arch: str) -> dict:
    """What facebookresearch/moco's main_moco.py saves for a v2 (MLP) model, weights from a real ResNet."""
    torch.manual_seed(1)
    encoder = build_encoder(arch, 128, mlp=True, cifar_stem=False)
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in encoder.state_dict().items()})
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_official_checkpoint_converts(tmp_path):
    blob = official_checkpoint("resnet18")
    assert {"module.encoder_q.fc.0.weight", "module.encoder_q.fc.2.weight"} <= set(blob["state_dict"])
    torch.save(blob, tmp_path / "moco_v2.pth.tar")
    model, meta = export_model(to_export(load_file(tmp_path / "moco_v2.pth.tar"), "moco_v2.pth.tar"))
    assert (meta.arch, meta.cifar_stem, meta.preprocessing.input_size) == ("resnet18", False, 224)
    images = torch.randn(2, 3, 64, 64)
    reference = backbone_from(blob["state_dict"], "module.encoder_q.", "resnet18", cifar_stem=False)
    assert torch.equal(embed(model, images), torch.nn.functional.normalize(reference(images), dim=1))


def test_official_checkpoint_of_the_wrong_architecture_is_a_clear_error():
    blob = official_checkpoint("resnet18")
    blob["arch"] = "resnet34"
    with pytest.raises(ExportError, match="do not fit resnet34"):
        to_export(blob, "x.pth.tar")
    with pytest.raises(CheckpointError, match="neither"):
        to_export({"state_dict": {"conv1.weight": torch.zeros(1)}}, "y.pt")


def main_lincls_backbone(path, cifar_stem: bool) -> tuple[torch.nn.Module, set[str]]:
    """What facebookresearch/moco's main_lincls.py does with --pretrained (its code, a torchvision
    model; a CIFAR-stem encoder needs the same stem swap on its side): keep module.encoder_q.* but
    the head, load non-strictly, and the only missing keys must be the new classifier's."""
    checkpoint = torch.load(path, map_location="cpu")  # torch's default: weights_only=True
    state_dict = checkpoint["state_dict"]
    for k in list(state_dict.keys()):
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            state_dict[k[len("module.encoder_q.") :]] = state_dict[k]
        del state_dict[k]
    model = torchvision.models.__dict__[checkpoint["arch"]]()
    if cifar_stem:
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    msg = model.load_state_dict(state_dict, strict=False)
    return model.eval(), set(msg.missing_keys)


def detectron2_conversion(path) -> dict[str, np.ndarray]:
    """facebookresearch/moco's detection/convert-pretrain-to-detectron2.py, key for key."""
    obj = torch.load(path, map_location="cpu")["state_dict"]
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q."):
            continue
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        newmodel[k] = v.numpy()
    return newmodel


def test_official_format_loads_in_main_lincls_and_detectron2(checkpoint, tmp_path):
    path, trainer = checkpoint
    out = tmp_path / "official.pth.tar"
    atomic_torch_save(to_official(load_file(path), str(path)), out)
    model, missing = main_lincls_backbone(out, cifar_stem=True)
    assert missing == {"fc.weight", "fc.bias"}
    images = torch.randn(3, 3, 16, 16)
    model.fc = torch.nn.Identity()
    reference = backbone_from(trainer.model.state_dict(), "encoder_q.", "resnet18", cifar_stem=True)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)

    converted = detectron2_conversion(out)
    assert {
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "res2.0.conv1.weight",
        "res2.0.conv1.norm.running_var",
        "res3.0.shortcut.weight",
        "res3.0.shortcut.norm.bias",
        "res5.1.conv2.norm.weight",
    } <= set(converted)
    encoder_q = {k for k in trainer.model.state_dict() if k.startswith("encoder_q.")}
    assert len(converted) == len(encoder_q)  # every f_q tensor, the MLP head included

    # The file converts back to the same export: stem and preprocessing ride along.
    again, original = to_export(load_file(out), str(out)), to_export(load_file(path), str(path))
    assert again["meta"]["fingerprint"] == original["meta"]["fingerprint"]
    assert again["meta"]["preprocessing"] == original["meta"]["preprocessing"]


def test_official_format_of_a_standard_stem_resnet_fits_main_lincls_unchanged(tmp_path):
    blob = official_checkpoint("resnet18")
    export = to_export(blob, "moco_v2.pth.tar", keep_head=True)
    atomic_torch_save(to_official(export, "export"), tmp_path / "official.pth.tar")
    model, missing = main_lincls_backbone(tmp_path / "official.pth.tar", cifar_stem=False)
    assert missing == {"fc.weight", "fc.bias"}
    images = torch.randn(2, 3, 64, 64)
    model.fc = torch.nn.Identity()
    reference = backbone_from(blob["state_dict"], "module.encoder_q.", "resnet18", cifar_stem=False)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
