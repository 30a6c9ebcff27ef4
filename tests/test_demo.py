"""`make demo` on a reduced budget: the whole flow through the real CLIs (continued pretraining of the
committed encoder or training from scratch, export, serve, index, label, search, classify,
label-corpus, SIGTERM), checked by its outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.demo import PRETRAINED
from tests import REPO

pytestmark = pytest.mark.slow

BUDGET = ["--epochs", "1", "--max-steps", "2", "--train-limit", "64", "--batch-size", "32"]


def demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the machine is shared
    return subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--out", str(out), *BUDGET, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def run_demo(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = demo(out, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((out / "summary.json").read_text())


def assert_contact_sheet(path: Path) -> None:
    with Image.open(path) as sheet:
        sheet.verify()
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.width >= 4 * 32 and sheet.height >= 32


def test_demo_on_the_sample(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result, summary = run_demo(out, "--data", str(demo_data), "--per-class", "20", "--queries-per-class", "20")
    assert summary["labelled"] is True
    assert summary["built_on"] == str(PRETRAINED)  # the default: continued pretraining of pretrained/
    assert f"building on pretrained/{PRETRAINED.name}: MoCo v2" in result.stdout
    assert "moco-train train" in result.stdout and f"--init {PRETRAINED}" in result.stdout
    assert summary["queries"] == 200 and summary["labelled_items"] == 50
    assert summary["chance"] == 0.1
    assert summary["accuracy"] > summary["chance"], summary
    assert f"few-shot accuracy: {100 * summary['accuracy']:.1f}%" in result.stdout
    assert_contact_sheet(Path(summary["contact_sheet"]))
    proposals = (out / "proposals.csv").read_text().splitlines()
    assert proposals[0] == "id,label,confidence" and len(proposals) == 1 + 200 - 50
    assert summary["metrics_url"] in result.stdout
    assert f"web page (search, label, review): {summary['web_url']}/" in result.stdout
    assert summary["server_exit_code"] == 0
    assert "server exited with status 0" in result.stdout


def test_demo_on_a_folder_without_labels(demo_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for cls in sorted((demo_data / "train").iterdir())[:4]:
        for image in sorted(cls.glob("*.jpg"))[:6]:
            (folder / "nested").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, folder / "nested" / f"{cls.name}-{image.name}")
    result, summary = run_demo(tmp_path / "out", "--data", str(folder), "--from-scratch")
    assert summary["labelled"] is False and "accuracy" not in summary
    assert summary["built_on"] is None and "--init" not in result.stdout
    assert "running without labels" in result.stdout
    assert_contact_sheet(Path(summary["contact_sheet"]))
    assert summary["server_exit_code"] == 0


def photo_folder(root: Path) -> Path:
    """A labelled folder of generated photos (200 x 150 JPEGs, 3 classes of 12 training and 4 held-out
    images): each class a colour and a stripe direction, with noise."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (50, 60, 200)}
    for c, (name, colour) in enumerate(colours.items()):
        for split, count in (("train", 12), ("test", 4)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                y, x = np.mgrid[0:150, 0:200]
                stripes = (np.sin((x if c != 1 else y) / (6 + c * 3)) > 0)[..., None]
                pixels = np.where(stripes, colour, (235, 235, 235)) + rng.normal(0, 25, (150, 200, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.jpg")
    return root


def test_demo_on_a_folder_of_photos_builds_on_the_committed_encoder_at_its_size(tmp_path: Path) -> None:
    """The README's `--data DIR` on photo-sized images: the committed encoder is a 32 px CIFAR-stem
    ResNet-18, so the run trains (and the export serves) at 32 px, and says so in one line."""
    photos = photo_folder(tmp_path / "photos")
    out = tmp_path / "out"
    result, summary = run_demo(out, "--data", str(photos))
    notices = [line for line in result.stderr.splitlines() if "--init" in line]
    assert notices == [
        f"warning: --init {PRETRAINED} has the CIFAR stem (3x3 conv, no max-pool) and was trained at 32 px: "
        "training at --crop-size 32 (--crop-size and --cifar-stem choose otherwise)"
    ]
    assert summary["labelled"] is True and summary["built_on"] == str(PRETRAINED)
    assert summary["queries"] == 12 and summary["labelled_items"] == 15 and summary["server_exit_code"] == 0
    assert summary["accuracy"] > summary["chance"], summary
    start = json.loads((out / "run" / "log.jsonl").read_text().splitlines()[0])
    assert (start["input_size"], start["cifar_stem"]) == (32, True)


def test_a_missing_init_encoder_is_a_one_line_error(demo_data: Path, tmp_path: Path) -> None:
    result = demo(tmp_path / "out", "--data", str(demo_data), "--init", str(tmp_path / "nothing.pt"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"demo: error: {tmp_path / 'nothing.pt'}: no pretrained encoder there (--from-scratch trains without one)"
    ]


def test_demo_loop_keeps_the_labels_across_the_model_change(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result, summary = run_demo(out, "--loop", "--data", str(demo_data), "--per-class", "8", "--queries-per-class", "8")
    assert summary["loop"] is True and summary["labelled_items"] == summary["labels_kept"] == 50
    assert summary["queries"] == 80 and summary["server_exit_code"] == 0
    before, after = 100 * summary["accuracy_before"], 100 * summary["accuracy_after"]
    assert f"5-shot accuracy with the committed encoder: {before:.1f}% on 80 held-out images" in result.stdout
    assert f"{before:.1f}% with the committed encoder, {after:.1f}% after continued pretraining" in result.stdout
    for step in ("moco-train export", "retrieval-server migrate", "retrieval-client --address", "switch-model"):
        assert step in result.stdout
    assert "writes to the source carried by the catch-up passes: 0" in result.stdout
    assert summary["encoder_after"] != summary["encoder_before"]
    labels = (out / "labels.csv").read_text().splitlines()
    assert labels[0] == "id,label,source,predicted_label,confidence" and len(labels) == 1 + 50
