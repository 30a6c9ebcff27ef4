"""Corpus embedding past one server: `moco-train embed` with 1 and 2 processes (torchrun, gloo on the
CPU; NCCL and one GPU per process on GPUs) against indexing the same images through one server
(Upsert with image bytes, the server embedding them with dynamic batching), in one run.

The corpus is --per-class CIFAR-10 training images per class; the encoder the committed pretrained
ResNet-18. Each mode starts from nothing and is timed to its last vector stored or written, model
loading included: Upsert-with-images from the server's launch (empty store) to the last ack; embed
from the launch of its processes to the last shard; import (`retrieval-client import` of the 2-process
shards into a fresh server) from the server's launch to the last ack. Images/s are reported with
the ratio of each mode to Upsert-with-images.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/embed_scale.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import cifar_parser, class_subset, ensure_cifar, pretrained_export  # noqa: E402
from common import machine_info, ratio  # noqa: E402

from moco_retrieval.fileio import atomic_write  # noqa: E402
from moco_retrieval.images import corpus_files  # noqa: E402
from retrieval_client import RetrievalClient, UpsertItem  # noqa: E402
from retrieval_server.process import ServerProcess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def embed_seconds(data: Path, model: Path, out: Path, nproc: int, shard_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "moco_train", "embed", str(data), "--checkpoint", str(model)]
    cmd += ["--out", str(out), "--shard-size", str(shard_size), "-j", "1", "--device", "cpu", "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start


def served_seconds(model: Path, work: Path, images: int, fill: Callable[[str], None]) -> float:
    """Launch a server on an empty store, run fill(address), check it stored `images` items."""
    shutil.rmtree(work / "store", ignore_errors=True)
    start = time.perf_counter()
    with ServerProcess(model, work / "store", cwd=REPO, log_dir=work) as server:
        fill(server.address)
        seconds = time.perf_counter() - start
        with RetrievalClient(server.address) as client:
            assert client.info().item_count == images
    shutil.rmtree(work / "store")
    return seconds


def upsert_with_images(data: Path) -> Callable[[str], None]:
    def fill(address: str) -> None:
        with RetrievalClient(address, timeout=600) as client:
            client.upsert_many(UpsertItem(f.rel, image=f.path.read_bytes()) for f in corpus_files(data))

    return fill


def import_shards(shards: Path) -> Callable[[str], None]:
    def fill(address: str) -> None:
        cmd = [sys.executable, "-m", "retrieval_client", "--address", address, "import", str(shards)]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)

    return fill


def main() -> None:
    parser = cifar_parser(__doc__, "embed_scale")
    parser.add_argument("--per-class", type=int, default=300, help="CIFAR-10 training images per class")
    parser.add_argument("--shard-size", type=int, default=500, help="images per shard")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embed_scale.json")
    args = parser.parse_args()
    ensure_cifar(args.cifar)
    args.work.mkdir(parents=True, exist_ok=True)
    model = pretrained_export(args.work / "pretrained_export.pt")
    data = class_subset(args.cifar / "train", args.per_class, args.work / "corpus")
    images = len(corpus_files(data))
    seconds = {
        "upsert_with_images": served_seconds(model, args.work, images, upsert_with_images(data)),
        "embed_1_process": embed_seconds(data, model, args.work / "shards-1", 1, args.shard_size),
        "embed_2_processes": embed_seconds(data, model, args.work / "shards-2", 2, args.shard_size),
    }
    shards = args.work / "shards-2"
    seconds["import_2_process_shards"] = served_seconds(model, args.work, images, import_shards(shards))
    rates = {mode: round(images / s, 1) for mode, s in seconds.items()}
    report = {
        "benchmark": "embed_scale",
        "setup": {"images": images, "shard_size": args.shard_size, "model": "pretrained/moco_v2_resnet18_cifar10.pt"},
        "seconds": {mode: round(s, 1) for mode, s in seconds.items()},
        "images_per_s": rates,
        "over_upsert_with_images": {m: ratio(r, rates["upsert_with_images"]) for m, r in rates.items()},
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    print(json.dumps({k: report[k] for k in ("images_per_s", "over_upsert_with_images")}, indent=2))


if __name__ == "__main__":
    main()
