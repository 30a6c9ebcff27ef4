"""What a store holds, item by item, without the embeddings: the listing a migration re-embeds, and
by comparing two listings, what changed in between (the writes a catch-up carries).

Each item's state is its labels, its metadata and a token that changes whenever its embedding is
rewritten: the row's store version on the embedded backend (every Upsert takes a new one), a digest
of the stored embedding on the milvus backend. A listing is read in one consistent read (embedded:
one SQLite read transaction on a read-only connection, beside a server that writes; milvus: a
query iterator under Strong consistency).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moco_retrieval.fileio import atomic_open

from .store import Store


class SourceError(Exception):
    """The store to read is not there or not readable (one line for the CLI)."""


@dataclass(frozen=True)
class ItemState:
    label: str | None  # human label
    predicted_label: str | None
    predicted_confidence: float | None
    metadata: dict[str, str]
    token: str  # changes when the embedding is rewritten

    @property
    def uri(self) -> str:
        return self.metadata.get("uri", "")


@dataclass(frozen=True)
class Listing:
    fingerprint: str  # the model whose embeddings the store holds
    dim: int
    store_id: str  # the store's identity: its store_id (embedded) or its collection (milvus)
    items: dict[str, ItemState]  # by id, in id order


def embedded_listing(store_dir: Path) -> Listing:
    """Every item of the store in `store_dir`, read while a server may serve and write it."""
    path = Path(store_dir) / Store.FILENAME
    if not path.is_file():
        raise SourceError(f"{store_dir}: no store ({Store.FILENAME}) there")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            conn.execute("BEGIN")  # one read transaction: the meta and the items of one commit
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            rows = conn.execute(
                "SELECT id, label, predicted_label, predicted_confidence, metadata, version FROM items ORDER BY id"
            ).fetchall()
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise SourceError(f"{store_dir}: cannot read the store ({exc})") from exc
    if "fingerprint" not in meta:
        raise SourceError(f"{store_dir}: the store has no model yet (nothing was ever served from it)")
    items = {r[0]: ItemState(r[1], r[2], r[3], json.loads(r[4]), f"v{r[5]}") for r in rows}
    return Listing(meta["fingerprint"], int(meta["dim"]), meta.get("store_id", ""), items)


def milvus_listing(client, collection: str) -> Listing:
    """Every item of a Milvus collection (an alias is read through to its collection)."""
    from pymilvus import MilvusException

    try:
        described = client.describe_collection(collection)
        properties = described.get("properties", {})
        client.load_collection(collection)  # a no-op where servers serve it already
        iterator = client.query_iterator(
            collection,
            batch_size=4096,
            filter="",
            output_fields=["id", "label", "predicted_label", "predicted_confidence", "metadata", "embedding"],
        )
        items = {}
        try:
            while batch := iterator.next():
                for e in batch:
                    digest = hashlib.blake2b(np.asarray(e["embedding"], dtype="<f4").tobytes(), digest_size=16)
                    items[e["id"]] = ItemState(
                        e.get("label"),
                        e.get("predicted_label"),
                        e.get("predicted_confidence"),
                        dict(e.get("metadata") or {}),
                        digest.hexdigest(),
                    )
        finally:
            iterator.close()
    except MilvusException as exc:
        raise SourceError(f"Milvus collection {collection!r}: cannot read it ({exc})") from exc
    if "fingerprint" not in properties:
        raise SourceError(f"Milvus collection {collection!r} was not written by retrieval-server (no fingerprint)")
    return Listing(
        properties["fingerprint"], int(properties["dim"]), described["collection_name"], dict(sorted(items.items()))
    )


@dataclass(frozen=True)
class Changes:
    """What changed from one listing to a later one."""

    deleted: list[str]
    rewritten: list[str]  # new, or upserted again (another embedding or metadata): re-embed them
    relabelled: list[str]  # same embedding and metadata, other labels

    def __len__(self) -> int:
        return len(self.deleted) + len(self.rewritten) + len(self.relabelled)


def changes(before: dict[str, ItemState], after: dict[str, ItemState]) -> Changes:
    rewritten, relabelled = [], []
    for item_id, now in after.items():
        then = before.get(item_id)
        if then is None or then.token != now.token or then.metadata != now.metadata:
            rewritten.append(item_id)
        elif then != now:
            relabelled.append(item_id)
    return Changes(sorted(set(before) - set(after)), rewritten, relabelled)


def write_listing(path: Path, items: dict[str, ItemState]) -> None:
    """One JSON line per item, atomically."""
    with atomic_open(path, text=True) as f:
        for item_id, state in items.items():
            f.write(json.dumps({"id": item_id, **asdict(state)}, ensure_ascii=False) + "\n")


def read_listing(path: Path) -> dict[str, ItemState]:
    return dict(_lines(path))


def _lines(path: Path) -> Iterator[tuple[str, ItemState]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield d.pop("id"), ItemState(**d)
