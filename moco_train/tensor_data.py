"""The tensor data path (--data-pipeline tensor): the corpus decoded once into one uint8 tensor on
the training device, and the method's views made a batch at a time there (moco_train.tensor_aug).

JPEG decoding and PIL augmentation in DataLoader workers cannot keep up with a GPU training on
small images; decoding once and augmenting with batched tensor ops on the GPU can. The random
stream is the PIL path's contract: each sample's parameters come from a generator seeded with
data.sample_seed(seed, epoch, index), so they depend neither on the batch it lands in nor on the
number of processes, and a resumed run sees the same augmentations as an uninterrupted one.
The generator is a CPU one: parameters are drawn there in float64 (a few dozen numbers per
sample) and moved to the device with the batch's indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from moco_retrieval.images import ImageDecodeError, decode_image
from moco_retrieval.preprocessing import Preprocessing, is_small

from .data import DataError, EpochSampler, ImageGeometry, sample_seed
from .tensor_aug import DRAWS, augment, draw
from .transforms import ViewRecipe

PIPELINES = ("auto", "pil", "tensor")


def resolve_pipeline(mode: str, device: torch.device, input_size: int) -> str:
    """auto: tensor on CUDA for crops of 64 px or less (where PIL workers starve the GPU and the
    decoded corpus is small), else pil."""
    if mode == "auto":
        return "tensor" if device.type == "cuda" and is_small(input_size) else "pil"
    return mode


def store_side(geometry: ImageGeometry, p: Preprocessing) -> int:
    """The side S of the stored N x 3 x S x S corpus: small images keep their own (median) size, so
    same-size square images are stored untouched; larger ones are stored at the evaluation resize
    (the crop / 0.875), which bounds the detail a crop smaller than the image can show and costs
    3 S^2 bytes per image. Never less than the crop."""
    return max(p.input_size, geometry.size if geometry.small else p.resize_size)


class _Decoded(Dataset):
    """One file decoded (moco_retrieval.images.decode_image) and stretched to side x side:
    ((3, S, S) uint8, (width, height)) or (None, reason)."""

    def __init__(self, paths: Sequence[Path], side: int) -> None:
        self.paths, self.side = list(paths), side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            img = decode_image(self.paths[index])
        except ImageDecodeError as exc:
            return None, str(exc)
        size = img.size
        if size != (self.side, self.side):
            img = img.resize((self.side, self.side), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), size


def decode_corpus(
    paths: Sequence[Path], side: int, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """(images (N, 3, S, S) uint8, sizes (N, 2) float64 width and height, [(path index, reason)] of
    the files that did not decode, which are left out), decoded by `workers` processes."""
    loader = DataLoader(_Decoded(paths, side), batch_size=64, num_workers=workers, collate_fn=list)
    images = torch.empty(len(paths), 3, side, side, dtype=torch.uint8)
    sizes, failed, kept = [], [], 0
    for index, (image, info) in enumerate(item for batch in loader for item in batch):
        if image is None:
            failed.append((index, info))
            continue
        images[kept] = image
        sizes.append(info)
        kept += 1
    return images[:kept], torch.tensor(sizes, dtype=torch.float64).view(-1, 2), failed


class TensorImages:
    """The decoded corpus on `device` and the views' recipes: augment(epoch, indices) makes a batch's
    views (im_q, im_k, ...). `failed` lists the files left out, as (index in paths, reason); `paths`
    the files kept, in the corpus's order (sample i is paths[i])."""

    def __init__(
        self,
        paths: Sequence[Path],
        views: Sequence[ViewRecipe],
        p: Preprocessing,
        side: int,
        seed: int,
        device: torch.device,
        workers: int = 0,
    ) -> None:
        images, self.sizes, self.failed = decode_corpus(paths, side, workers)
        if not len(images):
            raise DataError("the dataset is empty (no decodable images found)")
        self.images = images.to(device)  # (N, 3, S, S) uint8
        left_out = {index for index, _ in self.failed}
        self.paths = [path for index, path in enumerate(paths) if index not in left_out]
        self.views, self.preprocessing, self.seed = views, p, seed
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return len(self.images)

    def uniforms(self, epoch: int, indices: Sequence[int]) -> torch.Tensor:
        """(B, views * DRAWS) float64 uniforms in [0, 1): row b from sample indices[b]'s own seed."""
        u = torch.empty(len(indices), len(self.views) * DRAWS, dtype=torch.float64)
        for row, index in zip(u, indices):
            self.generator.manual_seed(sample_seed(self.seed, epoch, index))
            row.uniform_(generator=self.generator)
        return u

    @torch.no_grad()
    def augment(self, epoch: int, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Every view of the samples `indices` of `epoch`: a (B, 3, size, size) float32 batch per view."""
        u = self.uniforms(epoch, indices)
        sizes = self.sizes[list(indices)]
        rows = torch.as_tensor(indices, dtype=torch.long).to(self.images.device)
        images = self.images.index_select(0, rows).float().div_(255)  # (B, 3, S, S)
        return tuple(
            augment(images, sizes, draw(u[:, k * DRAWS : (k + 1) * DRAWS], sizes, view), view, self.preprocessing)
            for k, view in enumerate(self.views)
        )


class TensorBatches:
    """What the training loop iterates, like its DataLoader: (*views, indices, failed) per step for
    the sampler's keys of this process (failed is always empty: the corpus was decoded up front)."""

    def __init__(self, dataset: TensorImages, sampler: EpochSampler, batch_size: int) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple]:
        keys = list(self.sampler)  # (epoch, index), a whole number of batches
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = keys[start : start + self.batch_size]
            indices = [index for _, index in batch]
            yield *self.dataset.augment(batch[0][0], indices), torch.tensor(indices, dtype=torch.long), []
