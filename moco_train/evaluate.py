"""InstDisc kNN evaluation of an exported encoder on labelled folders (CLI `knn` and the training monitor),
and of a memory bank (the monitor of a method that keeps one per training image: InstDisc)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from moco_retrieval.export import ExportMeta, embed, pooled
from moco_retrieval.knn import DEFAULT_K, DEFAULT_TAU, knn_classify, topk_accuracy
from moco_retrieval.preprocessing import eval_transform

from .data import DataError, LabelledImages, collate_labelled


@dataclass
class Features:
    features: torch.Tensor  # (N, D) float32, L2-normalised (unless asked otherwise), on the CPU
    labels: torch.Tensor  # (N,) int64 class indices
    paths: list[Path]
    classes: list[str]


def extract_features(
    model: nn.Module,
    meta: ExportMeta,
    root: str | Path,
    batch_size: int = 256,
    workers: int = 0,
    normalize: bool = True,
) -> Features:
    """Embed every decodable image of a labelled folder with the export's own preprocessing
    (L2-normalised, as served; normalize=False: the raw pooled features a linear probe reads)."""
    dataset = LabelledImages(root, eval_transform(meta.preprocessing))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_labelled,
        generator=torch.Generator(),
    )  # leaves the global RNG alone
    feats, labels, indices = [], [], []
    for images, targets, idx, failed in loader:
        for i, reason in failed:
            warnings.warn(f"skipping {dataset.samples[i][0]}: {reason}", stacklevel=2)
        if images is None:
            continue
        feats.append((embed if normalize else pooled)(model, images).cpu())
        labels.append(targets)
        indices.append(idx)
    if not feats:
        raise DataError(f"{root}: no decodable images")
    order = torch.cat(indices).tolist()
    return Features(torch.cat(feats), torch.cat(labels), [dataset.samples[i][0] for i in order], dataset.classes)


@dataclass
class KnnResult:
    top1: float
    top5: float
    predictions: torch.Tensor  # (Q,) predicted class index per query
    bank: Features
    queries: Features


def knn_evaluate(
    model: nn.Module,
    meta: ExportMeta,
    bank_dir: str | Path,
    queries_dir: str | Path,
    k: int = DEFAULT_K,
    tau: float = DEFAULT_TAU,
    batch_size: int = 256,
    workers: int = 0,
) -> KnnResult:
    """Top-1/top-5 of the InstDisc weighted kNN: queries voted by their k nearest bank images."""
    bank = extract_features(model, meta, bank_dir, batch_size, workers)
    return knn_against(bank, extract_features(model, meta, queries_dir, batch_size, workers), k, tau, batch_size)


def knn_against(bank: Features, queries: Features, k: int, tau: float, batch_size: int = 256) -> KnnResult:
    """The weighted kNN vote of embedded queries against a bank of the same classes."""
    if bank.classes != queries.classes:
        raise DataError(f"the bank's classes {bank.classes} differ from the queries' classes {queries.classes}")
    scores = knn_classify(
        queries.features, bank.features, bank.labels, len(bank.classes), k=k, tau=tau, chunk_size=batch_size
    )
    acc = topk_accuracy(scores, queries.labels)
    return KnnResult(acc["top1"], acc["top5"], scores.argmax(dim=1), bank, queries)


@dataclass
class BankRows:
    """A labelled bank folder whose images are training images: their rows in the training set, so
    that a memory bank (one feature per training image) gives their features."""

    rows: torch.Tensor  # (N,) int64 dataset indices
    labels: torch.Tensor  # (N,) int64 class indices
    paths: list[Path]
    classes: list[str]

    @classmethod
    def find(cls, bank_dir: str | Path, training_paths: list[Path]) -> BankRows:
        """Look the labelled folder's images up among the training images (by resolved path); every
        one must be there, as the memory bank holds nothing else."""
        dataset = LabelledImages(bank_dir, transform=None)
        row = {Path(path).resolve(): i for i, path in enumerate(training_paths)}
        missing = [path for path, _ in dataset.samples if path.resolve() not in row]
        if missing:
            raise DataError(
                f"{bank_dir}: {len(missing)} of its {len(dataset.samples)} images are not training images "
                f"(e.g. {missing[0]}); a memory-bank method's kNN monitor votes with the bank's rows, so "
                "--knn-bank must be a labelled view of the training images"
            )
        paths = [path for path, _ in dataset.samples]
        rows = torch.tensor([row[path.resolve()] for path in paths], dtype=torch.long)
        labels = torch.tensor([label for _, label in dataset.samples], dtype=torch.long)
        return cls(rows, labels, paths, dataset.classes)

    def features(self, memory: torch.Tensor) -> Features:
        """The bank's features: the memory's rows of its images (L2-normalised, on the CPU)."""
        rows = memory[self.rows.to(memory.device)].float().cpu()
        return Features(torch.nn.functional.normalize(rows, dim=1), self.labels, self.paths, self.classes)
