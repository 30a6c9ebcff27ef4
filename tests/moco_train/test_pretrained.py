"""Continued pretraining (`--init`): both encoders start from an export, a checkpoint, an official
MoCo checkpoint or a torchvision state dict; a wrong architecture or stem is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from moco_retrieval.fileio import atomic_torch_save
from moco_train.checkpoint import CheckpointError, load_file, save_checkpoint, to_export
from moco_train.config import TrainConfig
from moco_train.trainer import Trainer
from tests import REPO
from tests.images import noise_images

TINY = ["-b", 4, "--moco-k", 8, "--max-steps", 1, "--bn-splits", 2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return noise_images(tmp_path_factory.mktemp("imgs"), 8)


def trainer(images: Path, run_dir: Path, **kwargs) -> Trainer:
    return Trainer(
        TrainConfig(
            data=str(images),
            run_dir=str(run_dir),
            batch_size=4,
            moco_k=8,
            bn_splits=2,
            workers=0,
            progress=False,
            **kwargs,
        )
    )


@pytest.fixture(scope="module")
def source(images, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint of a v2 model with seed 7 (weights unlike any other seed's) and its f_q state."""
    tmp = tmp_path_factory.mktemp("source")
    t = trainer(images, tmp / "run", mlp=True, seed=7)
    path = save_checkpoint(tmp / "run", t.state(), keep=1)
    return path, {k[len("encoder_q.") :]: v for k, v in t.model.state_dict().items() if k.startswith("encoder_q.")}


def assert_starts_from(t: Trainer, expected: dict[str, torch.Tensor], with_head: bool) -> None:
    q, k = t.model.encoder_q.state_dict(), t.model.encoder_k.state_dict()
    for name, value in expected.items():
        if with_head or not name.startswith("fc."):
            assert torch.equal(q[name], value), name
    for name in q:
        assert torch.equal(q[name], k[name]), name  # f_k starts as a copy of f_q
    head_equal = all(torch.equal(q[n], expected[n]) for n in q if n.startswith("fc.") and n in expected)
    assert head_equal == with_head


def test_init_from_a_checkpoint_takes_backbone_and_head(images, source, tmp_path):
    path, expected = source
    t = trainer(images, tmp_path / "run", mlp=True, init=str(path))
    assert_starts_from(t, expected, with_head=True)
    assert t.init_source.endswith("backbone and projection head")


def test_init_from_an_export_reinitialises_the_head(images, source, tmp_path):
    path, expected = source
    atomic_torch_save(to_export(load_file(path), str(path)), tmp_path / "encoder.pt")  # backbone only
    t = trainer(images, tmp_path / "run", mlp=True, max_steps=2, init=str(tmp_path / "encoder.pt"))
    assert_starts_from(t, expected, with_head=False)
    assert "re-initialised" in t.init_source
    t.fit()  # and it trains
    assert t.global_step == 2


def test_init_from_an_official_moco_checkpoint_and_a_torchvision_state_dict(images, source, tmp_path):
    _, expected = source
    official = {
        "arch": "resnet18",
        "epoch": 200,
        "state_dict": {f"module.encoder_q.{k}": v for k, v in expected.items()},
    }
    torch.save(official, tmp_path / "moco.pth.tar")
    t = trainer(images, tmp_path / "a", mlp=True, init=str(tmp_path / "moco.pth.tar"))
    assert_starts_from(t, expected, with_head=True)

    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18().state_dict()  # 1000-class classifier as fc
    torch.save(imagenet, tmp_path / "resnet18.pth")
    t = trainer(images, tmp_path / "b", cifar_stem="off", init=str(tmp_path / "resnet18.pth"))
    assert_starts_from(t, imagenet, with_head=False)


def moco_train(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moco_train", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-a", "resnet34"], "holds a resnet18, but this run trains a resnet34 (use -a resnet18)"),
        (
            ["--cifar-stem", "off"],
            "was trained with the CIFAR stem (3x3 conv, no max-pool), but this run uses the standard",
        ),
    ],
)
def test_a_wrong_architecture_or_stem_is_a_one_line_error(images, source, tmp_path, extra, message):
    path, _ = source
    proc = moco_train("train", images, "--run-dir", tmp_path / "run", *TINY, "--init", path, *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr


def test_a_state_dict_of_another_resnet_does_not_fit(images, tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(CheckpointError, match="weights do not fit resnet18"):
        trainer(images, tmp_path / "run", cifar_stem="off", init=str(tmp_path / "resnet34.pth"))


def test_the_start_record_names_the_init(images, source, tmp_path):
    path, _ = source
    proc = moco_train(
        "train", images, "--run-dir", tmp_path / "run", *TINY, "-j", 0, "--mlp", "--init", path, "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["init"].endswith("backbone and projection head")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """8 photo-sized images (160 x 120): auto would train them at 224 px with the standard stem."""
    return noise_images(tmp_path_factory.mktemp("photos"), 8, size=(160, 120))


def test_a_cifar_stem_init_on_photos_trains_at_its_own_size(photos, source, tmp_path):
    path, expected = source  # a CIFAR-stem encoder trained at 16 px
    with pytest.warns(UserWarning) as record:
        t = trainer(photos, tmp_path / "run", mlp=True, init=str(path))
    assert [str(w.message) for w in record if "--init" in str(w.message)] == [
        f"--init {path} has the CIFAR stem (3x3 conv, no max-pool) and was trained at 16 px: training at "
        "--crop-size 16 (--crop-size and --cifar-stem choose otherwise)"
    ]
    assert t.cifar_stem and t.preprocessing.input_size == 16
    assert_starts_from(t, expected, with_head=True)


def test_with_a_crop_size_given_the_stem_follows_the_init(photos, source, tmp_path):
    path, _ = source
    with pytest.warns(UserWarning, match="has the CIFAR stem .*: training with --cifar-stem on$"):
        t = trainer(photos, tmp_path / "run", mlp=True, init=str(path), crop_size=96)
    assert t.cifar_stem and t.preprocessing.input_size == 96


def test_a_standard_stem_init_on_small_images_trains_without_the_cifar_stem(images, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.warns(UserWarning, match="has the standard stem .*: training with --cifar-stem off$"):
        t = trainer(images, tmp_path / "run", init=str(tmp_path / "resnet18.pth"))
    assert not t.cifar_stem and t.preprocessing.input_size == 16


def test_explicit_flags_that_match_need_no_notice(photos, source, tmp_path, recwarn):
    path, _ = source
    t = trainer(photos, tmp_path / "run", mlp=True, init=str(path), crop_size=32, cifar_stem="on")
    assert t.cifar_stem and not [w for w in recwarn if "--init" in str(w.message)]
