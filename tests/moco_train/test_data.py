"""Finding images, skipping broken ones, geometry detection and deterministic sampling/augmentation."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moco_retrieval.preprocessing import Preprocessing, eval_transform
from moco_train.config import TrainConfig
from moco_train.data import (
    DataError,
    EpochSampler,
    LabelledImages,
    UnlabeledImages,
    collate_pairs,
    detect_geometry,
    find_images,
    validate,
)
from moco_train.trainer import Trainer
from moco_train.transforms import TwoCropsTransform, train_augmentation


def noise_image(seed: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """Good images in odd formats at several depths, and broken files that must be skipped."""
    root = tmp_path / "imgs"
    (root / "a" / "b" / "c").mkdir(parents=True)
    noise_image(0).save(root / "plain.jpg")
    noise_image(1, mode="RGBA").save(root / "a" / "alpha.png")
    noise_image(2, mode="P").save(root / "a" / "palette.gif")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(root / "a" / "b" / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image(3).save(root / "a" / "b" / "rotated.jpeg", exif=exif)
    noise_image(4, mode="CMYK").save(root / "a" / "b" / "c" / "cmyk.jpg")
    noise_image(5).save(root / "a" / "b" / "c" / "scan.tiff")
    noise_image(6).save(root / "a" / "b" / "c" / "photo.webp")
    noise_image(7).save(root / "a" / "b" / "c" / "bitmap.bmp")
    buf = io.BytesIO()
    noise_image(8, size=64).save(buf, format="JPEG")
    (root / "a" / "truncated.jpg").write_bytes(
        buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
    )  # header fine, pixels cut
    (root / "empty.jpg").write_bytes(b"")
    (root / "a" / "b" / "text.jpg").write_text("this is not a jpeg")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_find_images_any_depth_sorted_and_by_extension(odd_folder):
    found = find_images(odd_folder)
    assert found == sorted(found)
    assert len(found) == 12 and not any(p.suffix == ".txt" for p in found)
    assert odd_folder / "a" / "b" / "c" / "cmyk.jpg" in found


def test_find_images_from_a_list_file(odd_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\nimgs/plain.jpg\n\n{odd_folder / 'a' / 'alpha.png'}\n")
    assert find_images(listing) == [tmp_path / "imgs" / "plain.jpg", odd_folder / "a" / "alpha.png"]
    with pytest.raises(DataError, match="no such folder"):
        find_images(tmp_path / "missing")


def test_validate_skips_empty_and_non_image_files_with_one_warning_each(odd_folder):
    with pytest.warns(UserWarning) as record:
        good, bad = validate(find_images(odd_folder))
    assert sorted(p.name for p, _ in bad) == ["empty.jpg", "text.jpg"]
    assert len(record) == 2 and all("skipping" in str(w.message) for w in record)
    assert len(good) == 10


def test_undecodable_image_is_replaced_and_reported(odd_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good, _ = validate(find_images(odd_folder))
    p = Preprocessing.for_input_size(16)
    dataset = UnlabeledImages(good, TwoCropsTransform(train_augmentation(p, aug_plus=True)), seed=0)
    failures, held = [], []
    for i in range(len(dataset)):
        im_q, im_k, index, failed = dataset[(0, i)]
        assert im_q.shape == im_k.shape == (3, 16, 16)
        failures += failed
        held.append(index)
    assert [good[i].name for i, _ in failures] == ["truncated.jpg"]
    assert "truncated.jpg" in failures[0][1]
    truncated = failures[0][0]  # its item holds the next image, and says so
    assert held == [i + 1 if i == truncated else i for i in range(len(dataset))]


def test_instdisc_writes_a_substituted_image_into_its_own_bank_row(odd_folder, tmp_path):
    """One InstDisc step over the whole folder: every image's bank row is moved towards its feature,
    but the undecodable one's, whose item held the next image: that feature goes to the next
    image's row, not into the row of an image the network never saw (as it did before)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good, _ = validate(find_images(odd_folder))
        run = Trainer(
            TrainConfig(
                data=str(odd_folder), run_dir=str(tmp_path / "run"), method="instdisc", nce_k=4, batch_size=len(good),
                max_steps=1, workers=0, progress=False, amp="off", moco_dim=8,
            )
        )  # fmt: skip
        before = run.model.memory.clone()
        run.fit()
    truncated = next(i for i, path in enumerate(run.dataset.paths) if path.name == "truncated.jpg")
    moved = [not torch.equal(before[i], run.model.memory[i]) for i in range(len(good))]
    assert moved == [i != truncated for i in range(len(good))]


def test_small_images_are_detected(odd_folder, tmp_path):
    assert detect_geometry(find_images(odd_folder)).small
    big = tmp_path / "big"
    big.mkdir()
    noise_image(0, size=128).save(big / "x.png")
    geometry = detect_geometry([big / "x.png"])
    assert not geometry.small and geometry.size == 128


def test_augmentation_depends_only_on_seed_epoch_and_index(demo_data):
    paths = sorted((demo_data / "train" / "cat").iterdir())[:4]
    p = Preprocessing.for_input_size(32)
    dataset = UnlabeledImages(paths, TwoCropsTransform(train_augmentation(p, aug_plus=True)), seed=3)
    first = dataset[(1, 2)]
    torch.manual_seed(123), random.seed(123)  # the global RNG state must not matter...
    again = dataset[(1, 2)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])  # ...but the two crops differ
    assert not torch.equal(first[0], dataset[(2, 2)][0])  # and so do epochs
    state = torch.get_rng_state()
    dataset[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())  # and the global RNG is left alone


def test_epoch_sampler_order_sharding_and_resume_offset():
    sampler = EpochSampler(n=50, global_batch=8, seed=1)
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == 48 and len({i for _, i in order}) == 48  # 6 full batches, no repeats
    sampler.set_epoch(0, start_step=2)
    assert list(sampler) == order[16:]
    sampler.set_epoch(1)
    assert list(sampler) != [(1, i) for _, i in order]
    ranks = [EpochSampler(50, 8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    shards = [[i for _, i in s] for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 24 and not set(shards[0]) & set(shards[1])
    with pytest.raises(DataError, match="fewer than the batch size"):
        EpochSampler(n=5, global_batch=8, seed=0)


def test_loader_with_workers_matches_loader_without(demo_data):
    paths = sorted((demo_data / "train" / "dog").iterdir())[:16]
    p = Preprocessing.for_input_size(32)
    dataset = UnlabeledImages(paths, TwoCropsTransform(train_augmentation(p, aug_plus=False)), seed=0)

    def batches(workers: int):
        sampler = EpochSampler(len(dataset), 8, seed=0)
        sampler.set_epoch(1)
        return list(DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=workers, collate_fn=collate_pairs))

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_labelled_folder_classes_are_sorted_subfolders(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3)):
        (tmp_path / cls / "deeper").mkdir(parents=True)
        for i in range(n):
            noise_image(i).save(tmp_path / cls / "deeper" / f"{i}.png")
    (tmp_path / "ant" / "bad.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="bad.jpg"):
        ds = LabelledImages(tmp_path, eval_transform(Preprocessing.for_input_size(16)))
    assert ds.classes == ["ant", "zebra"]
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1]
    image, label, index = ds[4]
    assert image.shape == (3, 16, 16) and label == 1 and index == 4
    with pytest.raises(DataError, match="no class subfolders"):
        LabelledImages(tmp_path / "ant" / "deeper", eval_transform(Preprocessing.for_input_size(16)))
