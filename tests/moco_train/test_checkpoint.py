"""Checkpoints: contents, rotation, truncated files skipped, and exact resume on the CPU."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moco_train.checkpoint import (
    CheckpointError,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from moco_train.config import TrainConfig
from moco_train.trainer import Trainer
from tests.images import noise_images

STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 small images: 4 steps of batch 8 per epoch."""
    return noise_images(tmp_path_factory.mktemp("imgs"), 32)


def config(data: Path, run_dir: Path, epochs: int, workers: int = 0, resume: str | None = None) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        run_dir=str(run_dir),
        epochs=epochs,
        batch_size=8,
        moco_k=32,
        moco_dim=16,
        bn_splits=2,
        schedule=[1],
        lr=0.05,
        mlp=True,
        aug_plus=True,
        workers=workers,
        save_every_steps=3,
        keep=10,
        resume=resume,
        progress=False,
    )


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = dict(trainer.model.state_dict())
    for i, buf in enumerate(trainer.optimizer.state_dict()["state"].values()):
        state[f"optimizer.{i}"] = buf["momentum_buffer"]
    return state


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"


def straight_and_resumed(run: Callable[..., Trainer], tmp_path: Path, checkpoint: str) -> tuple[Trainer, Trainer]:
    """`run` of 8 steps straight through, then again from the straight run's `checkpoint` alone."""
    straight = run(tmp_path / "straight")
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / checkpoint, tmp_path / "resumed")
    resumed = run(tmp_path / "resumed", resume="auto")
    assert resumed.global_step == 8 and "resume" in (tmp_path / "resumed" / "log.jsonl").read_text()
    return straight, resumed


