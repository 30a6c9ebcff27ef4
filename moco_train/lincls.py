"""Linear classification on frozen features: the protocol every paper of the field reports
(facebookresearch/moco's main_lincls.py), and a fast variant for the CPU.

    sgd (the official protocol):
        f frozen, in eval mode (its BatchNorm statistics fixed), its pooled features (not normalised)
        fc = Linear(feature_dim, classes), weight ~ N(0, 0.01), bias 0
        SGD lr 30, momentum 0.9, no weight decay, batch 256, 100 epochs, lr x0.1 at epochs 60 and 80
        train: RandomResizedCrop(input size) + horizontal flip; val: the export's resize + centre crop
    fast (DINOv2's log_regression route, scikit-learn's solver):
        the val-preprocessed features of every image computed once and cached in --out
        standardised on the training images, then a multinomial logistic regression (L-BFGS)
        its inverse regularisation C chosen on a stratified fifth of the training images, then refit
        on all of them (or --C)

Both write --out/lincls.json. The sgd run checkpoints its classifier and optimizer every epoch
(atomically) and, run again with the same options, resumes there exactly: the data order and each
image's augmentation are functions of (seed, epoch, index), as in training.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from moco_retrieval.export import ExportMeta
from moco_retrieval.fileio import atomic_torch_save, atomic_write
from moco_retrieval.images import ImageDecodeError, decode_image, image_files
from moco_retrieval.knn import topk_accuracy
from moco_retrieval.preprocessing import Preprocessing

from .config import SgdOptions
from .data import DataError, EpochSampler, LabelledImages, collate_labelled, sample_seed, with_seed
from .evaluate import Features, extract_features

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the fast mode's search, on standardised features
SEARCH_SHARE = 0.2  # of the training images, held out to choose C
SEARCH_MIN_PER_CLASS = 5  # fewer training images in a class: no search, C = 1


def train_augmentation(p: Preprocessing) -> T.Compose:
    """main_lincls.py's training transform at the export's input size."""
    return T.Compose(
        [T.RandomResizedCrop(p.input_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(p.mean, p.std)]
    )


class SeededLabelled(Dataset):
    """A labelled folder's (image, class, index) addressed by (epoch, index): each image's
    augmentation is seeded by (seed, epoch, index), so an epoch is the same however it is reached."""

    def __init__(self, labelled: LabelledImages, transform: T.Compose, seed: int) -> None:
        self.labelled, self.transform, self.seed = labelled, transform, seed

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.labelled.samples[index]
        try:
            img = decode_image(path)
        except ImageDecodeError as exc:
            return None, str(exc), index
        return with_seed(sample_seed(self.seed, epoch, index), self.transform, img), label, index


def report_base(meta: ExportMeta, checkpoint: str, train: Features | LabelledImages, val: Features) -> dict[str, Any]:
    return {
        "checkpoint": str(checkpoint),
        "fingerprint": meta.fingerprint,
        "arch": meta.arch,
        "feature_dim": meta.feature_dim,
        "input_size": meta.preprocessing.input_size,
        "classes": val.classes,
        "train_images": len(train.samples if isinstance(train, LabelledImages) else train.paths),
        "val_images": len(val.paths),
    }


def write_report(out: Path, report: dict[str, Any]) -> Path:
    path = out / "lincls.json"
    atomic_write(path, lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return path


# -- fast: cached features + logistic regression -------------------------------------------------
def cached_features(model: nn.Module, meta: ExportMeta, folder: str, cache: Path, workers: int) -> Features:
    """The folder's raw pooled features, from the cache when it holds this encoder's for the same
    files (the folder's listing, compared without opening an image)."""
    key = {"fingerprint": meta.fingerprint, "files": [str(p) for p in image_files(folder)]}
    if cache.is_file():
        held = torch.load(cache, weights_only=False)
        if {k: held.get(k) for k in key} == key:
            return held["features"]
    features = extract_features(model, meta, folder, workers=workers, normalize=False)
    atomic_torch_save({**key, "features": features}, cache)
    return features


def logistic_regression(C: float, seed: int, warm_start: bool = False):
    from sklearn.linear_model import LogisticRegression  # a second of import, for this mode only

    return LogisticRegression(C=C, max_iter=1000, random_state=seed, warm_start=warm_start)


def choose_c(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, dict[str, float]]:
    """The C of C_GRID with the best accuracy on a stratified SEARCH_SHARE of the training images
    (the smallest C among ties), fitted on the rest; its accuracies by C (in %). The grid is walked
    as a regularisation path, each fit starting from the last one's solution (the problem is convex:
    the same optimum, in a fraction of the L-BFGS iterations)."""
    from sklearn.model_selection import train_test_split

    fit_x, held_x, fit_y, held_y = train_test_split(x, y, test_size=SEARCH_SHARE, stratify=y, random_state=seed)
    model, scores = logistic_regression(C_GRID[0], seed, warm_start=True), {}
    for c in sorted(C_GRID):
        scores[f"{c:g}"] = 100.0 * model.set_params(C=c).fit(fit_x, fit_y).score(held_x, held_y)
    best = max(C_GRID, key=lambda c: (scores[f"{c:g}"], -c))
    return best, scores


def logistic_probe(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, C: float | None = None, seed: int = 0
) -> dict[str, Any]:
    """The fast mode on feature matrices: standardised on `train`, C searched unless given, then the
    regression on all of `train`; its class probabilities for `val` ("probs", a tensor) and the fit's facts."""
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-8
    x, x_val = (train - mean) / std, (val - mean) / std
    result: dict[str, Any] = {"C_given": C is not None}
    if C is None and np.bincount(train_labels).min() >= SEARCH_MIN_PER_CLASS:
        C, result["C_search"] = choose_c(x, train_labels, seed)
    elif C is None:
        C, result["C_search"] = 1.0, f"skipped: a class has fewer than {SEARCH_MIN_PER_CLASS} training images"
    classifier = logistic_regression(C, seed).fit(x, train_labels)
    result.update(C=C, train_top1=100.0 * classifier.score(x, train_labels))
    result["probs"] = torch.from_numpy(classifier.predict_proba(x_val))
    return result


def fast_lincls(
    model: nn.Module, meta: ExportMeta, checkpoint: str, train_dir: str, val_dir: str, out: Path,
    C: float | None = None, seed: int = 0, workers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    train = cached_features(model, meta, train_dir, out / "train_features.pt", workers)
    val = cached_features(model, meta, val_dir, out / "val_features.pt", workers)
    if train.classes != val.classes:
        raise DataError(f"{train_dir} and {val_dir} have different classes ({train.classes} vs {val.classes})")
    fit = logistic_probe(train.features.double().numpy(), train.labels.numpy(), val.features.double().numpy(), C, seed)
    probs = fit.pop("probs")
    report = {
        "mode": "fast",
        **report_base(meta, checkpoint, train, val),
        **topk_accuracy(probs, val.labels),
        **fit,
        "predictions": [val.classes[i] for i in probs.argmax(dim=1).tolist()],
        "val_paths": [str(p) for p in val.paths],
    }
    write_report(out, report)
    return report


# -- sgd: the official protocol ------------------------------------------------------------------
def step_lr(options: SgdOptions, epoch: int) -> float:
    return options.lr * 0.1 ** sum(epoch >= milestone for milestone in options.schedule)


def sgd_lincls(
    model: nn.Module, meta: ExportMeta, checkpoint: str, train_dir: str, val_dir: str, out: Path,
    options: SgdOptions | None = None, workers: int = 2, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    options = options or SgdOptions()
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    model.eval()
    for param in model.parameters():
        param.requires_grad = False
    labelled = LabelledImages(train_dir, transform=None)
    train = SeededLabelled(labelled, train_augmentation(meta.preprocessing), options.seed)
    torch.manual_seed(options.seed)
    fc = nn.Linear(meta.feature_dim, len(labelled.classes)).to(device)
    fc.weight.data.normal_(mean=0.0, std=0.01)
    fc.bias.data.zero_()
    optimizer = torch.optim.SGD(
        fc.parameters(), options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )
    # what a checkpoint must share to be resumed: all but the length (the schedule depends on the epoch alone)
    options_id = {k: v for k, v in vars(options).items() if k != "epochs"}
    state_path, identity = out / "lincls_checkpoint.pt", {"fingerprint": meta.fingerprint, "options": options_id}
    epoch, history = 0, []
    if state_path.is_file():
        held = torch.load(state_path, weights_only=False)
        if {k: held[k] for k in identity} != identity:
            raise DataError(f"{out} holds a lincls run of another encoder or other options: choose another --out")
        fc.load_state_dict(held["fc"])
        optimizer.load_state_dict(held["optimizer"])
        epoch, history = held["epoch"], held["history"]
        print(f"lincls: resuming after epoch {epoch} from {state_path}", file=sys.stderr)
    sampler = EpochSampler(len(train), min(options.batch_size, len(train)), options.seed)
    loader = DataLoader(
        train, batch_size=sampler.global_batch, sampler=sampler, num_workers=workers, collate_fn=collate_labelled,
        generator=torch.Generator().manual_seed(options.seed),
    )  # fmt: skip
    while epoch < options.epochs:
        for group in optimizer.param_groups:
            group["lr"] = step_lr(options, epoch)
        sampler.set_epoch(epoch)
        start, total, seen = time.perf_counter(), 0.0, 0
        for images, targets, _, _ in loader:
            if images is None:
                continue
            with torch.no_grad():
                features = model(images.to(device)).float()
            loss = nn.functional.cross_entropy(fc(features), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(targets), seen + len(targets)
        epoch += 1
        history.append({"epoch": epoch, "loss": total / max(seen, 1), "seconds": time.perf_counter() - start})
        state = {**identity, "fc": fc.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        atomic_torch_save({**state, "history": history}, state_path)
        if progress:
            print(f"lincls epoch {epoch}/{options.epochs}: loss {history[-1]['loss']:.4f}", file=sys.stderr)
    val = extract_features(model, meta, val_dir, workers=workers, normalize=False)
    if val.classes != labelled.classes:
        raise DataError(f"{train_dir} and {val_dir} have different classes ({labelled.classes} vs {val.classes})")
    with torch.no_grad():
        logits = fc(val.features.to(device)).cpu()
    report = {
        "mode": "sgd",
        **report_base(meta, checkpoint, labelled, val),
        **topk_accuracy(logits, val.labels),
        **vars(options),
        "history": history,
        "final_loss": history[-1]["loss"] if history else math.nan,
        "predictions": [val.classes[i] for i in logits.argmax(dim=1).tolist()],
        "val_paths": [str(p) for p in val.paths],
    }
    write_report(out, report)
    return report
