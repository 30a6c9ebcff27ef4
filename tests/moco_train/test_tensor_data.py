"""The tensor data path: its parameters follow torchvision's distributions, its outputs match the PIL
path's statistics, its stream is exact per (seed, epoch, index), and a Trainer runs and resumes on it."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from moco_retrieval.images import decode_image
from moco_retrieval.preprocessing import Preprocessing
from moco_train.config import TrainConfig
from moco_train.data import EpochSampler, ImageGeometry, sample_seed, with_seed
from moco_train.tensor_aug import DRAWS, ViewParams, color_jitter, draw, resized_crop
from moco_train.tensor_data import TensorBatches, TensorImages, resolve_pipeline, store_side
from moco_train.trainer import Trainer
from moco_train.transforms import PilView, train_augmentation, v1_v2_view, v3_augmentations, v3_views
from tests.images import noise_images

CPU = torch.device("cpu")
SMALL, LARGE = Preprocessing.for_input_size(32), Preprocessing.for_input_size(72)
N = 4000  # parameter draws per check: a rate's standard error is at most 0.008


def uniforms(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, DRAWS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sizes(width: int, height: int, n: int = N) -> torch.Tensor:
    return torch.tensor([[width, height]], dtype=torch.float64).expand(n, 2)


def torchvision_boxes(width: int, height: int, crop_min: float, n: int = N) -> torch.Tensor:
    """(n, 4) top, left, height, width from torchvision's own RandomResizedCrop.get_params."""
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    return torch.tensor(
        [T.RandomResizedCrop.get_params(image, (crop_min, 1.0), (3 / 4, 4 / 3)) for _ in range(n)], dtype=torch.float64
    )


@pytest.mark.parametrize(("width", "height", "crop_min"), [(32, 32, 0.08), (40, 24, 0.2), (24, 40, 0.08)])
def test_crops_follow_torchvision_get_params(width, height, crop_min):
    ours = draw(uniforms(N), sizes(width, height), v1_v2_view(SMALL, True, crop_min)).box
    theirs = torchvision_boxes(width, height, crop_min)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        assert (h * w / (width * height) >= crop_min * 0.8).all()  # the bound, less rounding to whole pixels
    for stat in (
        lambda b: b[:, 2] * b[:, 3] / (width * height),  # area share: uniform in (crop_min, 1) before clipping
        lambda b: torch.log(b[:, 3] / b[:, 2]),  # log aspect ratio: uniform in log(3/4, 4/3)
        lambda b: b[:, 0] / (height - b[:, 2]).clamp(min=1),  # position: uniform
        lambda b: b[:, 1] / (width - b[:, 3]).clamp(min=1),
    ):
        a, b = stat(ours), stat(theirs)
        se = math.sqrt(a.var() / N + b.var() / N)
        assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 0.1 * b.std()


def test_crops_that_never_fit_fall_back_to_the_central_crop_like_torchvision():
    """Scale (1, 1) of a 40 x 24 image fits no allowed ratio: the whole height, 4/3 of it wide, centred."""
    ours = draw(uniforms(50), sizes(40, 24, 50), v1_v2_view(SMALL, True, crop_min=1.0)).box
    assert (ours == torch.tensor([0.0, 4.0, 24.0, 32.0], dtype=torch.float64)).all()
    assert (torchvision_boxes(40, 24, 1.0, 50) == ours).all()


@pytest.mark.parametrize("name", ["v1", "v2-small", "v2-large", "v3-first", "v3-second"])
def test_flip_jitter_grayscale_blur_and_solarize_rates_and_ranges(name):
    recipe = {
        "v1": v1_v2_view(SMALL, False),
        "v2-small": v1_v2_view(SMALL, True),
        "v2-large": v1_v2_view(LARGE, True),
        "v3-first": v3_views(LARGE)[0],
        "v3-second": v3_views(LARGE)[1],
    }[name]
    params = draw(uniforms(N, seed=1), sizes(32, 32), recipe)
    tol = 4 * 0.5 / math.sqrt(N)  # 4 standard errors of a rate

    def rate(mask: torch.Tensor, expected: float) -> None:
        assert abs(mask.double().mean().item() - expected) < tol

    rate(params.flip, 0.5)
    rate(params.gray, recipe.grayscale_p)
    rate(params.sigma > 0, recipe.blur_p)
    rate(params.solarize, recipe.solarize_p)
    assert ((params.sigma == 0) | ((params.sigma >= 0.1) & (params.sigma <= 2.0))).all()
    on = (params.factors != torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)).any(dim=1)
    rate(on, recipe.jitter_p)
    b, c, s, h = recipe.jitter
    lo = torch.tensor([1 - b, 1 - c, 1 - s, -h], dtype=torch.float64)
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h], dtype=torch.float64)
    applied = params.factors[on]
    assert ((applied >= lo) & (applied <= hi)).all()
    assert (applied.mean(0) - (lo + hi) / 2).abs().max() < 4 * (hi - lo).max() / math.sqrt(12 * len(applied))
    assert (params.order.sort(dim=1).values == torch.arange(4)).all()  # a permutation of the four ops...
    for op in range(4):
        rate(params.order[:, 0] == op, 0.25)  # ...each first a quarter of the time