def assert_same_optimizer_state(a: Trainer, b: Trainer) -> None:
    for x, y in zip(a.optimizer.state_dict()["state"].values(), b.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two epochs without interruption (checkpoints at steps 3, 4, 6, 8)."""
    run_dir = tmp_path_factory.mktemp("straight")
    trainer = Trainer(config(images, run_dir, epochs=2))
    trainer.fit()
    return run_dir, final_state(trainer)


def test_checkpoints_hold_the_whole_training_state(straight):
    run_dir, state = straight
    assert [p.name for p in list_checkpoints(run_dir)] == [f"checkpoint_{s:08d}.pt" for s in (3, 4, 6, 8)]
    blob = load_checkpoint(list_checkpoints(run_dir)[-1])
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step_in_epoch", "global_step", "rng", "args"):
        assert key in blob
    assert (blob["epoch"], blob["step_in_epoch"], blob["global_step"]) == (2, 0, 8)
    assert torch.equal(blob["model"]["queue"], state["queue"]) and int(blob["model"]["queue_ptr"]) == (8 * 8) % 32
    assert "encoder_k.fc.0.weight" in blob["model"]
    assert blob["args"]["moco_k"] == 32
    assert (Path(run_dir) / "log.jsonl").read_text().count('"event": "step"') == 8


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_then_resume_equals_two_epochs_straight(images, tmp_path, straight, workers):
    Trainer(config(images, tmp_path, epochs=1, workers=workers)).fit()
    resumed = Trainer(config(images, tmp_path, epochs=2, workers=workers, resume="auto"))
    resumed.fit()
    assert resumed.global_step == 2 * STEPS_PER_EPOCH
    assert_identical(final_state(resumed), straight[1])


def test_mid_epoch_resume_from_the_newest_valid_checkpoint(images, tmp_path, straight):
    run_dir = straight[0]
    shutil.copy(run_dir / "checkpoint_00000006.pt", tmp_path)  # "crashed" in the middle of epoch 1
    good = (run_dir / "checkpoint_00000008.pt").read_bytes()
    (tmp_path / "checkpoint_00000007.pt").write_bytes(good[: len(good) // 2])  # truncated: ignored
    with pytest.warns(UserWarning, match="checkpoint_00000007.pt"):
        resumed = Trainer(config(images, tmp_path, epochs=2, resume="auto"))
        resumed.fit()
    assert_identical(final_state(resumed), straight[1])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labelled folder for the kNN monitor: two classes of 8 small images."""
    root = tmp_path_factory.mktemp("labelled")
    for seed, c in enumerate(("a", "b"), start=1):
        noise_images(root / c, 8, seed=seed)
    return root


def test_resume_is_exact_with_the_knn_monitor_on(images, labelled, tmp_path):
    """The monitor runs after each epoch's checkpoint and draws random numbers (it builds a model);
    a run resumed from that checkpoint must still match the uninterrupted one to the bit."""

    def monitored(run_dir: Path, epochs: int, resume: str | None = None) -> Trainer:
        cfg = config(images, run_dir, epochs=epochs, resume=resume)
        cfg.knn_bank = cfg.knn_queries = str(labelled)
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    straight = monitored(tmp_path / "straight", epochs=2)
    monitored(tmp_path / "resumed", epochs=1)
    resumed = monitored(tmp_path / "resumed", epochs=2, resume="auto")
    assert_identical(final_state(resumed), final_state(straight))
    epochs = [
        r
        for r in map(json.loads, (tmp_path / "straight" / "log.jsonl").read_text().splitlines())
        if r["event"] == "epoch"
    ]
    assert len(epochs) == 2 and all("knn_top1" in r for r in epochs)


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_32"])
def test_moco_v3_resumes_exactly(images, tmp_path, arch):
    """v3: LARS (ResNet) or AdamW (ViT) state, the warm-up/cosine lr and the momentum schedule, which
    is a function of the step count, all continue exactly from a mid-run checkpoint (both schedules
    span the whole run, so the interrupted run is the same 2-epoch run stopped after its first epoch)."""

    def v3(run_dir: Path, resume: str | None = None) -> Trainer:
        cfg = TrainConfig(
            data=str(images),
            run_dir=str(run_dir),
            epochs=2,
            batch_size=8,
            moco_v3=True,
            arch=arch,
            moco_mlp_dim=32,
            moco_dim=16,
            warmup_epochs=1,
            crop_size=16 if arch == "resnet18" else None,
            workers=0,
            keep=10,
            resume=resume,
            progress=False,
        )
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    straight, resumed = straight_and_resumed(v3, tmp_path, "checkpoint_00000004.pt")  # after epoch 1 of 2
    assert resumed.recipe.optimizer == ("lars" if arch == "resnet18" else "adamw")
    assert_identical(dict(resumed.model.state_dict()), dict(straight.model.state_dict()))
    assert_same_optimizer_state(resumed, straight)


OTHER_METHODS = {
    # The bank (and Z); the queue (started at step 2, full and used from step 4: it spans the resume
    # at step 3), frozen prototypes and two small crops; the target network and its momentum schedule.
    "instdisc": {"nce_k": 64},
    "swav": {
        "swav_prototypes": 16,
        "swav_queue": 16,
        "swav_queue_start": 0.5,
        "swav_freeze_prototypes": 0.25,
        "multi_crop": 2,
    },
    "byol": {"moco_mlp_dim": 32, "warmup_epochs": 1},
}


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_resume_exactly_mid_epoch(images, tmp_path, method):
    """A run resumed from its step-3 checkpoint (mid-epoch 0 of 2) ends bit-identical to the run that
    was not interrupted: weights, the method's state (InstDisc's memory bank and Z, SwAV's queue,
    BYOL's target network, whose momentum follows the step count) and the optimizer's."""

    def run(run_dir: Path, resume: str | None = None) -> Trainer:
        cfg = TrainConfig(
            data=str(images),
            run_dir=str(run_dir),
            method=method,
            epochs=2,
            batch_size=8,
            moco_dim=16,
            crop_size=16,
            workers=0,
            save_every_steps=3,
            keep=10,
            resume=resume,
            progress=False,
            **OTHER_METHODS[method],
        )
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    straight, resumed = straight_and_resumed(run, tmp_path, "checkpoint_00000003.pt")
    state = dict(straight.model.state_dict())
    assert {"instdisc": "memory", "swav": "queue", "byol": "target_encoder.fc.3.weight"}[method] in state
    assert_identical(dict(resumed.model.state_dict()), state)
    assert_same_optimizer_state(resumed, straight)
    if method == "swav":
        assert straight.model.queue.abs().sum(dim=2).gt(0).all()  # full, so the resumed run used it too


def test_rotation_keeps_the_newest(images, tmp_path):
    cfg = config(images, tmp_path, epochs=1)
    cfg.save_every_steps, cfg.keep = 1, 2
    Trainer(cfg).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_00000003.pt", "checkpoint_00000004.pt"]


def test_truncated_and_foreign_files_are_not_checkpoints(straight, tmp_path):
    data = (straight[0] / "checkpoint_00000004.pt").read_bytes()
    (tmp_path / "checkpoint_00000009.pt").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "checkpoint_00000009.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_resume(tmp_path) is None
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a moco-train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
