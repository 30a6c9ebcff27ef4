"""The main job end to end, on the CPU or a GPU, driven through the project's own CLIs as a user would:

  1. continue pretraining the committed encoder (pretrained/, MoCo v2 on the CIFAR-10 training images) on
     the images (moco-train train --init, with a progress bar), or train one from random weights
     (--from-scratch),
  2. export its query encoder (moco-train export),
  3. start the server in a child process (retrieval-server serve, waiting for its ready file),
  4. index the training images without labels (retrieval-client index),
  5. label a few images per class (retrieval-client label, then the library for the rest),
  6. search with a held-out image and write a contact sheet (retrieval-client search --sheet),
  7. classify the held-out images and print the few-shot accuracy (retrieval-client classify),
     and let kNN propose labels for the rest of the corpus (retrieval-client label-corpus),
  8. point at the metrics URL, then SIGTERM the server and check that it exits 0.

`make demo` runs it on the bundled sample (data/demo: 1,600 + 400 CIFAR-10 images). `--data DIR` runs
the same flow on your own folder: DIR/train/<class>/... and DIR/test/<class>/... for the labelled flow,
or any folder of images (no labels: search only). `--full-cifar` unpacks
../shared/datasets/cifar10-jpg.tar.gz when it is there. Outputs go to demo-out/ (summary.json,
contact_sheet.png, proposals.csv, the run, the export and the store).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco_retrieval.images import image_files
from retrieval_client.client import RetrievalClient
from retrieval_server.process import ServerProcess, serve_command
from retrieval_web.process import WebProcess

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "demo"
PRETRAINED = REPO / "pretrained" / "moco_v2_resnet18_cifar10.pt"
CIFAR_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 300.0


class DemoError(RuntimeError):
    """A step failed: printed as one line, exit status 1."""


@dataclass(frozen=True)
class Dataset:
    corpus: Path  # what is trained on and indexed
    queries: Path | None  # held-out labelled images (test/<class>/...), None without labels
    labelled: bool  # corpus is <class>/<images>


def banner(step: str) -> None:
    print(f"\n== {step}", flush=True)


def tool(name: str) -> str:
    """A console script of this environment (the venv `make demo` runs in), else from PATH."""
    exe = BIN / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        raise DemoError(f"{name} not found: run `make demo` (it installs the project into its virtualenv)")
    return found


def run(cmd: Sequence[str], capture: bool = False, env: dict[str, str] | None = None, hint: str = "") -> str:
    """Run a CLI like a user (its progress bars on this terminal); its stdout when capture is set. `hint`
    is added to the error when it fails."""
    shown = [Path(cmd[0]).name, *map(str, cmd[1:])]
    if len(shown) > 60:  # e.g. classify with every held-out image; flags are always shown
        shown = shown[:8] + [f"... ({len(shown) - 8} more)"]
    print("$ " + " ".join(shown), flush=True)
    result = subprocess.run(
        [str(c) for c in cmd], stdout=subprocess.PIPE if capture else None, text=True, env={**os.environ, **(env or {})}
    )
    if result.returncode != 0:
        raise DemoError(f"{Path(cmd[0]).name} {cmd[1]} failed with exit status {result.returncode}{hint}")
    return result.stdout if capture else ""


def class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and image_files(d)) if folder.is_dir() else []


def unpack_cifar(archive: Path) -> Path:
    """The full CIFAR-10 JPEG set, unpacked once outside the repository."""
    dest = Path(tempfile.gettempdir()) / "moco-retrieval-cifar10"
    done = dest / ".complete"
    if not done.exists():
        print(f"unpacking {archive} to {dest} (first run only)", flush=True)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        done.touch()
    roots = [p.parent for p in dest.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
    if not roots:
        raise DemoError(f"{archive}: no train/ and test/ folders inside")
    return roots[0]


def subset(source: Path, dest: Path, per_class: int) -> Path:
    """The first `per_class` images of each class folder (hard links, copies across devices)."""
    shutil.rmtree(dest, ignore_errors=True)
    for cls in class_folders(source):
        for image in image_files(cls)[:per_class]:
            target = dest / cls.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(image, target)
            except OSError:
                shutil.copy2(image, target)
    return dest


def prepare_data(args: argparse.Namespace, out: Path) -> Dataset:
    root = args.data
    if args.full_cifar:
        if not CIFAR_ARCHIVE.exists():
            raise DemoError(f"--full-cifar: {CIFAR_ARCHIVE} is not there")
        root = unpack_cifar(CIFAR_ARCHIVE)
    if not root.is_dir():
        raise DemoError(f"{root}: not a folder")
    train, test = root / "train", root / "test"
    if class_folders(train) and class_folders(test):
        if args.per_class:
            train = subset(train, out / "data" / "train", args.per_class)
        if args.queries_per_class:
            test = subset(test, out / "data" / "test", args.queries_per_class)
        return Dataset(train, test, labelled=True)
    if not image_files(root):
        raise DemoError(f"{root}: no images found")
    print(f"{root} has no train/<class>/ and test/<class>/ folders: running without labels (search only)")
    return Dataset(root, None, labelled=False)


def train_list(corpus: Path, limit: int | None, out: Path) -> tuple[Path, int]:
    """The training input (the folder itself, or a list file of `limit` images taken across classes)
    and its number of images."""
    if not limit:
        return corpus, len(image_files(corpus))
    groups = [image_files(c) for c in class_folders(corpus)] or [image_files(corpus)]
    chosen = [p for row in zip(*groups) for p in row][:limit] if len(groups) > 1 else groups[0][:limit]
    listing = out / "train_images.txt"
    listing.write_text("".join(f"{p.resolve()}\n" for p in chosen))
    return listing, len(chosen)


def describe_pretrained(path: Path) -> str:
    """What the encoder the demo builds on learned, from its provenance file."""
    provenance = path.with_suffix(".json")
    if not provenance.exists():
        return f"{path} (no provenance file beside it)"
    p = json.loads(provenance.read_text())
    knn = p["knn"]
    return (
        f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {p['method']}, {p['arch']}, "
        f"{p['training']['epochs']} epochs on {p['data']['name']} ({p['training']['images_seen']:,} images seen, "
        f"labels never used); kNN top-1 {knn['top1']:.1f}% on {knn['queries']:,} test images against "
        f"a {knn['bank']:,}-image bank (k={knn['k']}, tau={knn['tau']})"
    )


def train_and_export(
    args: argparse.Namespace, data: Dataset, out: Path, steps: tuple[str, str] = ("1/8", "2/8")
) -> Path:
    """Train (or continue pretraining) and export; `steps` number the two banners."""
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    images, count = train_list(data.corpus, args.train_limit, out)
    batch_size = min(args.batch_size, 1 << (count.bit_length() - 1))  # a small folder still trains
    if args.from_scratch:
        banner(f"{steps[0]} train a MoCo encoder from random weights (moco-train train)")
    else:
        if not args.init.exists():
            raise DemoError(f"{args.init}: no pretrained encoder there (--from-scratch trains without one)")
        banner(f"{steps[0]} continue pretraining the committed encoder on these images (moco-train train --init)")
        print("building on " + describe_pretrained(args.init))
    if batch_size != args.batch_size:
        print(f"{count} training images: batch size {batch_size} instead of {args.batch_size}")
    cmd = [
        tool("moco-train"),
        "train",
        images,
        "--run-dir",
        run_dir,
        "--arch",
        args.arch,
        "--epochs",
        args.epochs,
        "--batch-size",
        batch_size,
        "--lr",
        args.lr or (0.06 if args.from_scratch else 0.01),
        "--cos",
        "--workers",
        args.workers,
        "--keep",
        1,
    ]
    if args.max_steps:
        cmd += ["--max-steps", args.max_steps]
    if args.moco_k:
        cmd += ["--moco-k", args.moco_k]
    hint = ""
    if not args.from_scratch:
        # the pretrained run's recipe (MoCo v2, small-image augmentation), at a lower learning rate
        cmd += ["--init", args.init, "--v2", "--moco-t", 0.1, "--moco-m", 0.99, "--wd", 5e-4]
        if not args.moco_k:  # a queue no longer than the corpus, in whole batches
            cmd += ["--moco-k", min(4096, max(batch_size, (count // batch_size) * batch_size))]
        hint = " (the committed encoder is a 32 px CIFAR ResNet-18: --from-scratch trains a new one)"
    started = time.monotonic()
    run(cmd, hint=hint)
    checkpoints = sorted(run_dir.glob("checkpoint_*.pt"))
    if not checkpoints:
        raise DemoError(f"training wrote no checkpoint in {run_dir}")
    print(f"trained in {time.monotonic() - started:.0f} s: {checkpoints[-1]}")
    banner(f"{steps[1]} export the query encoder (moco-train export)")
    encoder = out / "encoder.pt"
    run([tool("moco-train"), "export", checkpoints[-1], encoder])
    return encoder


def few_shot_ids(corpus: Path, shots: int) -> dict[str, str]:
    """The first `shots` images of each class, as the ids `retrieval-client index` gives them."""
    return {
        p.relative_to(corpus).as_posix(): cls.name for cls in class_folders(corpus) for p in image_files(cls)[:shots]
    }


def label_few(client_cmd: list[str], address: str, labels: dict[str, str]) -> None:
    first, *rest = labels.items()
    run([*client_cmd, "label", *first])
    if rest:  # the rest in one call through the library: what the CLI does per item, without a process each
        with RetrievalClient(address) as client:
            client.set_labels(dict(rest))
    print(f"labelled {len(labels)} items ({len(set(labels.values()))} classes) through the client library")


def classify_accuracy(client_cmd: list[str], queries: Path) -> tuple[float, int, float]:
    """Few-shot top-1 accuracy of Classify on the held-out images, their count, and chance."""
    paths = image_files(queries)
    results = json.loads(run([*client_cmd, "classify", "--json", *paths], capture=True))
    truth = [p.parent.name for p in paths]
    correct = sum(r["label"] == t for r, t in zip(results, truth))
    return correct / len(paths), len(paths), 1.0 / len(set(truth))


def label_corpus_accuracy(client_cmd: list[str], proposals: Path, labelled: set[str]) -> tuple[float, int]:
    """kNN proposals for every unlabelled corpus item, scored against their folder names."""
    run([*client_cmd, "label-corpus", "--out", proposals])
    with proposals.open(newline="", encoding="utf-8") as f:
        pairs = [(row["id"], row["label"]) for row in csv.DictReader(f) if row["id"] not in labelled]
    correct = sum(label == i.split("/", 1)[0] for i, label in pairs)
    return (correct / len(pairs) if pairs else 0.0), len(pairs)


def metrics_excerpt(url: str) -> list[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    wanted = ("grpc_server_handled_total{", "retrieval_index_items ", "retrieval_labelled_items ")
    return [line for line in text.splitlines() if line.startswith(wanted)]


def serve_and_use(args: argparse.Namespace, data: Dataset, encoder: Path, out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"labelled": data.labelled}
    store = out / "store"
    shutil.rmtree(store, ignore_errors=True)  # a new encoder needs a new store
    banner("3/8 start the server (retrieval-server serve)")
    server = ServerProcess(encoder, store, log_dir=out, timeout=READY_TIMEOUT_S)
    web: WebProcess | None = None
    print("$ " + " ".join(["retrieval-server", *serve_command(encoder, store)[3:]]) + f"  (log in {out})", flush=True)
    try:
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(str(exc)) from exc
        print(f"serving gRPC on {server.address}, metrics on {server.metrics_url} (pid {server.pid})")
        client_cmd = [tool("retrieval-client"), "--address", server.address]
        roots = [data.corpus.resolve(), *([data.queries.resolve()] if data.queries else [])]
        web = WebProcess("--address", server.address, *(x for root in roots for x in ("--image-root", root)))
        summary["web_url"] = web.url
        print(f"web page (search, label, review): {web.url}/")

        banner("4/8 index the corpus without labels (retrieval-client index)")
        run([*client_cmd, "index", data.corpus])
        run([*client_cmd, "info"])

        query = args.query or (image_files(data.queries)[0] if data.queries else image_files(data.corpus)[0])
        labels: dict[str, str] = {}
        if data.labelled:
            banner(f"5/8 label {args.shots} images per class (retrieval-client label)")
            labels = few_shot_ids(data.corpus, args.shots)
            label_few(client_cmd, server.address, labels)
        else:
            banner("5/8 no labels in this folder: skipping labelling")

        banner("6/8 search with a held-out image, writing a contact sheet (retrieval-client search --sheet)")
        sheet = out / "contact_sheet.png"
        sheet.unlink(missing_ok=True)
        run([*client_cmd, "search", query, "-k", args.k_search, "--sheet", sheet])
        summary.update(query=str(query), contact_sheet=str(sheet))

        if data.labelled and data.queries:
            banner("7/8 classify the held-out images (retrieval-client classify) and label the corpus")
            accuracy, n, chance = classify_accuracy(client_cmd, data.queries)
            print(
                f"\nfew-shot accuracy: {100 * accuracy:.1f}% on {n} held-out images with {args.shots} "
                f"labelled per class (chance {100 * chance:.1f}%)\n"
            )
            proposals = out / "proposals.csv"
            corpus_accuracy, m = label_corpus_accuracy(client_cmd, proposals, set(labels))
            print(
                f"\nlabel-corpus: {m} unlabelled items labelled by kNN, {100 * corpus_accuracy:.1f}% agree with "
                f"their folder names (proposals: {proposals})\n"
            )
            summary.update(
                accuracy=accuracy,
                queries=n,
                chance=chance,
                shots=args.shots,
                labelled_items=len(labels),
                corpus_accuracy=corpus_accuracy,
                proposals=str(proposals),
            )
        else:
            banner("7/8 no held-out labelled images: skipping classification")

        banner("8/8 metrics, then a clean shutdown (SIGTERM)")
        print(f"Prometheus metrics: {server.metrics_url}")
        for line in metrics_excerpt(server.metrics_url):
            print("  " + line)
        summary["metrics_url"] = server.metrics_url
        if args.keep_serving:
            print(
                f"\nthe server keeps running on {server.address}, the web page on {web.url}/; try\n"
                f"  RETRIEVAL_ADDRESS={server.address} retrieval-client search {query}\n"
                "Ctrl-C stops both.",
                flush=True,
            )
            wait_for_interrupt()
    finally:
        if web is not None:
            web.close()
        code = server.stop()
    print(f"server exited with status {code}")
    summary["server_exit_code"] = code
    if code != 0:
        raise DemoError(f"the server exited with status {code} after SIGTERM (log: {server.log_path})")
    return summary


def run_loop(args: argparse.Namespace, data: Dataset, out: Path) -> dict[str, Any]:
    """--loop, the users' loop: serve the committed encoder, label a few images per class, continue
    pretraining on the corpus, migrate the store to the new encoder while it is served, switch the
    running server to it, and classify the held-out images again with the same labels."""
    if not (data.labelled and data.queries):
        raise DemoError("--loop needs a labelled corpus: DIR/train/<class>/ and DIR/test/<class>/")
    if args.from_scratch:
        raise DemoError("--loop starts from the committed encoder (--init); leave out --from-scratch")
    store, new_store = out / "store-v1", out / "store-v2"
    for stale in (store, new_store, out / "store-v2.migrate"):
        shutil.rmtree(stale, ignore_errors=True)
    banner("loop 1/7 serve the committed encoder (moco-train export, retrieval-server serve)")
    first = out / "encoder-v1.pt"
    run([tool("moco-train"), "export", args.init, first])
    server = ServerProcess(first, store, log_dir=out, timeout=READY_TIMEOUT_S)
    try:
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(str(exc)) from exc
        print(f"serving gRPC on {server.address} (pid {server.pid})")
        client_cmd = [tool("retrieval-client"), "--address", server.address]
        banner(f"loop 2/7 index the corpus, label {args.shots} images per class, classify the held-out images")
        run([*client_cmd, "index", data.corpus])
        labels = few_shot_ids(data.corpus, args.shots)
        label_few(client_cmd, server.address, labels)
        before, n, chance = classify_accuracy(client_cmd, data.queries)
        print(f"\n{args.shots}-shot accuracy with the committed encoder: {100 * before:.1f}% on {n} held-out images\n")
        second = train_and_export(args, data, out, steps=("loop 3/7", "loop 4/7"))
        banner("loop 5/7 re-embed the store for the new encoder while it is served (retrieval-server migrate)")
        migrate = [tool("retrieval-server"), "migrate", "--store", store, "--to", new_store, "--model", second]
        run([*migrate, "--image-root", data.corpus, "--workers", args.workers])
        banner("loop 6/7 switch the running server to the new encoder and store (retrieval-client switch-model)")
        run([*client_cmd, "switch-model", "--model", second, "--store", new_store])
        banner("loop 7/7 classify the held-out images again: the same labels, none given again")
        after, _, _ = classify_accuracy(client_cmd, data.queries)
        run([*client_cmd, "labels", "export", "--out", out / "labels.csv"])
        with RetrievalClient(server.address) as client:
            kept = {s.id: s.label for s in client.get(sorted(labels))}
    finally:
        code = server.stop()
    if kept != labels:
        raise DemoError("the labels did not survive the model change")
    print(
        f"\n{args.shots}-shot accuracy on {n} held-out images (chance {100 * chance:.1f}%), the same {len(labels)} "
        f"labels: {100 * before:.1f}% with the committed encoder, {100 * after:.1f}% after continued pretraining "
        f"and the migration ({100 * (after - before):+.1f} points)\n"
    )
    if code != 0:
        raise DemoError(f"the server exited with status {code} after SIGTERM (log: {server.log_path})")
    return {
        "loop": True,
        "labelled": True,
        "shots": args.shots,
        "labelled_items": len(labels),
        "queries": n,
        "chance": chance,
        "accuracy_before": before,
        "accuracy_after": after,
        "labels_kept": len(kept),
        "encoder_before": str(first),
        "encoder_after": str(second),
        "store": str(new_store),
        "server_exit_code": code,
    }


def wait_for_interrupt() -> None:
    """Until Ctrl-C or SIGTERM (a `kill`, a service manager; a background job ignores SIGINT), so that
    the caller stops the server and the page either way."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        default=SAMPLE,
        help="DIR/train/<class>/ and DIR/test/<class>/ (labelled flow), or any image folder "
        "(default: the bundled sample)",
    )
    p.add_argument("--full-cifar", action="store_true", help=f"use the full CIFAR-10 set from {CIFAR_ARCHIVE}")
    p.add_argument("--out", type=Path, default=REPO / "demo-out", help="outputs (default demo-out/)")
    g = p.add_argument_group("training (the defaults take 3-7 minutes on 2 CPU cores for the sample)")
    g.add_argument(
        "--init",
        type=Path,
        default=PRETRAINED,
        help=f"the encoder to continue pretraining (default {PRETRAINED.relative_to(REPO)})",
    )
    g.add_argument("--from-scratch", action="store_true", help="train from random weights instead of --init")
    g.add_argument("--epochs", type=int, default=1, help="default 1 (25 steps of 64 on the sample)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    g.add_argument("--train-limit", type=int, default=None, help="train on at most this many images")
    g.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="index (and train on) only the first N training images of each class",
    )
    g.add_argument(
        "--queries-per-class", type=int, default=None, help="classify only the first N held-out images of each class"
    )
    g.add_argument("-a", "--arch", default="resnet18")
    g.add_argument("-b", "--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=None, help="default 0.01 with --init, 0.06 from scratch")
    g.add_argument("--moco-k", type=int, default=None, help="queue size (trainer default if unset)")
    g.add_argument("-j", "--workers", type=int, default=1, help="data-loading processes")
    u = p.add_argument_group("using the server")
    u.add_argument("--shots", type=int, default=5, help="labelled images per class (default 5)")
    u.add_argument("--query", type=Path, default=None, help="search image (default: the first held-out image)")
    u.add_argument("--k-search", type=int, default=15, help="neighbours on the contact sheet (default 15)")
    u.add_argument("--keep-serving", action="store_true", help="leave the server up until Ctrl-C at the end")
    u.add_argument(
        "--loop",
        action="store_true",
        help="the users' loop instead: serve the committed encoder, label, continue pretraining, migrate the "
        "store to the new encoder, switch the server to it, and compare the few-shot accuracy before and after",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        data = prepare_data(args, out)
        print(
            f"corpus {data.corpus} ({len(image_files(data.corpus))} images"
            + (f", {len(class_folders(data.corpus))} classes)" if data.labelled else ")")
            + (f", held-out {data.queries} ({len(image_files(data.queries))} images)" if data.queries else "")
        )
        if args.loop:
            summary = run_loop(args, data, out)
            encoder = out / "encoder.pt"
        else:
            encoder = train_and_export(args, data, out)
            summary = serve_and_use(args, data, encoder, out)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    summary.update(
        encoder=str(encoder),
        built_on=None if args.from_scratch else str(args.init),
        seconds=round(time.monotonic() - started, 1),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndone in {summary['seconds']:.0f} s; outputs in {out} (summary.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