def test_crop_min_reaches_both_pipelines():
    assert train_augmentation(SMALL, aug_plus=False, crop_min=0.3).recipe.crop_min == 0.3
    first, second = v3_augmentations(LARGE, crop_min=0.2)
    assert first.transforms[0].scale == second.transforms[0].scale == (0.2, 1.0)
    assert train_augmentation(SMALL, aug_plus=True).transforms[0].scale == (0.08, 1.0)  # defaults unchanged
    assert train_augmentation(LARGE, aug_plus=True).transforms[0].scale == (0.2, 1.0)
    boxes = draw(uniforms(N), sizes(32, 32), v3_views(SMALL, crop_min=0.5)[0]).box
    assert (boxes[:, 2] * boxes[:, 3] >= 0.5 * 0.8 * 32 * 32).all()


def test_the_ops_are_torchvisions(tmp_path):
    """Jitter in each sample's own order equals torchvision's tensor ops applied in that order; a
    crop (flipped or not) equals torchvision's PIL resized_crop up to its uint8 rounding and the
    pixels just outside the box that bilinear interpolation reads at its edges."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    x = TF.to_tensor(Image.fromarray(pixels)).unsqueeze(0).expand(3, -1, -1, -1)  # (3, 3, 40, 40)
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.8, 1.1, 0.6, -0.1], [1.0, 1.4, 1.0, 0.0]], dtype=torch.float64)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = color_jitter(x, factors, orders)
    for b in range(3):
        expected = x[b]
        for op in orders[b].tolist():
            expected = ops[op](expected, factors[b, op].item())
        assert torch.allclose(out[b], expected, atol=1e-5)
    box = torch.tensor([[5.0, 7.0, 20.0, 24.0]] * 2, dtype=torch.float64)
    params = ViewParams(box, torch.tensor([False, True]), *[None] * 5)
    crops = resized_crop(x[:2], params, sizes(40, 40, 2), 32)
    expected = TF.to_tensor(TF.resized_crop(Image.fromarray(pixels), 5, 7, 20, 24, [32, 32]))
    for crop, target in zip(crops, (expected, TF.hflip(expected))):
        assert (crop - target).abs().mean() < 0.01 and (crop - target)[:, 1:-1, 1:-1].abs().max() < 0.05


@pytest.fixture(scope="module")
def demo_images(demo_data) -> list[Path]:
    return sorted((demo_data / "train" / "cat").iterdir())[:24]


def test_each_sample_is_augmented_independently_of_its_batch_and_rank(demo_images):
    """A sample's views depend on (seed, epoch, index) only: alone, in any batch, or in a rank's slice."""
    dataset = TensorImages(demo_images, v3_views(SMALL), SMALL, 32, seed=5, device=CPU)
    q, k = dataset.augment(2, [3, 7, 11, 7])
    assert torch.equal(q[1], q[3]) and not torch.equal(q[0], q[1]) and not torch.equal(q[1], k[1])
    alone = dataset.augment(2, [11])
    assert torch.allclose(alone[0][0], q[2], atol=1e-6) and torch.allclose(alone[1][0], k[2], atol=1e-6)

    def stream(rank: int, world: int) -> list[torch.Tensor]:
        sampler = EpochSampler(len(dataset), 8, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(1)
        return [q for q, _, _, _ in TensorBatches(dataset, sampler, 8 // world)]

    one, halves = stream(0, 1), list(zip(stream(0, 2), stream(1, 2)))
    assert len(one) == len(halves) == 3
    for whole, (a, b) in zip(one, halves):
        assert torch.allclose(whole, torch.cat([a, b]), atol=1e-6)
    rows = dataset.uniforms(0, range(N))
    assert abs(np.corrcoef(rows[:-1, 22], rows[1:, 22])[0, 1]) < 0.1  # neighbours' flips are uncorrelated


def test_the_stream_is_a_function_of_seed_epoch_and_index(demo_images):
    views = (v1_v2_view(SMALL, True),) * 2
    a = TensorImages(demo_images, views, SMALL, 32, seed=3, device=CPU)
    b = TensorImages(demo_images, views, SMALL, 32, seed=3, device=CPU)
    state = torch.get_rng_state()
    first = a.augment(1, [0, 5, 9])
    torch.manual_seed(123)  # the global RNG does not matter and is left alone
    again = b.augment(1, [0, 5, 9])
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], a.augment(2, [0, 5, 9])[0])
    assert not torch.equal(first[0], TensorImages(demo_images, views, SMALL, 32, seed=4, device=CPU).augment(1, [0])[0])
    torch.set_rng_state(state)
    b.augment(0, [1])
    assert torch.equal(state, torch.get_rng_state())


def pil_and_tensor(path: Path, p: Preprocessing, views, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n augmentations of one image by each view, through PIL and through tensors, in [0, 1] pixels."""
    img = decode_image(path)
    dataset = TensorImages([path] * n, views, p, img.size[0], seed=0, device=CPU)
    tensor = dataset.augment(0, list(range(n)))
    mean, std = torch.tensor(p.mean).view(1, 3, 1, 1), torch.tensor(p.std).view(1, 3, 1, 1)
    out = []
    for k, view in enumerate(views):
        pil = torch.stack([with_seed(sample_seed(1, k, i), PilView(p, view), img) for i in range(n)])
        out.append((pil * std + mean, tensor[k] * std + mean))
    return out


