"""The methods' training augmentations (the evaluation preprocessing is moco_retrieval.preprocessing).

Each recipe is described once, as a ViewRecipe per view; PilView turns one into the PIL Compose
that DataLoader workers run, moco_train.tensor_aug into batched tensor operations (the data path
that keeps up with a GPU). Both follow the recipe's order: crop, colour jitter and grayscale (v1:
grayscale first), blur, solarize, flip, then normalisation. Flipping last instead of right after
the crop (as SimCLR, SwAV and Barlow Twins write it) draws from the same distribution: a flip
commutes with every colour operation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from moco_retrieval.preprocessing import Preprocessing, is_small

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
BLUR_SIGMA = (0.1, 2.0)  # SimCLR / MoCo v2
SOLARIZE_THRESHOLD = 128  # BYOL


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation: what both the PIL and the tensor pipeline are built from."""

    crop_min: float  # RandomResizedCrop scale (crop_min, crop_max), ratio CROP_RATIO
    jitter: tuple[float, float, float, float]  # ColorJitter brightness, contrast, saturation, hue
    jitter_p: float  # RandomApply's p (1: always)
    grayscale_p: float = 0.2
    grayscale_first: bool = False  # v1: grayscale, then jitter
    blur_p: float = 0.0  # Gaussian blur, sigma in BLUR_SIGMA
    solarize_p: float = 0.0
    crop_max: float = 1.0
    size: int | None = None  # output side in pixels; None: the input size (SwAV's small crops are smaller)


