"""MoCo's training augmentations (the evaluation preprocessing is moco_retrieval.preprocessing)."""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from moco_retrieval.preprocessing import Preprocessing, is_small


class GaussianBlur:
    """Gaussian blur with sigma drawn from [sigma_min, sigma_max], as in SimCLR / MoCo v2."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def train_augmentation(p: Preprocessing, aug_plus: bool) -> T.Compose:
    """MoCo v1 augmentation, or MoCo v2's (`aug_plus`): stronger colour jitter, grayscale, blur.

    Small crops (<= 64 px) follow the official CIFAR-10 recipe (facebookresearch/moco's CIFAR demo,
    also lightly's CIFAR benchmark): crop scale (0.08, 1) instead of (0.2, 1), since a 32 px crop of
    20% of the image is already only 14 px of signal, and no Gaussian blur, whose sigma of up to
    2 px (chosen for 224 px images) would wipe out most of a 32 px image.
    """
    normalize = T.Normalize(p.mean, p.std)
    small = is_small(p.input_size)
    crop = T.RandomResizedCrop(p.input_size, scale=(0.08, 1.0) if small else (0.2, 1.0))
    if aug_plus:
        ops = [
            crop,
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            *([] if small else [T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5)]),
            T.RandomHorizontalFlip(),
        ]
    else:
        ops = [
            crop,
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
        ]
    return T.Compose(ops + [T.ToTensor(), normalize])


class Solarize:
    """Invert the pixels above the threshold (BYOL's augmentation)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=128)


def v3_augmentations(p: Preprocessing) -> tuple[T.Compose, T.Compose]:
    """MoCo v3's asymmetric pair, BYOL's recipe: crop scale (0.08, 1) (moco-v3's --crop-min), colour
    jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, flip; Gaussian blur always on the first
    view and with p 0.1 on the second, which is solarized with p 0.2. Small crops get no blur (see
    train_augmentation)."""

    def view(blur: float, solarize: float) -> T.Compose:
        ops = [
            T.RandomResizedCrop(p.input_size, scale=(0.08, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        if not is_small(p.input_size):
            ops.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=blur))
        if solarize:
            ops.append(T.RandomApply([Solarize()], p=solarize))
        return T.Compose(ops + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(p.mean, p.std)])

    return view(blur=1.0, solarize=0.0), view(blur=0.1, solarize=0.2)


class TwoCropsTransform:
    """Two independent augmentations of one image: the query and its positive key (MoCo v3: one
    view from each of two augmentations)."""

    def __init__(self, base: T.Compose, second: T.Compose | None = None) -> None:
        self.base = base
        self.second = second or base

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.base(img), self.second(img)]
