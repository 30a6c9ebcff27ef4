"""CIFAR-10 for the training benchmarks: the shared archive unpacked once (or a small subset of it for
a smoke run), `moco-train train` runs and their speed probes, and kNN evaluation of encoders on it
(InstDisc vote of moco_retrieval.knn, k=200, several temperatures), cached per encoder."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from moco_retrieval.architectures import build_backbone
from moco_retrieval.export import embed, export_model
from moco_retrieval.fileio import atomic_write
from moco_retrieval.images import decode_image
from moco_retrieval.knn import knn_classify, topk_accuracy
from moco_retrieval.preprocessing import Preprocessing, eval_transform
from moco_train.checkpoint import load_checkpoint, to_export
from moco_train.cli import main as moco_train

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
PRETRAINED = REPO / "pretrained" / "moco_v2_resnet18_cifar10.pt"
KNN_K = 200
KNN_TAUS = (0.05, 0.07, 0.1, 0.2)


def ensure_cifar(root: Path) -> Path:
    """/tmp/cifar10/{train,test}/<class>/*.jpg, unpacked from the shared archive if missing."""
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(root, filter="data")
    return root


def pretrained_export(out: Path) -> Path:
    """The committed pretrained encoder (official MoCo layout) as an export that the server loads."""
    if moco_train(["export", str(PRETRAINED), str(out)]) != 0:
        raise SystemExit(f"exporting {PRETRAINED} failed")
    return out


def class_subset(root: Path, per_class: int, out: Path) -> Path:
    """A labelled folder of the first `per_class` images (sorted names) of each class, as symlinks."""
    if per_class >= min(len(list(d.iterdir())) for d in root.iterdir() if d.is_dir()):
        return root
    shutil.rmtree(out, ignore_errors=True)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            (out / class_dir.name / f.name).symlink_to(f)
    return out


def cifar_subset(cifar: Path, train_per_class: int, test_per_class: int, out: Path) -> Path:
    """out/{train,test}: the first images of each class of both splits (symlinks), a CIFAR-10 folder
    for smoke runs of the benchmarks."""
    class_subset(cifar / "train", train_per_class, out / "train")
    class_subset(cifar / "test", test_per_class, out / "test")
    return out


def eval_data(cifar: Path, cache: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images, labels), "test": ...}: the kNN bank and queries."""
    return {split: eval_images(cifar, split, cache) for split in ("train", "test")}


def eval_images(cifar: Path, split: str, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) float32 images preprocessed as every export of a 32 px model preprocesses
    them (the shared eval transform), and (N,) labels; decoded once and cached."""
    path = cache / f"{split}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=True)
        return blob["images"], blob["labels"]
    transform = eval_transform(Preprocessing.for_input_size(32))
    classes = sorted(d.name for d in (cifar / split).iterdir() if d.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((cifar / split / name).iterdir()):
            images.append(transform(decode_image(f)))
            labels.append(label)
    blob = {"images": torch.stack(images), "labels": torch.tensor(labels)}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return blob["images"], blob["labels"]


@torch.inference_mode()
def features(model: nn.Module, images: torch.Tensor, bf16: bool, batch: int = 500) -> torch.Tensor:
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with amp:
        return torch.cat([embed(model, images[i : i + batch]) for i in range(0, len(images), batch)])


def knn_scores(model: nn.Module, data: dict, bf16: bool) -> dict:
    """kNN top-1/top-5 for each vote temperature, test images against the training bank."""
    start = time.perf_counter()
    bank = features(model, data["train"][0], bf16)
    queries = features(model, data["test"][0], bf16)
    result = {"embed_seconds": round(time.perf_counter() - start, 1), "precision": "bf16" if bf16 else "fp32"}
    for tau in KNN_TAUS:
        scores = knn_classify(queries, bank, data["train"][1], 10, k=KNN_K, tau=tau, chunk_size=1000)
        acc = topk_accuracy(scores, data["test"][1])
        result[f"tau_{tau}"] = {"top1": round(acc["top1"], 2), "top5": round(acc["top5"], 2)}
    return result


def cached(path: Path, compute: Callable[..., dict], *args: object) -> dict:
    """compute(*args)'s JSON, computed once: read back from `path` when it exists."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(value).encode()))  # no half-written cache if killed
    print(f"{path.name}: {json.dumps(value)}", flush=True)
    return value


def checkpoint_scores(path: Path, data: dict, bf16: bool) -> dict:
    """knn_scores of a moco-train checkpoint's f_q backbone, through the export code that serving uses."""
    model, _ = export_model(to_export(load_checkpoint(path), str(path)))
    return knn_scores(model, data, bf16)


def state_scores(path: Path, data: dict, bf16: bool) -> dict:
    """knn_scores of a saved ResNet-18 (CIFAR stem) backbone state dict, e.g. one a peer library trained."""
    model = build_backbone("resnet18", cifar_stem=True)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return knn_scores(model.eval(), data, bf16)


def raw_pixel_scores(data: dict) -> dict:
    """kNN on the L2-normalised preprocessed pixels (3,072-d)."""
    flat = {split: nn.functional.normalize(data[split][0].flatten(1), dim=1) for split in ("train", "test")}
    result = {"precision": "fp32"}
    for tau in KNN_TAUS:
        scores = knn_classify(flat["test"], flat["train"], data["train"][1], 10, k=KNN_K, tau=tau, chunk_size=1000)
        acc = topk_accuracy(scores, data["test"][1])
        result[f"tau_{tau}"] = {"top1": round(acc["top1"], 2), "top5": round(acc["top5"], 2)}
    return result


def train_timeline(run_dir: Path) -> dict[int, float]:
    """Training seconds at each step of a moco-train run's log.jsonl, summed over its sessions (start
    or resume), so time stopped between sessions does not count. A session that resumes at step n
    adds its time to the previous sessions' time at step n - 1: the steps an interrupted session ran
    after its last checkpoint are redone, and their first, lost run does not count either."""
    elapsed: dict[int, float] = {}
    session_start, offset = None, None
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] == "start":
            session_start, offset = r["time"], None
        elif r["event"] == "step" and session_start is not None:
            if offset is None:  # this session's first step
                offset = elapsed.get(r["step"] - 1, 0.0)
                elapsed = {step: t for step, t in elapsed.items() if step < r["step"]}
            elapsed[r["step"]] = offset + r["time"] - session_start
    return elapsed


def train_run(data: Path, run_dir: Path, steps: int, flags: list[str]) -> None:
    """`moco-train train DATA --run-dir RUN_DIR --max-steps STEPS FLAGS...` in a child process."""
    cmd = [sys.executable, "-m", "moco_train", "train", str(data), "--run-dir", str(run_dir), "--max-steps", str(steps)]
    print("$ " + " ".join(cmd[3:] + flags), flush=True)
    subprocess.run(cmd + flags, cwd=REPO, check=True)


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]


def probe_rate(data: Path, run_dir: Path, cache: Path, batch: int, flags: list[str], steps: int = 12) -> float:
    """Images/s of a run, from a short probe of `steps` steps (timed from step 5 on, after warm-up of
    the caches), cached in `cache`."""

    def measure() -> dict:
        train_run(data, run_dir, steps, [*flags, "--save-every-steps", "0", "--keep", "1"])
        times = [r["time"] for r in step_records(run_dir)]
        for checkpoint in run_dir.glob("checkpoint_*.pt"):  # only the log is needed
            checkpoint.unlink()
        return {"img_per_s": batch * (len(times) - 5) / (times[-1] - times[4])}

    return cached(cache, measure)["img_per_s"]


def cifar_parser(doc: str, work: str) -> argparse.ArgumentParser:
    """A benchmark's parser with the data (--cifar) and cache (--work, ~/.cache/moco-retrieval/WORK) options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cifar", type=Path, default=Path("/tmp/cifar10"), help="where CIFAR-10 is (unpacked if missing)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "moco-retrieval" / work,
        help="runs, checkpoints and cached evaluations (resumed when the script runs again)",
    )
    return parser


def write_report(report: dict, out: Path, plot: Callable[[dict, Path], None]) -> None:
    """A benchmark's JSON at `out` and its plot beside it (`out` with .png), each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    plot(report, out.with_suffix(".png"))


def log_ticks(values: list[int], within: float = 1.05) -> tuple[list[int], list[str]]:
    """Ticks and labels for a log axis with a tick per value, except that values within a factor
    `within` of the one before share its tick, labelled with both: on a log axis their labels overlap."""
    ticks: list[int] = []
    labels: list[str] = []
    for value in sorted(set(values)):
        if ticks and value < ticks[-1] * within:
            labels[-1] += f"/{value}"
        else:
            ticks.append(value)
            labels.append(str(value))
    return ticks, labels


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