class GaussianBlur:
    """Gaussian blur with sigma drawn from [sigma_min, sigma_max], as in SimCLR / MoCo v2."""

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class Solarize:
    """Invert the pixels above the threshold (BYOL's augmentation)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=SOLARIZE_THRESHOLD)


class PilView(T.Compose):
    """A view's PIL pipeline; it keeps its recipe so that the tensor pipeline can be built from the
    very transform the trainer chose."""

    def __init__(self, p: Preprocessing, recipe: ViewRecipe) -> None:
        self.recipe = recipe

        def maybe(op, prob: float) -> list:
            return [] if prob == 0 else [op] if prob == 1 else [T.RandomApply([op], p=prob)]

        jitter = maybe(T.ColorJitter(*recipe.jitter), recipe.jitter_p)
        gray = [T.RandomGrayscale(p=recipe.grayscale_p)]
        super().__init__(
            [
                T.RandomResizedCrop(
                    recipe.size or p.input_size, scale=(recipe.crop_min, recipe.crop_max), ratio=CROP_RATIO
                ),
                *(gray + jitter if recipe.grayscale_first else jitter + gray),
                *maybe(GaussianBlur(BLUR_SIGMA), recipe.blur_p),
                *maybe(Solarize(), recipe.solarize_p),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(p.mean, p.std),
            ]
        )


def default_crop_min(p: Preprocessing) -> float:
    """0.08 for crops of 64 px or less (the official CIFAR-10 recipe), else 0.2 (MoCo v1/v2's)."""
    return 0.08 if is_small(p.input_size) else 0.2


def v1_v2_view(p: Preprocessing, aug_plus: bool, crop_min: float | None = None) -> ViewRecipe:
    """MoCo v1's view, or v2's (`aug_plus`); see train_augmentation."""
    crop_min = default_crop_min(p) if crop_min is None else crop_min
    if aug_plus:
        return ViewRecipe(crop_min, (0.4, 0.4, 0.4, 0.1), jitter_p=0.8, blur_p=0.0 if is_small(p.input_size) else 0.5)
    return ViewRecipe(crop_min, (0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_first=True)


def v3_views(p: Preprocessing, crop_min: float = 0.08) -> tuple[ViewRecipe, ViewRecipe]:
    """MoCo v3's asymmetric pair; see v3_augmentations."""
    blur = not is_small(p.input_size)
    first = ViewRecipe(crop_min, (0.4, 0.4, 0.2, 0.1), jitter_p=0.8, blur_p=1.0 if blur else 0.0)
    return first, replace(first, blur_p=0.1 if blur else 0.0, solarize_p=0.2)


def train_augmentation(p: Preprocessing, aug_plus: bool, crop_min: float | None = None) -> PilView:
    """MoCo v1 augmentation, or MoCo v2's (`aug_plus`): stronger colour jitter, grayscale, blur.

    Small crops (<= 64 px) follow the official CIFAR-10 recipe (facebookresearch/moco's CIFAR demo,
    also lightly's CIFAR benchmark): crop scale (0.08, 1) instead of (0.2, 1), since a 32 px crop of
    20% of the image is already only 14 px of signal, and no Gaussian blur, whose sigma of up to
    2 px (chosen for 224 px images) would wipe out most of a 32 px image. `crop_min`: the crop
    scale's lower bound (None: those defaults).
    """
    return PilView(p, v1_v2_view(p, aug_plus, crop_min))


def v3_augmentations(p: Preprocessing, crop_min: float = 0.08) -> tuple[PilView, PilView]:
    """MoCo v3's asymmetric pair, BYOL's recipe: crop scale (crop_min, 1) (moco-v3's --crop-min),
    colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, flip; Gaussian blur always on the
    first view and with p 0.1 on the second, which is solarized with p 0.2. Small crops get no blur
    (see train_augmentation)."""
    first, second = v3_views(p, crop_min)
    return PilView(p, first), PilView(p, second)


def color_distortion(p: Preprocessing, crop_min: float, strength: float) -> ViewRecipe:
    """SimCLR's crop and colour distortion (also SwAV's large crops): crop scale (crop_min, 1), colour
    jitter (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale 0.2, and Gaussian blur with p 0.5 except
    on small crops (SimCLR's CIFAR-10 command turns blur off)."""
    s = strength
    return ViewRecipe(
        crop_min, (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), jitter_p=0.8, blur_p=0.0 if is_small(p.input_size) else 0.5
    )


def simclr_view(p: Preprocessing, crop_min: float) -> ViewRecipe:
    """SimCLR's view (both views alike): colour strength 1.0, or 0.5 on small crops, as its official
    CIFAR-10 command (--color_jitter_strength=0.5 --use_blur=False); that makes it MoCo v2's
    small-image view exactly."""
    return color_distortion(p, crop_min, 0.5 if is_small(p.input_size) else 1.0)


def swav_views(p: Preprocessing, crop_min: float, small_crops: int, small_size: int) -> list[ViewRecipe]:
    """SwAV's multi-crop: two crops of scale (crop_min, 1) at the input size and `small_crops` of
    scale (0.05, crop_min) at small_size px (the official 2x224 + 6x96, scales (0.14, 1) and
    (0.05, 0.14)); colour distortion of strength 1 on every crop (blur off on small images)."""
    large = color_distortion(p, crop_min, 1.0)
    small = replace(large, crop_min=0.05, crop_max=crop_min, size=small_size)
    return [large, large] + [small] * small_crops


class ViewsTransform:
    """Independent augmentations of one image, one per view: MoCo's query and its positive key, one
    view from each of BYOL's two augmentations, SwAV's crops, or InstDisc's single view."""

    def __init__(self, views: Sequence[PilView]) -> None:
        self.views = list(views)

    @property
    def base(self) -> PilView:
        """The first view's pipeline (MoCo's query)."""
        return self.views[0]

    def recipes(self) -> tuple[ViewRecipe, ...]:
        """The views' recipes (what the tensor pipeline runs)."""
        return tuple(view.recipe for view in self.views)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [view(img) for view in self.views]


class TwoCropsTransform(ViewsTransform):
    """Two views: the query and its positive key by one augmentation, or (MoCo v3) one view from
    each of two augmentations."""

    def __init__(self, base: PilView, second: PilView | None = None) -> None:
        super().__init__([base, second or base])
