"""Recipes that fit the run a user asks for: the warm-up capped at a share of the run, BYOL's presets by
schedule length, SwAV's two-crop scale, Barlow Twins' rate for biases and BatchNorm, zero-initialised
residual BNs where the official code has them, and the fp16 guard of a run whose steps keep overflowing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock

from moco_retrieval.devices import cpu_supports_fp16_autocast
from moco_train.config import BYOL_PRESETS, WARMUP_SHARE, TrainConfig, TrainingDiverged, resolve
from moco_train.methods import method_spec
from moco_train.trainer import FP16_MIN_SCALE, Trainer
from tests.images import noise_images

WARMING = {  # what each recipe warms up for, in epochs
    "v3-resnet": ({"moco_v3": True}, 10),
    "v3-vit": ({"moco_v3": True, "arch": "vit_small"}, 40),
    "simclr": ({"method": "simclr"}, 10),
    "byol": ({"method": "byol"}, 10),
    "barlow": ({"method": "barlow"}, 10),
}


def cfg(**kwargs) -> TrainConfig:
    return TrainConfig(data="d", run_dir="r", **kwargs)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 small images: 4 steps of batch 8 per epoch."""
    return noise_images(tmp_path_factory.mktemp("imgs"), 32)


def trainer(images: Path, run_dir: Path, **kwargs) -> Trainer:
    options = dict(
        batch_size=8,
        bn_splits=2,
        crop_size=8,
        moco_k=16,
        moco_dim=16,
        moco_mlp_dim=32,
        workers=0,
        progress=False,
        amp="off",
    )
    return Trainer(TrainConfig(data=str(images), run_dir=str(run_dir), **{**options, **kwargs}))


@pytest.mark.parametrize("name", WARMING)
def test_the_recipes_warm_up_is_capped_at_a_share_of_the_run(name):
    options, recipe_epochs = WARMING[name]
    for epochs in (1, 5, 10, 100, 300, 1000):
        expected = min(recipe_epochs, WARMUP_SHARE * epochs)
        assert resolve(cfg(**options), small=True, epochs=epochs).warmup_epochs == pytest.approx(expected)
    assert resolve(cfg(**options, epochs=300), small=True).warmup_epochs == recipe_epochs  # --epochs by default
    # --warmup-epochs is taken as given, even past the cap, and 0 turns the warm-up off
    assert resolve(cfg(**options, warmup_epochs=3), small=True, epochs=1).warmup_epochs == 3
    assert resolve(cfg(**options, warmup_epochs=0), small=True, epochs=300).warmup_epochs == 0


@pytest.mark.parametrize("options", [{}, {"method": "instdisc"}, {"method": "swav"}])
def test_recipes_without_a_warm_up_keep_none(options):
    assert resolve(cfg(**options), small=True, epochs=1).warmup_epochs == 0


def test_a_short_run_peaks_at_its_rate_and_says_so(images, tmp_path):
    """2 epochs of SimCLR (4 steps each): the warm-up is 15% of the run (1.2 steps), so the rate is at
    the peak's 1/1.2 at step 2, within 4% of it at step 3, and falls on the cosine from there; before,
    it rose over 10 epochs and peaked at a fifth of its target. The start record and the schedule line
    say both."""
    run = trainer(images, tmp_path / "run", method="simclr", epochs=2)
    run.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start, steps = records[0], [r for r in records if r["event"] == "step"]
    peak = run.recipe.lr
    assert start["peak_lr"] == peak == pytest.approx(1.0 * 8 / 256)  # the CIFAR command's base 1.0 x 8/256
    assert start["warmup_epochs"] == pytest.approx(0.3) and start["warmup_steps"] == 2
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(peak / 1.2)
    assert lrs[2] > 0.96 * peak and all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # the cosine after it
    assert run.schedule_line() == (
        f"schedule: lars at a peak lr of {peak:.4g} after a 0.3-epoch warm-up (2 of 8 steps; the recipe's, "
        "at most 15% of the run), then a half-cosine to 0"
    )


def test_an_explicit_warm_up_wins_in_the_run(images, tmp_path):
    run = trainer(images, tmp_path / "run", method="simclr", epochs=2, warmup_epochs=1)
    run.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["event"] == "step"]
    peak = run.recipe.lr
    assert lrs[:5] == pytest.approx([0, peak / 4, peak / 2, 3 * peak / 4, peak])
    assert "warm-up (4 of 8 steps)" in run.schedule_line()


@pytest.mark.parametrize(
    ("epochs", "preset"), [(1, 40), (40, 40), (41, 100), (100, 100), (200, 300), (300, 300), (800, 1000), (2000, 1000)]
)
def test_byol_takes_deepminds_preset_for_the_runs_length(epochs, preset):
    recipe = resolve(cfg(method="byol", batch_size=256), small=True, epochs=epochs)
    assert (recipe.lr, recipe.weight_decay, recipe.moco_m) == BYOL_PRESETS[preset]