def assert_same_distribution(pil: torch.Tensor, tensor: torch.Tensor, shift: float, rel: float) -> None:
    """Per statistic (columns): means within 4 standard errors + `shift`, spreads within `rel`."""
    se = (pil.var(0) / len(pil) + tensor.var(0) / len(tensor)).sqrt()
    assert ((pil.mean(0) - tensor.mean(0)).abs() < 4 * se + shift).all(), (pil.mean(0), tensor.mean(0))
    assert ((pil.std(0) - tensor.std(0)).abs() < rel * pil.std(0)).all(), (pil.std(0), tensor.std(0))


@pytest.mark.parametrize("recipe", ["v1", "v2", "v3"])
def test_a_constant_colour_comes_out_as_through_pil(tmp_path, recipe):
    """Only the colour ops act on a flat colour: each channel's mean over 400 augmentations matches
    PIL's within 4 standard errors + 0.03, its spread within 15%. The 0.03 (8/255) is PIL's 8-bit
    rounding: its HSV round trip alone turns this green of 80 into 78, and a hue shift of 0.05
    into 123 where the float one (torchvision's tensor adjust_hue) gives 128."""
    Image.new("RGB", (32, 32), (200, 80, 40)).save(tmp_path / "flat.png")
    views = {"v1": (v1_v2_view(SMALL, False),) * 2, "v2": (v1_v2_view(SMALL, True),) * 2, "v3": v3_views(SMALL)}
    for pil, tensor in pil_and_tensor(tmp_path / "flat.png", SMALL, views[recipe], 400):
        assert_same_distribution(pil.mean((2, 3)), tensor.mean((2, 3)), shift=0.03, rel=0.15)


def test_a_large_image_is_cropped_blurred_and_solarized_as_through_pil(tmp_path):
    """v3 at 72 px (blur on both views, solarize on the second) on a noise image: its sharpness (mean
    |horizontal difference|), brightness and contrast match PIL's within 4 standard errors + 0.01,
    spreads within 20%. PIL's blur is a box-blur approximation, blurrier than a Gaussian at small
    sigma (0.27 against 0.33 at sigma 0.3) and sharper at larger ones."""
    pixels = np.random.default_rng(0).integers(0, 256, (72, 72, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")

    def stats(x: torch.Tensor) -> torch.Tensor:
        sharpness = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
        return torch.stack([sharpness, x.mean((1, 2, 3)), x.std((1, 2, 3))], dim=1)

    for pil, tensor in pil_and_tensor(tmp_path / "noise.png", LARGE, v3_views(LARGE, crop_min=0.2), 300):
        assert_same_distribution(stats(pil), stats(tensor), shift=0.01, rel=0.2)


def test_auto_picks_the_tensor_path_for_small_crops_on_cuda_only():
    cuda = torch.device("cuda")
    assert resolve_pipeline("auto", cuda, 32) == "tensor"
    assert resolve_pipeline("auto", cuda, 224) == "pil"
    assert resolve_pipeline("auto", CPU, 32) == "pil"
    assert resolve_pipeline("tensor", CPU, 224) == "tensor"
    assert store_side(ImageGeometry(small=True, size=32), SMALL) == 32  # CIFAR is stored as it is
    assert store_side(ImageGeometry(small=False, size=500), Preprocessing.for_input_size(224)) == 256


def config(data: Path, run_dir: Path, epochs: int, resume: str | None = None) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        run_dir=str(run_dir),
        epochs=epochs,
        batch_size=16,
        moco_k=32,
        moco_dim=16,
        bn_splits=2,
        lr=0.05,
        mlp=True,
        aug_plus=True,
        workers=0,
        keep=10,
        resume=resume,
        progress=False,
        data_pipeline="tensor",
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 noise images of 16 px (2 steps of 16 per epoch) and one whose pixels are cut off."""
    root = noise_images(tmp_path_factory.mktemp("imgs"), 32)
    (root / "truncated.png").write_bytes((root / "00.png").read_bytes()[:80])
    return root


def test_a_trainer_on_the_tensor_path_trains_and_resumes_exactly(images, tmp_path):
    with pytest.warns(UserWarning, match="truncated.png"):
        straight = Trainer(config(images, tmp_path / "straight", epochs=2))
    summary = straight.fit()
    assert summary["global_step"] == 4 and summary["skipped_files"] == 1 and math.isfinite(summary["loss"])
    start = json.loads((tmp_path / "straight" / "log.jsonl").read_text().splitlines()[0])
    assert start["data_pipeline"] == "tensor" and start["images"] == 32

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(config(images, tmp_path / "resumed", epochs=1)).fit()
        resumed = Trainer(config(images, tmp_path / "resumed", epochs=2, resume="auto"))
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
