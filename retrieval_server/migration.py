"""Carrying a store's items into a store of a new model, shared by `retrieval-server migrate` (the
bulk pass and its catch-up passes) and SwitchModel (the last catch-up, while writes wait):

  - an item is re-embedded from its `uri` under the image roots, by the new model's encoder (the
    server's Encoder and the shared shard engine's decoding), with its id, metadata and human label;
    one whose image is missing or no longer decodes is left out and reported (Missing), never
    silently;
  - predicted labels are recomputed, not copied: an item that had a predicted label and no human
    label gets the new store's InstDisc vote among the human-labelled items (LabelCorpus's proposal,
    Vote.proposals), with the migration's k and tau; other items get none.

An embedded destination keeps what SwitchModel needs in DEST/migration/: source.json (the source
store, its identity and model, the image roots, k and tau) and listing.jsonl (the source's items as
the destination reflects them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moco_retrieval.fileio import atomic_write
from moco_retrieval.images import CorpusFile
from moco_retrieval.shard_embed import embed_files
from moco_retrieval.uris import UriError, uri_path

from .backend import Backend
from .encoder import Encoder
from .index import NoLabels
from .listing import Changes, ItemState, changes
from .store import NewItem

MIGRATION_DIR = "migration"
STATE_FILE, LISTING_FILE = "source.json", "listing.jsonl"
WRITE_CHUNK = 512  # items per destination write


@dataclass(frozen=True)
class Missing:
    """An item left out of the destination: its image cannot be read or decoded."""

    id: str
    uri: str
    reason: str


@dataclass(frozen=True)
class MigrationState:
    """Where an embedded destination came from (DEST/migration/source.json)."""

    source: str  # the source store directory
    source_store_id: str
    source_fingerprint: str
    fingerprint: str  # the model of the destination
    image_roots: list[str]
    k: int
    tau: float

    def write(self, store_dir: Path) -> None:
        text = json.dumps(asdict(self), indent=2)
        atomic_write(Path(store_dir) / MIGRATION_DIR / STATE_FILE, lambda f: f.write(text.encode()))

    @classmethod
    def read(cls, store_dir: Path) -> MigrationState | None:
        """The state of a migrated store, None for a store that was not migrated (or unreadable)."""
        try:
            return cls(**json.loads((Path(store_dir) / MIGRATION_DIR / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None


class Reembedder:
    """The new model's encoder, reading items' images from their uri under the image roots."""

    def __init__(self, encoder: Encoder, roots: list[Path], batch_size: int = 64, workers: int = 0) -> None:
        self.encoder, self.roots, self.batch_size, self.workers = encoder, roots, batch_size, workers

    def locate(self, items: dict[str, ItemState]) -> tuple[list[CorpusFile], list[Missing]]:
        """The image file of each item (folder "": a migration gives no folder labels), and the
        items whose uri names none (no uri, not a local file, outside the roots)."""
        files, missing = [], []
        for item_id, state in items.items():
            try:
                files.append(CorpusFile(uri_path(state.uri, self.roots), item_id, ""))
            except UriError as exc:
                missing.append(Missing(item_id, state.uri, str(exc)))
        return files, missing

    def embed(self, items: dict[str, ItemState]) -> tuple[list[str], np.ndarray, list[Missing]]:
        """(ids, their new embeddings, the items that could not be embedded)."""
        files, missing = self.locate(items)
        done = embed_files(
            files,
            self.encoder.transform,
            self.encoder.forward,
            self.encoder.dim,
            self.batch_size,
            self.workers,
        )
        missing += [Missing(item_id, items[item_id].uri, reason) for item_id, reason in done.failed]
        return [f.rel for f, _ in done.rows], done.vectors, missing


def write_items(dest: Backend, ids: list[str], vectors: np.ndarray, items: dict[str, ItemState], fresh: bool) -> None:
    """Store re-embedded items with their metadata and human label (`fresh`: into a store that
    does not hold them yet; otherwise a stored human label the source no longer has is cleared)."""
    for start in range(0, len(ids), WRITE_CHUNK):
        chunk = ids[start : start + WRITE_CHUNK]
        dest.upsert(
            [
                NewItem(item_id, vector, items[item_id].label, items[item_id].metadata)
                for item_id, vector in zip(chunk, vectors[start : start + WRITE_CHUNK])
            ]
        )
        if not fresh:
            dest.set_labels([(i, items[i].label, 0.0) for i in chunk], predicted=False)


def predict(dest: Backend, items: dict[str, ItemState], ids: list[str], k: int, tau: float, clear: bool) -> int:
    """Recompute the predicted labels of `ids` (those the destination holds) in the destination:
    the vote for each one that has a predicted and no human label in `items`; the others' are
    cleared when `clear` (a catch-up; a fresh destination has none). How many were predicted."""
    held = dest.get(ids, with_embedding=True)
    wanted = [i for i in ids if i in held and items[i].predicted_label is not None and items[i].label is None]
    proposals: list[tuple[str, str | None, float]] = []
    for start in range(0, len(wanted), WRITE_CHUNK):
        chunk = wanted[start : start + WRITE_CHUNK]
        try:
            labels, shares = dest.vote(np.stack([held[i].embedding for i in chunk]), k, tau).proposals()
        except NoLabels:
            break
        proposals += [(i, label, float(share)) for i, label, share in zip(chunk, labels, shares.tolist())]
    predicted = {i for i, _, _ in proposals}
    if clear:
        proposals += [(i, None, 0.0) for i in ids if i in held and i not in predicted]
    for start in range(0, len(proposals), WRITE_CHUNK):
        dest.set_labels(proposals[start : start + WRITE_CHUNK], predicted=True)
    return len(predicted)


@dataclass(frozen=True)
class Carried:
    changes: Changes
    missing: list[Missing]


def carry(
    dest: Backend,
    before: dict[str, ItemState],
    after: dict[str, ItemState],
    reembedder: Reembedder,
    k: int,
    tau: float,
) -> Carried:
    """Bring a destination that reflects the source as `before` up to `after` (a later listing):
    deletions, items written again (re-embedded; left out and reported when their image is missing),
    human labels, and the predicted labels of every changed item."""
    found = changes(before, after)
    if found.deleted:
        dest.delete(found.deleted, ignore_missing=True)
    ids, vectors, missing = reembedder.embed({i: after[i] for i in found.rewritten})
    if missing:
        dest.delete([m.id for m in missing], ignore_missing=True)
    write_items(dest, ids, vectors, after, fresh=False)
    relabelled = [i for i in found.relabelled if i in dest.get(found.relabelled)]  # held: not missing
    for start in range(0, len(relabelled), WRITE_CHUNK):
        chunk = relabelled[start : start + WRITE_CHUNK]
        dest.set_labels([(i, after[i].label, 0.0) for i in chunk], predicted=False)
    predict(dest, after, ids + relabelled, k, tau, clear=True)
    return Carried(found, missing)
