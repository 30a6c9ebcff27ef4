"""Finding images, robust decoding and deterministic multi-view augmentation.

Every random choice of an epoch is a function of (seed, epoch, index): the sampler's order comes
from a generator seeded with seed + epoch, and each sample's augmentation from its own seed. The
data stream therefore does not depend on the number of workers and can be resumed mid-epoch.
"""

from __future__ import annotations

import random
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from moco_retrieval.images import ImageDecodeError, decode_image, image_files
from moco_retrieval.preprocessing import SMALL_IMAGE_MAX


class DataError(ValueError):
    """The data location is missing, empty or unusable (a user error: reported in one line)."""


def find_images(source: str | Path) -> list[Path]:
    """Image paths under a folder (any depth, sorted), or listed one per line in a text file
    (blank lines and '#' comments ignored; relative paths are relative to the list's folder)."""
    source = Path(source)
    if source.is_dir():
        return image_files(source)
    if source.is_file():
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{source}: not a folder or a readable text list of image paths ({exc})") from exc
        paths = [line.strip() for line in lines]
        return [
            p if p.is_absolute() else source.parent / p for p in (Path(s) for s in paths if s and not s.startswith("#"))
        ]
    raise DataError(f"{source}: no such folder or file")


def header_ok(path: Path) -> str | None:
    """Cheap validity check (file size and image header, no pixel decode): None, or why it is unusable."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError) as exc:
        return f"not an image ({exc})"
    if width == 0 or height == 0:
        return "zero-size image"
    return None


def validate(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split paths into usable ones and (path, reason) for those skipped, warning once per skipped file."""
    good, bad = [], []
    for path in paths:
        reason = header_ok(path)
        if reason is None:
            good.append(path)
        else:
            bad.append((path, reason))
            warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
    return good, bad


@dataclass(frozen=True)
class ImageGeometry:
    small: bool  # CIFAR stem and training at the images' own size
    size: int  # typical short side of the sampled images


def detect_geometry(paths: Sequence[Path], sample: int = 64) -> ImageGeometry:
    """Median short/long side of up to `sample` evenly spaced files: small (<= 64 px) data gets the CIFAR stem."""
    if not paths:
        raise DataError("no images to inspect")
    step = max(1, len(paths) // sample)
    sizes = []
    for path in list(paths)[::step][:sample]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (OSError, SyntaxError, ValueError):
            continue
    if not sizes:
        raise DataError("none of the sampled images could be read")
    long_side = statistics.median(max(s) for s in sizes)
    short_side = int(statistics.median(min(s) for s in sizes))
    return ImageGeometry(small=long_side <= SMALL_IMAGE_MAX, size=short_side)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (2**63)


def with_seed(seed: int, fn: Callable, *args):
    """Run fn with torch's CPU and Python's global RNGs seeded, restoring both afterwards
    (torchvision transforms draw from torch, our GaussianBlur from `random`).

    Seeds torch.default_generator alone: torch.manual_seed would also queue a seed for each lazily
    initialised accelerator, recording a stack trace each time (a large share of a 32 px sample's
    cost), for generators the CPU transforms never use."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            return fn(*args)
        finally:
            random.setstate(py_state)


class UnlabeledImages(Dataset):
    """The transform's views of an image (two crops for MoCo), the index of the image they are views
    of, then the decode failures met. Items are addressed by (epoch, index) so that augmentation is
    deterministic; an image that fails to decode is replaced by the next one and reported, and the
    item names the image it holds (InstDisc writes its feature into that image's bank row)."""

    def __init__(self, paths: Sequence[Path], transform: Callable, seed: int) -> None:
        if not paths:
            raise DataError("the dataset is empty (no decodable images found)")
        self.paths = list(paths)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        failed = []
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                img = decode_image(self.paths[i])
            except ImageDecodeError as exc:
                failed.append((i, str(exc)))
                continue
            return *with_seed(sample_seed(self.seed, epoch, index), self.transform, img), i, failed
        raise DataError("no image in the dataset can be decoded")


def collate_pairs(batch):
    """(im_q, im_k, ..., the images' indices, [(index, reason) of images that failed to decode]):
    each view stacked."""
    views = [torch.stack(view) for view in zip(*(b[:-2] for b in batch))]
    return *views, torch.tensor([b[-2] for b in batch], dtype=torch.long), [f for b in batch for f in b[-1]]


class EpochSampler(Sampler):
    """This process's share of a per-epoch permutation, as (epoch, index) keys.

    Like DistributedSampler(drop_last=True) seeded with seed + epoch: the permutation is cut to a
    multiple of the global batch (every process runs the same number of full steps), rank r takes
    the r-th contiguous slice of each global batch, and `start_step` skips the batches already
    trained before a mid-epoch resume. Concatenating the ranks' slices (all_gather order) gives
    the global batch in the order one process would see it, so a run's data stream, its queue and
    its BatchNorm groups (split-BN group g = process g) do not depend on the number of processes.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < global_batch:
            raise DataError(f"the dataset has {n} usable images, fewer than the batch size {global_batch}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.global_batch]
        local = self.global_batch // self.world_size
        mine = perm.view(-1, self.world_size, local)[self.start_step :, self.rank]
        return mine.reshape(-1).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self._indices()])

    def __len__(self) -> int:
        return len(self._indices())


class LabelledImages(Dataset):
    """An ImageFolder-style labelled set: class = first-level subfolder (sorted by name), images at
    any depth below it. Items are (tensor, label, index); an undecodable image yields None."""

    def __init__(self, root: str | Path, transform: Callable | None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"{root}: no class subfolders (expected {root}/<class>/<images>)")
        samples = [(p, label) for label, c in enumerate(self.classes) for p in find_images(root / c)]
        good, self.skipped = validate([p for p, _ in samples])
        good_set = set(good)
        self.samples = [(p, label) for p, label in samples if p in good_set]
        if not self.samples:
            raise DataError(f"{root}: no usable images in its class subfolders")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return self.transform(decode_image(path)), label, index
        except ImageDecodeError as exc:
            return None, str(exc), index


def collate_labelled(batch):
    """(images, labels, indices) of the decodable items, plus [(index, reason)] of the others."""
    ok = [b for b in batch if b[0] is not None]
    failed = [(b[2], b[1]) for b in batch if b[0] is None]
    if not ok:
        return None, None, None, failed
    return (
        torch.stack([b[0] for b in ok]),
        torch.tensor([b[1] for b in ok], dtype=torch.long),
        torch.tensor([b[2] for b in ok], dtype=torch.long),
        failed,
    )
