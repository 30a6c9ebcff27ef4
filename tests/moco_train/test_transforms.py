"""The augmentation recipes (small-image vs ImageNet-size) and the stem that follows the crop."""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms as T

from moco_retrieval.preprocessing import Preprocessing
from moco_train.config import Recipe, TrainConfig, resolve
from moco_train.trainer import Trainer
from moco_train.transforms import GaussianBlur, train_augmentation
from tests.images import noise_images


def ops(compose: T.Compose) -> list:
    """Every transform in a Compose, RandomApply unwrapped."""
    out = []
    for t in compose.transforms:
        out.extend(t.transforms if isinstance(t, T.RandomApply) else [t])
    return out


def crop_scale(compose: T.Compose) -> tuple[float, float]:
    (crop,) = [t for t in ops(compose) if isinstance(t, T.RandomResizedCrop)]
    return crop.scale


def test_small_crops_get_the_cifar_recipe_no_blur_and_a_wider_crop_scale():
    for size in (32, 64):
        v2 = train_augmentation(Preprocessing.for_input_size(size), aug_plus=True)
        assert not any(isinstance(t, GaussianBlur) for t in ops(v2))
        assert crop_scale(v2) == (0.08, 1.0)
        assert crop_scale(train_augmentation(Preprocessing.for_input_size(size), aug_plus=False)) == (0.08, 1.0)


def test_large_crops_keep_moco_v2_blur_and_crop_scale():
    v2 = train_augmentation(Preprocessing.for_input_size(96), aug_plus=True)
    assert any(isinstance(t, GaussianBlur) for t in ops(v2))
    assert crop_scale(v2) == (0.2, 1.0)


def test_the_stem_follows_the_crop_size_not_the_image_size(tmp_path: Path):
    """Photos of 200 px trained at --crop-size 64 get the CIFAR stem (else the last map is 2x2)."""
    noise_images(tmp_path, 8, size=(160, 200), suffix=".jpg")

    def trainer(crop_size: int | None) -> Trainer:
        return Trainer(
            TrainConfig(
                data=str(tmp_path),
                run_dir=str(tmp_path / f"run{crop_size}"),
                batch_size=8,
                moco_k=16,
                crop_size=crop_size,
                workers=0,
                progress=False,
            )
        )

    small = trainer(64)
    assert small.cifar_stem and small.preprocessing.input_size == 64
    assert not any(isinstance(t, GaussianBlur) for t in ops(small.dataset.transform.base))
    large = trainer(None)
    assert not large.cifar_stem and large.preprocessing.input_size == 224


def test_method_defaults_resolve_from_the_recipe():
    def cfg(**kwargs) -> TrainConfig:
        return TrainConfig(data="d", run_dir="r", **kwargs)

    assert resolve(cfg(), small=True).moco_t == 0.07  # v1
    v2 = cfg()
    v2.apply_v2()
    assert (resolve(v2, small=False).moco_t, resolve(v2, small=True).moco_t) == (0.2, 0.1)
    assert resolve(cfg(moco_t=0.5, mlp=True, aug_plus=True), small=True).moco_t == 0.5  # --moco-t wins
    assert resolve(v2, small=True) == Recipe(
        lr=0.03,
        weight_decay=1e-4,
        optimizer="sgd",
        warmup_epochs=0,
        moco_dim=128,
        moco_m=0.999,
        moco_m_cos=False,
        moco_t=0.1,
        crop_min=0.08,
    )
    # v3 (facebookresearch/moco-v3): AdamW for ViTs, LARS for ResNets, lr scaled by batch / 256.
    vit = resolve(cfg(moco_v3=True, arch="vit_small", batch_size=512, epochs=300), small=False)
    assert vit == Recipe(
        lr=3e-4,
        weight_decay=0.1,
        optimizer="adamw",
        warmup_epochs=40,
        moco_dim=256,
        moco_m=0.99,
        moco_m_cos=True,
        moco_t=0.2,
        crop_min=0.08,
    )
    resnet = resolve(cfg(moco_v3=True, arch="resnet50", batch_size=1024, moco_m_cos=False), small=False)
    assert (resnet.optimizer, resnet.lr, resnet.weight_decay, resnet.moco_t, resnet.moco_m_cos) == (
        "lars",
        1.2,
        1e-6,
        1.0,
        False,
    )
