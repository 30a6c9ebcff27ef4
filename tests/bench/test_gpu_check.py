"""bench/gpu_check.py's dry run: the GPU check's whole code path on the CPU with tiny sizes, as a
real child process, so that the first lent GPU machine does not discover a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from moco_retrieval.export import load_export
from tests import REPO
from tests.images import noise_images

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402 - bench/ is scripts, not a package

CLASSES = ("a", "b", "c")
PARTS = ("cuda_tests", "throughput", "ddp", "cifar_recipe")


def tiny_cifar(directory: Path) -> Path:
    """A CIFAR-10-shaped archive (train/<class>/, test/<class>/) of 8 px noise images, small
    enough for the dry run's training steps to take a second each on two cores."""
    root = directory / "tiny_cifar"
    for split, count in (("train", 16), ("test", 8)):
        for n, name in enumerate(CLASSES):
            noise_images(root / split / name, count, size=(8, 8), seed=10 * n + len(split), suffix=".jpg")
    archive = directory / "tiny_cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    return archive


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", str(out), "--dry-run", "--cifar", str(tiny_cifar(tmp_path))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and list(report["parts"]) == list(PARTS)
    failed = {name: part["error"] for name, part in report["parts"].items() if not part["passed"]}
    assert not failed, failed
    assert report["passed"]

    # (a) every CUDA test was collected and skipped with its reason (no GPU here)
    tests = report["parts"]["cuda_tests"]["tests"]
    assert len(tests) >= 9 and (out / "cuda_tests.xml").exists()
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests.values())

    # (b) both models beside their bare backbone, at a candidate batch; (d)'s data path's rate
    models = report["parts"]["throughput"]["models"]
    for name, batches in (("resnet18_v2", (16, 8)), ("vit_tiny_32_v3", (8, 4))):
        m = models[name]
        assert m["batch"] == batches[0] and m["moco_img_per_s"] > 0 and m["bare_img_per_s"] > 0
        assert m["moco_over_bare"] == pytest.approx(m["moco_img_per_s"] / m["bare_img_per_s"], rel=1e-2)
    assert models["vit_tiny_32_v3"]["input_size"] == 32 and models["resnet18_v2"]["input_size"] == 8
    assert models["recipe_data"]["img_per_s"] > 0

    # (c) a torchrun worker in a gloo group: the trainer wrapped DDP and ran its steps
    ddp = report["parts"]["ddp"]
    assert (ddp["backend"], ddp["ddp"], ddp["world_size"]) == ("gloo", True, 1)
    assert ddp["log_start_record"]["world_size"] == 1

    # (d) planned epochs done with a finished cosine, kNN on the whole tiny bank, the export back
    recipe = report["parts"]["cifar_recipe"]
    assert recipe["cosine_completed"] and recipe["epochs_done"] == recipe["epochs_planned"] >= 1
    assert (recipe["knn_bank"], recipe["knn_queries"]) == (16 * len(CLASSES), 8 * len(CLASSES))
    assert 0 <= recipe["knn_top1"] <= 100 and recipe["committed_knn_top1"] == 52.97
    assert recipe["comparable_to_committed"] is False and recipe["beats_committed"] is False
    joined = tmp_path / "encoder.pt"
    joined.write_bytes(b"".join((out / part).read_bytes() for part in recipe["encoder"]["parts"]))
    assert len(recipe["encoder"]["parts"]) == 2  # a ResNet-18 in fp16 is over the 15 MiB per returned file
    model, meta = load_export(joined, "cpu")
    assert meta.fingerprint == recipe["fingerprint"] and meta.arch == "resnet18"
    assert next(model.parameters()).dtype == torch.float32
    assert (out / "cifar_log.jsonl").exists() and (out / "gpu_check.log").stat().st_size > 0
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8  # what the device tool returns


def test_epochs_fit_the_budget_after_start_up_and_per_epoch_overhead() -> None:
    # 50k images at 25k img/s: 2 s + 2 s overhead per epoch; 200 s - 40 s start-up -> 40 epochs
    assert gpu_check.epochs_for(200, 25_000, 50_000, 40, 2, 500) == 40
    assert gpu_check.epochs_for(200, 25_000, 50_000, 40, 2, 30) == 30  # capped
    assert gpu_check.epochs_for(30, 25_000, 50_000, 40, 2, 500) == 1  # no time: still one epoch
    assert gpu_check.epochs_for(200, 0.0, 50_000, 40, 2, 500) == 1  # throughput unmeasured


def test_files_over_the_return_limit_come_back_in_parts(tmp_path: Path) -> None:
    big, small = tmp_path / "big.pt", tmp_path / "small.pt"
    big.write_bytes(bytes(range(256)) * 100)  # 25,600 bytes
    small.write_bytes(b"x" * 10)
    out = tmp_path / "out"
    out.mkdir()
    parts = gpu_check.split_for_return(big, out, part_bytes=10_000)
    assert parts["parts"] == ["big.pt.part-00", "big.pt.part-01", "big.pt.part-02"]
    assert b"".join((out / p).read_bytes() for p in parts["parts"]) == big.read_bytes()
    assert all((out / p).stat().st_size <= 10_000 for p in parts["parts"])
    assert gpu_check.split_for_return(small, out, part_bytes=10_000)["parts"] == ["small.pt"]
