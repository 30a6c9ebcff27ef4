"""`moco-train train | knn | export` end to end in child processes on real CIFAR-10 images."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from moco_retrieval.devices import cpu_supports_fp16_autocast
from moco_train.config import COMPILE_MIN_STEPS
from moco_train.curves import plot_run, read_log
from moco_train.trainer import resolve_compile
from tests import REPO

# 3 steps of MoCo v2 at batch 32 (τ 0.2: at the small-image default of 0.1 the first losses are tiny,
# and the compiled-vs-eager comparison below is relative).
TINY_V2 = ["--max-steps", 3, "-b", 32, "--moco-k", 128, "-j", 0, "--v2", "--moco-t", 0.2, "--seed", 1]


def moco_train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "moco_train", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def subset(src: Path, dest: Path, per_class: int) -> Path:
    for class_dir in sorted(src.iterdir()):
        (dest / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            (dest / class_dir.name / f.name).symlink_to(f)
    return dest


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], proc.stderr


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """3 steps of MoCo v2 on 320 demo images given as a list file."""
    tmp = tmp_path_factory.mktemp("cli")
    images = [p for c in sorted((demo_data / "train").iterdir()) for p in sorted(c.iterdir())[:32]]
    listing = tmp / "images.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    run_dir = tmp / "run"
    proc = moco_train(
        "train",
        listing,
        "--run-dir",
        run_dir,
        *TINY_V2,
    )
    return tmp, run_dir, proc


def test_train_logs_progress_and_checkpoints(trained):
    _, run_dir, proc = trained
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 3 and summary["skipped_files"] == 0
    assert "img_s=" in proc.stderr and "loss=" in proc.stderr  # the progress bar
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    start = records[0]
    assert (start["event"], start["images"], start["moco_k"], start["cifar_stem"], start["input_size"]) == (
        "start",
        320,
        128,
        True,
        32,
    )
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 3 and {"loss", "acc", "lr", "img_per_s"} <= steps[0].keys()
    assert [r for r in records if r["event"] == "epoch"]
    assert (run_dir / "checkpoint_00000003.pt").is_file()


def test_curves_are_drawn_each_epoch_and_on_demand(trained, tmp_path):
    _, run_dir, _ = trained
    with Image.open(run_dir / "curves.png") as img:  # the trainer drew it after the epoch
        assert img.format == "PNG" and img.width > 800
    proc = moco_train("plot", run_dir, "--out", tmp_path / "again.png")
    assert str(tmp_path / "again.png") in proc.stdout
    with Image.open(tmp_path / "again.png") as img:
        assert img.format == "PNG"
    (tmp_path / "nolog").mkdir()
    assert_one_line_error(moco_train("plot", tmp_path / "nolog", check=False), "no log.jsonl")


def test_plot_keeps_one_record_per_step_and_draws_the_knn_panel(tmp_path):
    """After a resume the re-trained steps replace the interrupted session's; a kNN panel appears
    when the monitor logged results; a cut-off last line (a crash mid-write) is skipped."""
    records = [{"event": "start"}] + [
        {"event": "step", "step": s, "loss": 9.0, "acc": 1.0, "lr": 0.1} for s in (1, 2, 3)
    ]
    records += [{"event": "resume"}] + [
        {"event": "step", "step": s, "loss": 5.0, "acc": 2.0, "lr": 0.1} for s in (3, 4)
    ]
    records += [{"event": "epoch", "step": 4, "knn_top1": 30.0}]
    (tmp_path / "log.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"event": "st')
    steps, knn = read_log(tmp_path)
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 9.0), (2, 9.0), (3, 5.0), (4, 5.0)]
    assert [r["knn_top1"] for r in knn] == [30.0]
    with Image.open(plot_run(tmp_path)) as img:
        wide = img.width
    (tmp_path / "log.jsonl").write_text("\n".join(map(json.dumps, records[:-1])))
    with Image.open(plot_run(tmp_path)) as img:
        assert img.width < wide  # one panel fewer without kNN results


def test_knn_and_export_agree(trained, demo_data):
    tmp, run_dir, _ = trained
    bank = subset(demo_data / "train", tmp / "bank", 20)
    queries = subset(demo_data / "test", tmp / "queries", 10)
    ckpt = run_dir / "checkpoint_00000003.pt"

    def knn(checkpoint: Path, predictions: Path) -> dict:
        flags = ["--bank", bank, "--queries", queries, "--checkpoint", checkpoint, "-k", 20, "-j", 0]
        return json.loads(moco_train("knn", *flags, "--json", "--predictions", predictions).stdout)

    result = knn(ckpt, tmp / "ckpt.csv")
    assert (result["bank_images"], result["query_images"]) == (200, 100)
    assert 0 <= result["top1"] <= result["top5"] <= 100

    exported = moco_train("export", ckpt, tmp / "encoder.pt")
    assert "resnet18" in exported.stdout and "sha256:" in exported.stdout
    assert knn(tmp / "encoder.pt", tmp / "export.csv") == result
    rows = list(csv.reader((tmp / "ckpt.csv").open()))
    assert rows[0] == ["path", "true_class", "predicted_class"] and len(rows) == 101
    assert rows[1][1] == "airplane" and rows[-1][1] == "truck"
    assert (tmp / "ckpt.csv").read_text() == (tmp / "export.csv").read_text()


def test_user_errors_are_one_line(tmp_path, trained):
    _, run_dir, _ = trained
    assert_one_line_error(
        moco_train("train", tmp_path / "nope", "--run-dir", tmp_path / "r", check=False), "no such folder or file"
    )
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        moco_train("train", tmp_path / "empty", "--run-dir", tmp_path / "r", check=False), "no image files found"
    )
    assert_one_line_error(
        moco_train(
            "knn",
            "--bank",
            tmp_path / "nope",
            "--queries",
            tmp_path / "nope",
            "--checkpoint",
            run_dir / "checkpoint_00000003.pt",
            check=False,
        ),
        "no such folder",
    )
    (tmp_path / "junk.pt").write_text("junk")
    assert_one_line_error(
        moco_train("export", tmp_path / "junk.pt", tmp_path / "out.pt", check=False), "not a readable checkpoint"
    )
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("amp", ["off", "bf16", *(["fp16"] if cpu_supports_fp16_autocast() else [])])
def test_a_diverging_run_stops_before_its_first_non_finite_update(trained, tmp_path, amp):
    """--lr 1e30: the first applied step makes the weights huge but finite, the next forward
    overflows. The run stops there with one line, before that step's update, and every checkpoint
    before it is finite. In float32 and bf16 that is step 2; under fp16 GradScaler first skips the
    steps whose gradients overflow its initial scale (not applied), and a skipped step would not have
    undone the NaN keys the overflowing forward put in the queue: the loss stops it."""
    tmp, _, _ = trained
    run_dir = tmp_path / "run"
    proc = moco_train(
        "train", tmp / "images.txt", "--run-dir", run_dir, "--crop-size", 8, "-b", 16, "--moco-k", 32, "-j", 0,
        "--lr", 1e30, "--max-steps", 40, "--save-every-steps", 1, "--keep", 0, "--amp", amp, "--no-progress",
        check=False,
    )  # fmt: skip
    error = proc.stderr.strip().splitlines()[-1]
    precision = {"off": "float32", "bf16": "bf16", "fp16": "fp16"}[amp]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert error.startswith("moco-train train: error: step ") and f"(moco v1/v2 in {precision})" in error
    assert "the loss (nan) or its gradients are not finite" in error and "stopped before updating the weights" in error
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    [stop] = [r["step"] for r in records if r["event"] == "diverged"]
    assert f"error: step {stop}: " in error and (stop == 2 or amp == "fp16")
    saved = sorted(run_dir.glob("checkpoint_*.pt"))
    assert [p.name for p in saved] == [f"checkpoint_{step:08d}.pt" for step in range(1, stop)]
    for path in saved:
        state = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path


def test_compiled_encoders_train_like_eager_ones(trained):
    """--compile on: the encoders run through inductor, and the run is the same training as the
    eager `trained` run: step 1's loss agrees (inductor fuses and reorders float sums, so not to the
    bit), the checkpoint has the same keys and shapes, and it exports."""
    tmp, eager_dir, _ = trained
    run_dir = tmp / "compiled"
    moco_train(
        "train",
        tmp / "images.txt",
        "--run-dir",
        run_dir,
        *TINY_V2,
        "--compile",
        "on",
        "--no-progress",
    )
    logs = {
        name: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        for name, d in (("eager", eager_dir), ("compiled", run_dir))
    }
    assert logs["compiled"][0]["compiled"] is True and logs["eager"][0]["compiled"] is False  # 3 steps < auto's minimum
    losses = {name: [r["loss"] for r in records if r["event"] == "step"] for name, records in logs.items()}
    assert losses["compiled"][0] == pytest.approx(losses["eager"][0], rel=1e-3)
    assert len(losses["compiled"]) == 3 and all(math.isfinite(x) for x in losses["compiled"])
    eager = torch.load(eager_dir / "checkpoint_00000003.pt", weights_only=False)["model"]
    compiled = torch.load(run_dir / "checkpoint_00000003.pt", weights_only=False)["model"]
    assert {k: v.shape for k, v in compiled.items()} == {k: v.shape for k, v in eager.items()}
    moco_train("export", run_dir / "checkpoint_00000003.pt", tmp / "compiled.pt")


def test_compile_auto_waits_for_long_runs(monkeypatch):
    assert not resolve_compile("auto", COMPILE_MIN_STEPS - 1)
    assert resolve_compile("auto", COMPILE_MIN_STEPS)  # this machine has a C compiler (inductor needs one)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CC", "cc")
    assert not resolve_compile("auto", COMPILE_MIN_STEPS)
    assert resolve_compile("on", 1) and not resolve_compile("off", 10**6)
