"""Embedding shards: the files `moco-train embed` writes and `retrieval-client import` reads (numpy and
JSON only, so the client needs no torch).

A shard directory holds `manifest.json` and, per shard s of --shard-size images:

    shard-00000.npy     float32 (n, dim): L2-normalised embeddings, the vectors Embed returns
    shard-00000.jsonl   n lines {"id", "folder", "metadata"}: the items in the rows' order, named as
                        `retrieval-client index` names them (id = path relative to the corpus folder)
    shard-00000.json    {"images", "vectors", "failed": [[id, reason], ...]}: written last, so its
                        presence means the shard is complete
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .fileio import atomic_write

MANIFEST = "manifest.json"
FORMAT = "moco-retrieval/embeddings"
VERSION = 1


class ShardError(ValueError):
    """A shard directory that is not one, or not readable: reported in one line."""


@dataclass(frozen=True)
class Manifest:
    """What a shard directory holds; every shard in it was written under this."""

    fingerprint: str  # sha256 of the encoder's weights (the server refuses vectors of another model)
    dim: int
    images: int
    files_sha256: str  # of the corpus listing (sorted relative paths)
    shard_size: int
    shards: int
    source: str  # the corpus folder, resolved

    def write(self, folder: Path) -> None:
        text = json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}, indent=2)
        atomic_write(folder / MANIFEST, lambda f: f.write(text.encode()))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: not a moco-train embed output ({exc})") from exc
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ShardError(f"{path}: not a moco-train embed output (format {d.get('format')!r})")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ShardItem:
    id: str
    folder: str  # parent folder name ("" at the top level): the label --labels-from-folders gives
    metadata: dict[str, str]


@dataclass(frozen=True)
class Shard:
    index: int
    vectors: np.ndarray  # (n, dim) float32
    items: list[ShardItem]  # n, in row order
    images: int  # files in the shard, including those that failed
    failed: list[tuple[str, str]]  # (id, reason) of files that could not be embedded


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def complete_shards(folder: Path, manifest: Manifest) -> list[int]:
    """Shards whose completion record exists, in order."""
    return [s for s in range(manifest.shards) if (folder / f"{shard_name(s)}.json").exists()]


def write_shard(folder: Path, shard: Shard) -> None:
    """The vectors and items first, the completion record last (each file atomically)."""
    name = shard_name(shard.index)
    atomic_write(folder / f"{name}.npy", lambda f: np.save(f, shard.vectors, allow_pickle=False))
    lines = "".join(json.dumps(asdict(item)) + "\n" for item in shard.items)
    atomic_write(folder / f"{name}.jsonl", lambda f: f.write(lines.encode()))
    record = json.dumps({"images": shard.images, "vectors": len(shard.vectors), "failed": shard.failed})
    atomic_write(folder / f"{name}.json", lambda f: f.write(record.encode()))


def read_record(folder: Path, index: int) -> dict:
    return json.loads((folder / f"{shard_name(index)}.json").read_text())


def read_shard(folder: Path, index: int, manifest: Manifest) -> Shard:
    name = shard_name(index)
    try:
        record = read_record(folder, index)
        vectors = np.load(folder / f"{name}.npy", allow_pickle=False)
        lines = (folder / f"{name}.jsonl").read_text().splitlines()
        items = [ShardItem(**json.loads(line)) for line in lines]
    except (OSError, ValueError, TypeError) as exc:
        raise ShardError(f"{folder / name}: unreadable shard ({exc})") from exc
    if vectors.dtype != np.float32 or vectors.shape != (len(items), manifest.dim) or record["vectors"] != len(items):
        raise ShardError(
            f"{folder / name}: {vectors.dtype} {vectors.shape} vectors for {len(items)} items "
            f"(expected float32 of dim {manifest.dim})"
        )
    return Shard(index, vectors, items, record["images"], [tuple(f) for f in record["failed"]])
