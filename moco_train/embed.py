"""`moco-train embed`: a corpus embedded by an export, spread over processes (torchrun: any number of GPUs
and machines; or one process), written as the shards of moco_retrieval.shards that `retrieval-client
import` streams into the service.

The corpus folder is listed in the shared order (moco_retrieval.images.corpus_files) and handed to the
shared shard engine (moco_retrieval.shard_embed: shard s belongs to rank s mod world_size, complete
shards are skipped), with the export's forward. The manifest pins the model, the corpus listing and
the shard size: a later run resumes only if none of them changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moco_retrieval.devices import resolve_device
from moco_retrieval.export import embed, export_model
from moco_retrieval.images import CorpusFile, corpus_files
from moco_retrieval.preprocessing import eval_transform
from moco_retrieval.shard_embed import Forward, changed_fields, listing_sha256, run_shards
from moco_retrieval.shards import Manifest, Shard, ShardError, complete_shards, read_record, shard_name

from . import distributed as dist
from .checkpoint import load_file, to_export
from .data import DataError


def prepare(data: Path, out: Path, meta, shard_size: int) -> tuple[list[CorpusFile], Manifest]:
    if not data.is_dir():
        raise DataError(f"{data}: no such folder")
    files = corpus_files(data)
    if not files:
        raise DataError(f"{data}: no images found")
    manifest = Manifest(
        fingerprint=meta.fingerprint,
        dim=meta.feature_dim,
        images=len(files),
        files_sha256=listing_sha256([f.rel for f in files]),
        shard_size=shard_size,
        shards=-(-len(files) // shard_size),
        source=str(data.resolve()),
    )
    try:
        changed = changed_fields(out, manifest)
    except ShardError as exc:
        raise DataError(str(exc)) from exc
    if changed:
        raise DataError(
            f"{out} holds shards of another run ({', '.join(changed)} differ): use a new --out to embed afresh"
        )
    return files, manifest


def forward_of(model: torch.nn.Module, device: torch.device, amp: str) -> Forward:
    """The export's forward, under autocast when --amp asks for it."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def forward(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return embed(model, images).cpu().numpy()

    return forward


def run_embed(args) -> dict:
    """Embed this rank's shards; returns a summary (on every rank, of the whole directory)."""
    if args.shard_size < 1 or args.batch_size < 1:
        raise DataError("--shard-size and --batch-size must be positive")
    dist.init_distributed(args.device)  # torchrun: gloo on the CPU, NCCL pinned to GPU LOCAL_RANK
    device = resolve_device(args.device)
    model, meta = export_model(to_export(load_file(args.checkpoint), args.checkpoint), args.checkpoint, device)
    out, data = Path(args.out), Path(args.data)
    files, manifest = prepare(data, out, meta, args.shard_size)

    def report(rank: int, shard: Shard) -> None:
        if not args.quiet:
            counts = f"{len(shard.vectors)} vectors, {len(shard.failed)} failed"
            print(f"rank {rank}: {shard_name(shard.index)} {counts}", flush=True)

    run = run_shards(
        out,
        manifest,
        files,
        eval_transform(meta.preprocessing),
        forward_of(model, device, args.amp),
        batch_size=args.batch_size,
        workers=args.workers,
        pin_memory=device.type == "cuda",
        on_shard=report,
    )
    world = dist.get_world_size()
    if dist.is_distributed():
        torch.distributed.destroy_process_group()
    records = [read_record(out, s) for s in complete_shards(out, manifest)]
    return {
        "out": str(out),
        "shards": manifest.shards,
        "complete": len(records),
        "skipped_complete": run.skipped,
        "vectors": sum(r["vectors"] for r in records),
        "failed": sum(len(r["failed"]) for r in records),
        "processes": world,
        "rank_images": run.images,
        "rank_img_per_s": round(run.images / run.seconds, 1) if run.seconds > 0 and run.images else None,
        "fingerprint": manifest.fingerprint,
    }
