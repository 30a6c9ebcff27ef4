"""`moco-train embed`: a corpus embedded by an export, spread over processes (torchrun: any number of GPUs
and machines; or one process), written as the shards of moco_retrieval.shards that `retrieval-client
import` streams into the service.

The corpus folder is listed in the shared order (moco_retrieval.images.corpus_files) and cut into
shards of --shard-size images; shard s belongs to rank s mod world_size, so the ranks need no
communication but a barrier. The manifest pins the model, the corpus listing and the shard size: a
later run resumes (complete shards are skipped) only if none of them changed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moco_retrieval.devices import resolve_device
from moco_retrieval.export import embed, export_model
from moco_retrieval.images import CorpusFile, ImageDecodeError, corpus_files, decode_image
from moco_retrieval.preprocessing import eval_transform
from moco_retrieval.shards import (
    MANIFEST,
    Manifest,
    Shard,
    ShardError,
    ShardItem,
    complete_shards,
    read_record,
    shard_name,
    write_shard,
)

from . import distributed as dist
from .checkpoint import load_file, to_export
from .data import DataError


class CorpusImages(Dataset):
    """(index, preprocessed image or None, sha256 or the reason it failed) of some corpus files."""

    def __init__(self, files: Sequence[CorpusFile], transform) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            data = self.files[i].path.read_bytes()
            return i, self.transform(decode_image(data)), hashlib.sha256(data).hexdigest()
        except (OSError, ImageDecodeError) as exc:
            return i, None, str(getattr(exc, "strerror", None) or exc)


def _collate(batch):
    return batch


def embed_shard(model, dim: int, files: Sequence[CorpusFile], transform, device, args) -> tuple[np.ndarray, list, list]:
    """(vectors, [(file, sha256)] of their rows, [(id, reason)] of the files that failed)."""
    loader = DataLoader(
        CorpusImages(files, transform),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    vectors, rows, failed = [], [], []
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    for batch in loader:
        ok = [(i, x, digest) for i, x, digest in batch if x is not None]
        failed += [(files[i].rel, reason) for i, x, reason in batch if x is None]
        if not ok:
            continue
        images = torch.stack([x for _, x, _ in ok])
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            vectors.append(embed(model, images).cpu().numpy())
        rows += [(files[i], digest) for i, _, digest in ok]
    out = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return np.ascontiguousarray(out, dtype=np.float32), rows, failed


def prepare(data: Path, out: Path, meta, shard_size: int) -> tuple[list[CorpusFile], Manifest]:
    if not data.is_dir():
        raise DataError(f"{data}: no such folder")
    files = corpus_files(data)
    if not files:
        raise DataError(f"{data}: no images found")
    listing = hashlib.sha256("\n".join(f.rel for f in files).encode()).hexdigest()
    manifest = Manifest(
        fingerprint=meta.fingerprint,
        dim=meta.feature_dim,
        images=len(files),
        files_sha256=listing,
        shard_size=shard_size,
        shards=-(-len(files) // shard_size),
        source=str(data.resolve()),
    )
    if (out / MANIFEST).exists():
        try:
            previous = Manifest.read(out)
        except ShardError as exc:
            raise DataError(str(exc)) from exc
        if previous != manifest:
            changed = [k for k in manifest.__dict__ if getattr(previous, k) != getattr(manifest, k)]
            raise DataError(
                f"{out} holds shards of another run ({', '.join(changed)} differ): use a new --out to embed afresh"
            )
    return files, manifest


def run_embed(args) -> dict:
    """Embed this rank's shards; returns a summary (on every rank, of the whole directory)."""
    if args.shard_size < 1 or args.batch_size < 1:
        raise DataError("--shard-size and --batch-size must be positive")
    dist.init_distributed(args.device)  # torchrun: gloo on the CPU, NCCL pinned to GPU LOCAL_RANK
    rank, world = dist.get_rank(), dist.get_world_size()
    device = resolve_device(args.device)
    model, meta = export_model(to_export(load_file(args.checkpoint), args.checkpoint), args.checkpoint, device)
    out, data = Path(args.out), Path(args.data)
    files, manifest = prepare(data, out, meta, args.shard_size)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        manifest.write(out)
    dist.barrier()
    transform = eval_transform(meta.preprocessing)
    done = set(complete_shards(out, manifest))
    mine = [s for s in range(manifest.shards) if s % world == rank and s not in done]
    started, embedded = time.perf_counter(), 0
    for s in mine:
        chunk = files[s * args.shard_size : (s + 1) * args.shard_size]
        vectors, rows, failed = embed_shard(model, manifest.dim, chunk, transform, device, args)
        items = [ShardItem(f.rel, f.folder, f.metadata(digest)) for f, digest in rows]
        write_shard(out, Shard(s, vectors, items, len(chunk), failed))
        embedded += len(chunk)
        if not args.quiet:
            print(f"rank {rank}: {shard_name(s)} {len(vectors)} vectors, {len(failed)} failed", flush=True)
    seconds = time.perf_counter() - started
    dist.barrier()
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    records = [read_record(out, s) for s in complete_shards(out, manifest)]
    return {
        "out": str(out),
        "shards": manifest.shards,
        "complete": len(records),
        "skipped_complete": len(done),
        "vectors": sum(r["vectors"] for r in records),
        "failed": sum(len(r["failed"]) for r in records),
        "processes": world,
        "rank_images": embedded,
        "rank_img_per_s": round(embedded / seconds, 1) if seconds > 0 and embedded else None,
        "fingerprint": manifest.fingerprint,
    }
