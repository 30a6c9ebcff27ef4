"""The evaluation preprocessing: how an image becomes an encoder's input. Stored in every export, and
applied the same way by `moco-train knn`, the training monitor and the server."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images no larger than this get the CIFAR stem and are trained/served at their own size.
SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the encoder's input; stored in every export so serving matches training."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_input_size(cls, input_size: int) -> Preprocessing:
        """Resize the short side to input/0.875 then center-crop (ImageNet convention); small
        images are used at their own size."""
        resize = input_size if is_small(input_size) else int(round(input_size / 0.875))
        return cls(input_size=input_size, resize_size=resize)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )


def eval_transform(p: Preprocessing) -> T.Compose:
    """PIL RGB image -> normalised float tensor (3, input_size, input_size)."""
    return T.Compose(
        [
            T.Resize(p.resize_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(p.input_size),
            T.ToTensor(),
            T.Normalize(p.mean, p.std),
        ]
    )


def is_small(input_size: int) -> bool:
    """Crops of at most SMALL_IMAGE_MAX px get the CIFAR stem and the small-image augmentation."""
    return input_size <= SMALL_IMAGE_MAX
