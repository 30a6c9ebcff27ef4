"""`moco-train lincls`: the fast mode against a logistic regression fitted by hand on features computed
by hand, its C search and feature cache; the official SGD protocol resuming exactly; an official MoCo
checkpoint evaluated like the export it came from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from moco_retrieval.export import export_model
from moco_retrieval.images import decode_image, image_files
from moco_retrieval.preprocessing import eval_transform
from moco_train.checkpoint import load_file, to_export
from moco_train.lincls import C_GRID, SgdOptions, sgd_lincls
from scripts.demo import PRETRAINED
from tests import REPO

CLASSES = ("airplane", "cat", "ship")


def moco_train(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "moco_train", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def folders(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """3 classes: 10 training and 5 held-out images each (links into the demo sample)."""
    root = tmp_path_factory.mktemp("labelled")
    for split, count in (("train", 10), ("test", 5)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for image in image_files(demo_data / split / name)[:count]:
                (root / split / name / image.name).symlink_to(image)
    return root / "train", root / "test"


def by_hand(folder: Path) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """The committed encoder's pooled features of each image, one batch, in class then file order."""
    model, meta = export_model(to_export(load_file(PRETRAINED), str(PRETRAINED)))
    paths = [p for name in CLASSES for p in image_files(folder / name)]
    batch = torch.stack([eval_transform(meta.preprocessing)(decode_image(p)) for p in paths])
    with torch.no_grad():
        features = model(batch).double().numpy()
    labels = np.array([CLASSES.index(p.parent.name) for p in paths])
    return features, labels, paths


def test_fast_mode_equals_a_logistic_regression_fitted_by_hand(folders, tmp_path):
    train, val = folders
    proc = moco_train(
        "lincls", "--fast", "--C", 0.5, "--train", train, "--val", val, "--checkpoint", PRETRAINED, "--out", tmp_path
    )
    report = json.loads((tmp_path / "lincls.json").read_text())
    x, y, _ = by_hand(train)
    x_val, y_val, val_paths = by_hand(val)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    classifier = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit((x - mean) / std, y)
    predicted = classifier.predict((x_val - mean) / std)
    assert report["mode"] == "fast" and report["C"] == 0.5 and report["C_given"] is True
    assert report["val_paths"] == [str(p) for p in val_paths]
    assert report["predictions"] == [CLASSES[i] for i in predicted]
    assert report["top1"] == pytest.approx(100.0 * (predicted == y_val).mean())
    assert report["top5"] == 100.0  # 3 classes
    assert (report["train_images"], report["val_images"], report["classes"]) == (30, 15, list(CLASSES))
    assert f"linear (logistic regression, C 0.5): top-1 {report['top1']:.2f}%" in proc.stdout


def test_fast_mode_searches_c_on_held_out_training_images_and_caches_features(folders, tmp_path):
    train, val = folders
    moco_train("lincls", "--fast", "--train", train, "--val", val, "--checkpoint", PRETRAINED, "--out", tmp_path)
    report = json.loads((tmp_path / "lincls.json").read_text())
    scores = report["C_search"]
    assert list(scores) == [f"{c:g}" for c in C_GRID] and report["C"] in C_GRID
    assert scores[f"{report['C']:g}"] == max(scores.values())
    cached = {name: (tmp_path / name).stat().st_mtime_ns for name in ("train_features.pt", "val_features.pt")}
    moco_train("lincls", "--fast", "--train", train, "--val", val, "--checkpoint", PRETRAINED, "--out", tmp_path)
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in cached} == cached  # read, not recomputed
    assert json.loads((tmp_path / "lincls.json").read_text())["top1"] == report["top1"]


def test_an_official_moco_checkpoint_is_evaluated_like_its_export(folders, tmp_path):
    train, val = folders
    official = tmp_path / "official.pth.tar"
    moco_train("export", PRETRAINED, official, "--format", "official")
    reports = []
    for name, checkpoint in (("export", PRETRAINED), ("official", official)):
        out = tmp_path / name
        args = ("--train", train, "--val", val, "--checkpoint", checkpoint, "--out", out)
        moco_train("lincls", "--fast", "--C", 1, *args)
        reports.append(json.loads((out / "lincls.json").read_text()))
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    assert reports[0]["predictions"] == reports[1]["predictions"]


def test_the_official_protocol_resumes_exactly(folders, tmp_path):
    """2 epochs straight against 1 epoch then the same command for 2: the same classifier, loss
    history and accuracy (the step schedule depends on the epoch alone)."""
    train, val = folders
    model, meta = export_model(to_export(load_file(PRETRAINED), str(PRETRAINED)))
    options = dict(lr=1.0, batch_size=8, schedule=(1,))
    straight = sgd_lincls(
        model, meta, str(PRETRAINED), str(train), str(val), tmp_path / "a", SgdOptions(epochs=2, **options), 0, False
    )
    sgd_lincls(
        model, meta, str(PRETRAINED), str(train), str(val), tmp_path / "b", SgdOptions(epochs=1, **options), 0, False
    )
    resumed = sgd_lincls(
        model, meta, str(PRETRAINED), str(train), str(val), tmp_path / "b", SgdOptions(epochs=2, **options), 0, False
    )
    a, b = (torch.load(tmp_path / d / "lincls_checkpoint.pt", weights_only=False) for d in "ab")
    for name, value in a["fc"].items():
        assert torch.equal(value, b["fc"][name]), name
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]
    assert (straight["top1"], straight["predictions"]) == (resumed["top1"], resumed["predictions"])
    assert straight["mode"] == "sgd" and straight["lr"] == 1.0 and len(straight["history"]) == 2
    assert not any(p.requires_grad for p in model.parameters())  # the backbone stayed frozen