def test_byol_flags_win_and_max_steps_sets_the_runs_length(images, tmp_path):
    given = resolve(cfg(method="byol", batch_size=256, lr=0.1, weight_decay=1e-5, moco_m=0.9), small=True, epochs=1)
    assert (given.lr, given.weight_decay, given.moco_m) == (0.1, 1e-5, 0.9)
    # --max-steps 400 of 4 steps an epoch is a 100-epoch run, whatever --epochs says
    run = trainer(images, tmp_path / "run", method="byol", epochs=1000, max_steps=400)
    assert (run.recipe.lr, run.recipe.moco_m) == (pytest.approx(0.45 * 8 / 256), 0.99)


def test_swav_two_crops_start_at_0_08_and_multi_crop_at_0_14():
    two, multi = resolve(cfg(method="swav"), small=False), resolve(cfg(method="swav", multi_crop=6), small=False)
    assert (two.crop_min, multi.crop_min) == (0.08, 0.14)
    assert resolve(cfg(method="swav", crop_min=0.3), small=False).crop_min == 0.3
    from moco_retrieval.preprocessing import Preprocessing

    p = Preprocessing.for_input_size(224)
    views = method_spec(cfg(method="swav")).views(p, cfg(method="swav"), two)
    assert [(v.crop_min, v.crop_max) for v in views] == [(0.08, 1.0)] * 2


def test_barlow_twins_biases_and_batchnorm_get_the_official_rate(images, tmp_path):
    """main.py's LARS: weights at 0.2, biases and BN parameters at 0.0048 (the 1-D tensors), both on
    the schedule; every other method has one group."""
    run = trainer(images, tmp_path / "run", method="barlow", max_steps=3, warmup_epochs=0)
    weights, biases = run.optimizer.param_groups
    assert {p.ndim for p in weights["params"]} == {2, 4} and {p.ndim for p in biases["params"]} == {1}
    trained = {id(p) for p in run.model.parameters() if p.requires_grad}
    assert {id(p) for g in (weights, biases) for p in g["params"]} == trained
    for _ in range(3):
        assert biases["lr"] == pytest.approx(weights["lr"] * 0.0048 / 0.2)
        run.scheduler.step()
    assert len(trainer(images, tmp_path / "swav", method="swav", max_steps=1).optimizer.param_groups) == 1


@pytest.mark.parametrize(
    ("method", "zeroed"), [("simclr", True), ("byol", True), ("barlow", True), ("swav", False), ("instdisc", False)]
)
def test_residual_blocks_start_at_zero_where_the_official_code_does(images, tmp_path, method, zeroed):
    run = trainer(images, tmp_path / "run", method=method, max_steps=1)
    blocks = [m for m in run.model.encoders()[0].modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(bool((b.bn2.weight == 0).all()) == zeroed for b in blocks)
    assert all(bool((b.bn1.weight == 1).all()) for b in blocks)


def test_moco_v2_keeps_torchvisions_initialisation(images, tmp_path):
    run = trainer(images, tmp_path / "run", mlp=True, aug_plus=True, cos=True, max_steps=1)
    blocks = [m for m in run.model.encoder_q.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(bool((b.bn2.weight == 1).all()) for b in blocks)


@pytest.mark.skipif(not cpu_supports_fp16_autocast(), reason="this torch cannot autocast to float16 on the CPU")
def test_fp16_overflowing_gradients_are_skipped_until_the_scale_gives_out(images, tmp_path):
    """Gradients that overflow at every scale (a hook makes one inf) with a finite loss: GradScaler
    skips each step (the weights stay as they were) and halves its scale; once it is below
    FP16_MIN_SCALE the run stops with one line."""
    run = trainer(images, tmp_path / "run", amp="fp16", max_steps=8)
    run.log = type(run.log)(tmp_path / "log.jsonl", enabled=True)
    run.scaler = torch.amp.GradScaler("cpu", init_scale=FP16_MIN_SCALE * 3)
    encoder = run.model.encoder_q
    encoder.fc.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = {k: v.clone() for k, v in encoder.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = iter(run._loader())
    *views, index, _ = next(batches)
    run.train_step(*views, index=index)  # skipped: the scale from 3x to 1.5x the floor
    run.global_step += 1
    assert run.scaler.get_scale() == pytest.approx(FP16_MIN_SCALE * 1.5)
    *views, index, _ = next(batches)
    with pytest.raises(
        TrainingDiverged, match=r"^step 2: GradScaler's scale fell below 0.0001: .*\(moco v1/v2 in fp16\)"
    ):
        run.train_step(*views, index=index)
    after = encoder.state_dict()
    assert all(torch.equal(value, after[name]) for name, value in before.items())  # no step was applied
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [2]
