"""Model upgrades, measured in one run (a shared 2-core machine: read the ratios):

1. Throughput: `retrieval-server migrate` against `moco-train embed` on the same images (--per-class
   CIFAR-10 training images per class) and model (the committed ResNet-18), each timed from its
   launch to its last vector, with the same batch size and decoding workers, the images in the page
   cache. migrate runs twice, before and after embed: with the torch runtime (the forward `moco-train
   embed` uses) and with ONNX Runtime (what the server uses on the CPU, and migrate's default
   there). The source store holds the same images as vector-only items (random vectors of another
   model, a file:// uri each), 10% labelled.
2. The switch under load: a server of the old model serves that store; --clients closed-loop
   clients search and classify while SwitchModel moves it to the store part 1 migrated: calls made
   and failed, and p99 latency while the switch runs against the seconds before it.
3. Scale: --items vector-only items whose uris point at generated 32 px JPEGs on disk, migrated: the
   time, and the peak RSS of the migrate process and its decoding workers (the largest of them, as
   the kernel's ru_maxrss of the waited-for processes gives it).

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/migrate.py            # --items 100000 took about 15 minutes here
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import cifar_parser, class_subset, ensure_cifar, pretrained_export  # noqa: E402
from common import machine_info, ratio  # noqa: E402

from moco_retrieval.architectures import build_backbone  # noqa: E402
from moco_retrieval.export import make_export  # noqa: E402
from moco_retrieval.fileio import atomic_torch_save, atomic_write  # noqa: E402
from moco_retrieval.images import corpus_files  # noqa: E402
from moco_retrieval.preprocessing import Preprocessing  # noqa: E402
from retrieval_client import RetrievalClient  # noqa: E402
from retrieval_server.backup import model_fingerprint  # noqa: E402
from retrieval_server.process import ServerProcess  # noqa: E402
from retrieval_server.store import NewItem, Store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
BATCH, WORKERS = 64, 1  # the same for migrate and embed: 2 cores, one decodes while one forwards


def old_export(out: Path) -> Path:
    """The model the source stores were embedded by: a ResNet-18 (CIFAR stem) at random init."""
    import torch

    torch.manual_seed(0)
    model = build_backbone("resnet18", cifar_stem=True, head="none", head_dim=0)
    blob = make_export(
        model.state_dict(), arch="resnet18", cifar_stem=True, preprocessing=Preprocessing.for_input_size(32)
    )
    atomic_torch_save(blob, out)
    return out


def source_store(directory: Path, model: Path, files: list[tuple[str, Path, str]], chunk: int = 5000) -> Path:
    """A store of the old model with one vector-only item per (id, image, class) (a random unit
    vector, the image's file:// uri), every 10th labelled with its class."""
    shutil.rmtree(directory, ignore_errors=True)
    store = Store(directory)
    store.bind_model(model_fingerprint(model), 512, reset=False)
    rng = np.random.default_rng(0)
    for start in range(0, len(files), chunk):
        part = files[start : start + chunk]
        vectors = rng.standard_normal((len(part), 512)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert(
            [
                NewItem(item_id, v, label if (start + i) % 10 == 0 else None, {"uri": path.resolve().as_uri()})
                for i, ((item_id, path, label), v) in enumerate(zip(part, vectors))
            ]
        )
    store.close()
    return directory


def timed(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in MB of the process and its descendants, the largest one) of a command,
    run through a wrapper process whose only children it is (ru_maxrss of its waited-for processes)."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, cwd=REPO, env=ENV, capture_output=True)
    seconds, max_rss_kb = out.stdout.split()
    return float(seconds), int(max_rss_kb) // 1024


def migrate_cmd(store: Path, to: Path, model: Path, root: Path, encoder: str) -> list[str]:
    shutil.rmtree(to, ignore_errors=True)
    shutil.rmtree(to.with_name(to.name + ".migrate"), ignore_errors=True)
    return [
        sys.executable, "-m", "retrieval_server", "migrate", "--store", str(store), "--to", str(to),
        "--model", str(model), "--image-root", str(root), "--encoder", encoder, "--device", "cpu",
        "-b", str(BATCH), "-j", str(WORKERS),
    ]  # fmt: skip


def embed_cmd(data: Path, model: Path, out: Path) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    return [
        sys.executable, "-m", "moco_train", "embed", str(data), "--checkpoint", str(model), "--out", str(out),
        "--device", "cpu", "-b", str(BATCH), "-j", str(WORKERS), "--quiet",
    ]  # fmt: skip


def throughput(work: Path, data: Path, root: Path, old: Path, new: Path) -> tuple[dict, Path]:
    """`data` links to the images under `root` (where their uris point, links resolved)."""
    files = [(f.rel, f.path, f.folder) for f in corpus_files(data)]
    store = source_store(work / "source", old, files)
    images = len(files)
    for _, path, _ in files:  # in the page cache for every run alike
        path.read_bytes()
    seconds = {"migrate_torch": timed(migrate_cmd(store, work / "migrated-torch", new, root, "torch"))[0]}
    seconds["moco_train_embed"] = timed(embed_cmd(data, new, work / "shards"))[0]  # between the two: drift hits both
    seconds["migrate_onnx"] = timed(migrate_cmd(store, work / "migrated-onnx", new, root, "onnx"))[0]
    rates = {mode: round(images / s, 1) for mode, s in seconds.items()}
    return {
        "images": images,
        "seconds": {mode: round(s, 1) for mode, s in seconds.items()},
        "images_per_s": rates,
        "over_moco_train_embed": {m: ratio(r, rates["moco_train_embed"]) for m, r in rates.items()},
    }, store


def switch_under_load(work: Path, store: Path, old: Path, new: Path, clients: int, before_s: float) -> dict:
    """Closed-loop Search and Classify clients through a SwitchModel; latencies by when the call began."""
    served = work / "served"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(store, served)  # the same store (its identity too): what was migrated
    calls: list[tuple[float, float, bool]] = []  # (began, seconds, ok)
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(seed: int, address: str) -> None:
        rng = np.random.default_rng(seed)
        with RetrievalClient(address) as client:
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    if rng.random() < 0.5:
                        client.search(vector=rng.standard_normal(512), k=10)
                    else:
                        client.classify(vector=rng.standard_normal(512), k=200, neighbors=0)
                    ok = True
                except Exception:  # noqa: BLE001 - a failed call is what this measures
                    ok = False
                with lock:
                    calls.append((began, time.perf_counter() - began, ok))

    with ServerProcess(old, served, cwd=REPO, log_dir=work) as server:
        threads = [threading.Thread(target=client_loop, args=(i, server.address)) for i in range(clients)]
        for t in threads:
            t.start()
        try:
            time.sleep(before_s)
            with RetrievalClient(server.address, timeout=600) as admin:
                began = time.perf_counter()
                switched = admin.switch_model(new, work / "migrated-onnx")
                ended = time.perf_counter()
            time.sleep(2.0)
        finally:
            stop.set()
            for t in threads:
                t.join()

    def window(start: float, end: float) -> dict:
        part = [(s, ok) for b, s, ok in calls if start <= b < end]
        ms = np.array([s for s, ok in part if ok]) * 1e3
        return {
            "calls": len(part),
            "failed": sum(not ok for _, ok in part),
            "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        }

    before, during = window(began - before_s + 1.0, began), window(began, ended)
    return {
        "clients": clients,
        "items": switched.item_count,
        "switch_seconds": round(ended - began, 2),
        "calls": len(calls),
        "failed": sum(not ok for _, _, ok in calls),
        "before": before,
        "during": during,
        "p99_during_over_before": ratio(during["p99_ms"] or 0, before["p99_ms"] or 0),
    }


def generated_images(root: Path, count: int) -> list[tuple[str, Path, str]]:
    """`count` random 32 px JPEGs, 1,000 per folder (made once; reused by a later run)."""
    files = []
    rng = np.random.default_rng(1)
    for i in range(count):
        path = root / f"{i // 1000:03d}" / f"{i:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
        files.append((f"{i:06d}", path, ""))
    return files


def scale(work: Path, old: Path, new: Path, items: int) -> dict:
    root = work / "generated"
    files = generated_images(root, items)
    store = source_store(work / "source-scale", old, files)
    seconds, rss_mb = timed(migrate_cmd(store, work / "migrated-scale", new, root, "auto"))
    shutil.rmtree(work / "migrated-scale")
    return {
        "items": items,
        "seconds": round(seconds, 1),
        "items_per_s": round(items / seconds, 1),
        "peak_rss_mb": rss_mb,
    }


def main() -> None:
    parser = cifar_parser(__doc__, "migrate")
    parser.add_argument("--per-class", type=int, default=300, help="CIFAR-10 training images per class (part 1)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients during the switch")
    parser.add_argument("--before-s", type=float, default=10.0, help="seconds of load before the switch")
    parser.add_argument("--items", type=int, default=100_000, help="vector-only items of part 3")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "migrate.json")
    args = parser.parse_args()
    ensure_cifar(args.cifar)
    args.work.mkdir(parents=True, exist_ok=True)
    new = pretrained_export(args.work / "pretrained_export.pt")
    old = old_export(args.work / "old.pt")
    data = class_subset(args.cifar / "train", args.per_class, args.work / "corpus")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = machine_info()
    speed, store = throughput(args.work, data, args.cifar.resolve(), old, new)
    print(json.dumps(speed, indent=2), flush=True)
    switch = switch_under_load(args.work, store, old, new, args.clients, args.before_s)
    print(json.dumps(switch, indent=2), flush=True)
    big = scale(args.work, old, new, args.items)
    print(json.dumps(big, indent=2), flush=True)
    report = {
        "benchmark": "migrate",
        "setup": {
            "model": "pretrained/moco_v2_resnet18_cifar10.pt (the new model); a random-init ResNet-18 (the old one)",
            "batch_size": BATCH,
            "decoding_workers": WORKERS,
            "runs": 1,
        },
        "throughput": speed,
        "switch_under_load": switch,
        "scale": big,
        "machine": machine,
        "date": started,
    }
    atomic_write(args.out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
