"""Augmentation throughput of the tensor data path (--data-pipeline tensor) against the PIL path, on
the CPU, on CIFAR-10 (32 px JPEGs), both measured in one run of this script.

  * PIL: what `moco-train train` runs by default: a DataLoader with --workers processes, each
    decoding the JPEG and running the view's PIL Compose twice per image (UnlabeledImages), batches
    of --batch-size in EpochSampler order;
  * tensor: the same images decoded once (timed on its own, with the same number of processes) into
    one uint8 tensor, then both views of each batch made by batched tensor ops in the main process,
    with torch using --workers threads (the cores the PIL workers get) and, on its own, one thread
    (on a shared, oversubscribed machine torch's threads spin-wait on each other: one thread can
    be the faster). `ratio` is the better of the two against PIL.
Each recipe (v1, v2, v3's asymmetric pair at 32 px) runs one epoch of the first --images images
(--images / 10 per class) through each path, --repeats times, interleaved; the best epoch of each
counts (the machine may be shared). images/s: images of the batches after the first, over the
time between the first batch's arrival and the last's (worker start-up excluded).
Nothing trains: this is the data path alone, the part that must keep up with a GPU.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/tensor_aug.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from moco_retrieval.fileio import atomic_write
from moco_retrieval.images import image_files
from moco_retrieval.preprocessing import Preprocessing
from moco_train.data import EpochSampler, UnlabeledImages, collate_pairs
from moco_train.tensor_data import TensorBatches, TensorImages
from moco_train.transforms import TwoCropsTransform, train_augmentation, v3_augmentations

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import class_subset, ensure_cifar  # noqa: E402
from common import machine_info, ratio  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SEED = 0


def recipes(p: Preprocessing) -> dict[str, TwoCropsTransform]:
    return {
        "v1": TwoCropsTransform(train_augmentation(p, aug_plus=False)),
        "v2": TwoCropsTransform(train_augmentation(p, aug_plus=True)),
        "v3": TwoCropsTransform(*v3_augmentations(p)),
    }


def timed_epoch(batches) -> float:
    """images/s over the batches after the first (the first pays for start-up)."""
    start, count = None, 0
    for im_q, *_ in batches:
        if start is None:
            start = time.perf_counter()
            continue
        count += len(im_q)
    return round(count / (time.perf_counter() - start), 1)


def pil_epoch(paths: list[Path], transform: TwoCropsTransform, args) -> float:
    dataset = UnlabeledImages(paths, transform, SEED)
    sampler = EpochSampler(len(dataset), args.batch_size, SEED)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate_pairs,
        drop_last=True,
        prefetch_factor=4,
    )
    return timed_epoch(loader)


def tensor_epoch(decoded: TensorImages, transform: TwoCropsTransform, threads: int, args) -> float:
    dataset = copy.copy(decoded)  # the decoded corpus, shared, with this recipe's views
    dataset.views = transform.recipes()
    sampler = EpochSampler(len(dataset), args.batch_size, SEED)
    torch.set_num_threads(threads)
    return timed_epoch(TensorBatches(dataset, sampler, args.batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", type=Path, default=Path("/tmp/cifar10"), help="unpacked here if missing")
    parser.add_argument("--images", type=int, default=5000, help="first images/10 of each class")
    parser.add_argument("--workers", type=int, default=2, help="PIL DataLoader workers = tensor-path threads")
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per path and recipe; the best counts")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tensor_aug.json")
    args = parser.parse_args()

    machine = machine_info()
    train = class_subset(ensure_cifar(args.cifar) / "train", args.images // 10, Path("/tmp/tensor_aug_subset"))
    paths = image_files(train)
    p = Preprocessing.for_input_size(32)
    torch.set_num_threads(args.workers)
    start = time.perf_counter()
    decoded = TensorImages(paths, recipes(p)["v2"].recipes(), p, 32, SEED, torch.device("cpu"), args.workers)
    decode_s = time.perf_counter() - start
    print(f"decoded {len(decoded)} images in {decode_s:.1f} s", flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in recipes(p)}
    for _ in range(args.repeats):  # interleaved, so that a burst of load elsewhere hits every path
        for name, transform in recipes(p).items():
            run = {
                "pil": pil_epoch(paths, transform, args),
                "threaded": tensor_epoch(decoded, transform, args.workers, args),
                "single": tensor_epoch(decoded, transform, 1, args),
            }
            print(name, json.dumps(run), flush=True)
            runs[name].append(run)
    cases = []
    for name, measured in runs.items():
        best = {key: max(run[key] for run in measured) for key in measured[0]}
        cases.append(
            {
                "recipe": name,
                "pil_img_per_s": best["pil"],
                f"tensor_{args.workers}_threads_img_per_s": best["threaded"],
                "tensor_1_thread_img_per_s": best["single"],
                "ratio": ratio(max(best["threaded"], best["single"]), best["pil"]),
                "ratio_same_cores": ratio(best["threaded"], best["pil"]),
                "runs": measured,
            }
        )

    report = {
        "benchmark": "tensor_aug",
        "machine": {**machine, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "setup": {
            "data": str(train),
            "images": len(paths),
            "input_size": 32,
            "batch_size": args.batch_size,
            "pil_workers": args.workers,
            "tensor_threads": [args.workers, 1],
            "device": "cpu",
        },
        "decode": {
            "images": len(decoded),
            "seconds": round(decode_s, 2),
            "img_per_s": round(len(decoded) / decode_s, 1),
            "tensor_mb": round(decoded.images.numel() / 2**20, 1),
        },
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
