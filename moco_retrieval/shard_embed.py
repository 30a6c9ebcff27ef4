"""Embedding a list of image files into the shards of moco_retrieval.shards, spread over the processes
of a job (torchrun; or one process). Shard s holds files s*shard_size... and belongs to rank
s mod world_size, so the ranks need no communication but two barriers; a shard is complete once its
record is written, so a killed run resumes where it stopped and ends with the same shards.

Two callers: `moco-train embed` (a corpus folder, the trainer's forward) and `retrieval-server
migrate` (a store's items, the server's encoder). Each brings its listing, its manifest and its
forward; the sharding, the decoding and the resume live here once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import process_group
from .images import CorpusFile, ImageDecodeError, decode_image
from .shards import Manifest, Shard, ShardError, ShardItem, complete_shards, write_shard

# A preprocessed batch (B, 3, S, S) -> its (B, D) L2-normalised float32 embeddings, on the CPU.
Forward = Callable[[torch.Tensor], np.ndarray]


class FileImages(Dataset):
    """(index, preprocessed image or None, sha256 or the reason it failed) of some files."""

    def __init__(self, files: Sequence[CorpusFile], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            data = self.files[i].path.read_bytes()
            return i, self.transform(decode_image(data)), hashlib.sha256(data).hexdigest()
        except (OSError, ImageDecodeError) as exc:
            return i, None, str(getattr(exc, "strerror", None) or exc)


def _collate(batch: list) -> list:
    return batch


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (n, D) float32, the files that decoded, in order
    rows: list[tuple[CorpusFile, str]]  # (file, sha256 of its bytes) of each vector
    failed: list[tuple[str, str]]  # (id, reason) of the files that did not


def embed_files(
    files: Sequence[CorpusFile],
    transform: Callable,
    forward: Forward,
    dim: int,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
) -> Embedded:
    """Decode (in `workers` processes) and embed `files`; a file that cannot be read or decoded is
    listed in `failed` with its reason and does not stop the others. pin_memory: for a GPU forward."""
    loader = DataLoader(
        FileImages(files, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
    )
    vectors, rows, failed = [], [], []
    for batch in loader:
        ok = [(i, x, digest) for i, x, digest in batch if x is not None]
        failed += [(files[i].rel, reason) for i, x, reason in batch if x is None]
        if ok:
            vectors.append(forward(torch.stack([x for _, x, _ in ok])))
            rows += [(files[i], digest) for i, _, digest in ok]
    out = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return Embedded(np.ascontiguousarray(out, dtype=np.float32), rows, failed)


def listing_sha256(keys: Sequence[str]) -> str:
    """What pins a listing in its manifest: the sha256 of its keys, one per line, in order."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def changed_fields(out: Path, manifest: Manifest) -> list[str]:
    """The manifest fields in which `out`'s existing shards differ from `manifest` (empty when
    `out` holds none yet, or shards of this very run: they are resumed)."""
    try:
        previous = Manifest.read(out)
    except ShardError:
        if (out / "manifest.json").exists():
            raise
        return []
    return [k for k in manifest.__dict__ if getattr(previous, k) != getattr(manifest, k)]


@dataclass(frozen=True)
class RankRun:
    skipped: int  # shards complete before this run (of every rank)
    images: int  # files this rank embedded
    seconds: float


def run_shards(
    out: Path,
    manifest: Manifest,
    files: Sequence[CorpusFile],
    transform: Callable,
    forward: Forward,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    on_shard: Callable[[int, Shard], None] | None = None,
) -> RankRun:
    """Embed this process's incomplete shards of `files` into `out`, every rank of the job
    together: rank 0 writes the manifest (the caller checked `changed_fields` first), each rank its
    shards, and all return once every shard is written."""
    rank, world = process_group.get_rank(), process_group.get_world_size()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        manifest.write(out)
    process_group.barrier()
    done = set(complete_shards(out, manifest))
    mine = [s for s in range(manifest.shards) if s % world == rank and s not in done]
    started, images = time.perf_counter(), 0
    for s in mine:
        chunk = files[s * manifest.shard_size : (s + 1) * manifest.shard_size]
        result = embed_files(chunk, transform, forward, manifest.dim, batch_size, workers, pin_memory)
        items = [ShardItem(f.rel, f.folder, f.metadata(digest)) for f, digest in result.rows]
        shard = Shard(s, result.vectors, items, len(chunk), result.failed)
        write_shard(out, shard)
        images += len(chunk)
        if on_shard is not None:
            on_shard(rank, shard)
    seconds = time.perf_counter() - started
    process_group.barrier()
    return RankRun(len(done), images, seconds)
