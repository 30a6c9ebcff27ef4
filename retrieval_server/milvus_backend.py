"""The milvus backend: every item (id, human label, predicted label, metadata, embedding) lives in one
Milvus collection, through pymilvus. `--milvus-uri ./milvus.db` runs Milvus Lite (one process per
file); `--milvus-uri http://host:19530` talks to Milvus standalone or a cluster, and then the server
keeps no state of its own: replicas side by side on one collection see the same items.

Mapping (what the proto promises, and what Milvus gives):
  row          int64 primary key = the first 63 bits of BLAKE2b(id): every replica derives the same
               key from an id, with no counter to share. Another id with the same key (about one
               chance in 10^6 at 10M items) is refused, never overwritten.
  consistency  the collection is created with consistency level Strong: every search and query
               sees every write acknowledged before it (read-your-writes, across replicas).
  writes       Upsert is acknowledged after Milvus accepted the write. Milvus has no transactions:
               Delete and SetLabels check every id first (NOT_FOUND changes nothing), then write all
               the items in one request; a failure inside that request can leave part of it applied.
               An Upsert without a label keeps the stored one by reading it first: a label set on
               another replica in between can be overwritten.
  Classify     a search filtered to `label is not null`, then the shared InstDisc vote.
  LabelCorpus  a query iterator over `label is null` (in key order, not by id).
  the model    the collection's properties hold the model fingerprint and dimension; a collection
               of another model is refused (FAILED_PRECONDITION) unless --reset-store.
  flush        after every --snapshot-every items this replica changed, and at shutdown. Milvus
               flushes by itself; Milvus Lite searches unflushed rows about 10x slower (measured:
               185 against 18 ms at 10k rows), so a replica flushes what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from pymilvus import DataType, MilvusClient, MilvusException

from moco_retrieval.knn import knn_vote

from .config import ServerConfig
from .index import Hits, NoLabels, Vote, any_excluded
from .neighbors import encode_item
from .store import EmbeddingChunk, NewItem, Row, StorageError, UnknownIds

log = logging.getLogger(__name__)
MAX_ID_LENGTH = 512  # bytes, as the service checks
MAX_LABEL_LENGTH = 4096
MAX_LIMIT = 16384  # Milvus's largest topk and query batch
FIELDS = ["row", "id", "label", "predicted_label", "predicted_confidence", "metadata"]
T = TypeVar("T")


class MilvusError(Exception):
    """Milvus cannot serve this server (unreachable, another model's collection): a start-up error."""


def row_of(item_id: str) -> int:
    """The item's primary key: the first 63 bits of BLAKE2b-64 of its UTF-8 id."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little") >> 1


def served_collection(client: MilvusClient, name: str) -> tuple[str, str | None]:
    """(the collection `name` is, or that the alias `name` points at now; its model fingerprint),
    ("", None) when there is none."""
    if not client.has_collection(name):
        return "", None
    described = client.describe_collection(name)
    return described["collection_name"], described.get("properties", {}).get("fingerprint")


def literal(value: str) -> str:
    """A string literal of Milvus's filter expressions (double-quoted, backslash escapes)."""
    return json.dumps(value, ensure_ascii=False)


def _row(entity: dict, with_embedding: bool) -> Row:
    return Row(
        row=int(entity["row"]),
        id=entity["id"],
        label=entity.get("label"),
        predicted_label=entity.get("predicted_label"),
        predicted_confidence=entity.get("predicted_confidence"),
        metadata=dict(entity.get("metadata") or {}),
        embedding=np.asarray(entity["embedding"], dtype=np.float32) if with_embedding else None,
    )


class MilvusBackend:
    kind = "milvus"
    gpus = 0  # the GPUs of a Milvus cluster are its own

    def __init__(self, client: MilvusClient, collection: str, dim: int, index: str, flush_every: int) -> None:
        self.client, self.collection, self.dim, self.flush_every = client, collection, dim, flush_every
        self.index_type = f"milvus:{index}"
        self.device = "gpu" if index.upper().startswith("GPU") else "cpu"
        self._changed = 0
        self._changed_lock = threading.Lock()

    @classmethod
    def open(cls, cfg: ServerConfig, fingerprint: str, dim: int) -> MilvusBackend:
        """Connect, create the collection for this model if missing, refuse one of another model
        (or drop it with --reset-store), and load it for search."""
        try:
            client = MilvusClient(uri=cfg.milvus_uri, token=cfg.milvus_token or "")
        except MilvusException as exc:
            raise MilvusError(f"Milvus at {cfg.milvus_uri}: {exc}") from exc
        name = cfg.milvus_collection
        try:
            collection, other = served_collection(client, name)
            if collection:
                if other == fingerprint:
                    name = collection  # an alias is served through the collection it points at now
                else:
                    if not cfg.reset_store:
                        raise MilvusError(
                            f"FAILED_PRECONDITION: Milvus collection {name!r} holds embeddings of model {other}, "
                            f"not of the served model {fingerprint}; use another --milvus-collection or "
                            "--reset-store to drop its items"
                        )
                    client.drop_collection(collection)
            if not client.has_collection(name):
                cls._create(client, name, fingerprint, dim, cfg.milvus_index)
            client.load_collection(name)
        except MilvusError:
            client.close()  # Milvus Lite stops its server now, before the error is reported
            raise
        except MilvusException as exc:
            client.close()
            raise MilvusError(f"Milvus at {cfg.milvus_uri}: {exc}") from exc
        backend = cls(client, name, dim, cfg.milvus_index, cfg.snapshot_every)
        log.info("Milvus collection %r (%s): %d items", name, backend.index_type, backend.item_count)
        return backend

    @staticmethod
    def _create(client: MilvusClient, name: str, fingerprint: str, dim: int, index: str) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("id", DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_LENGTH, nullable=True)
        schema.add_field("predicted_label", DataType.VARCHAR, max_length=MAX_LABEL_LENGTH, nullable=True)
        schema.add_field("predicted_confidence", DataType.FLOAT, nullable=True)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
        params = client.prepare_index_params()
        params.add_index("embedding", index_type=index, metric_type="IP")
        client.create_collection(
            name,
            schema=schema,
            index_params=params,
            consistency_level="Strong",
            properties={"fingerprint": fingerprint, "dim": str(dim)},
        )

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A pymilvus call; Milvus failures become StorageError (UNAVAILABLE to the caller)."""
        try:
            return fn(self.collection, *args, **kwargs)
        except MilvusException as exc:
            raise StorageError("io", f"Milvus {what} failed: {exc}") from exc

    def _count(self, where: str) -> int:
        return int(self._call("count", self.client.query, filter=where, output_fields=["count(*)"])[0]["count(*)"])

    def _by_rows(self, rows: list[int], fields: list[str]) -> list[dict]:
        out: list[dict] = []
        for start in range(0, len(rows), MAX_LIMIT):
            chunk = rows[start : start + MAX_LIMIT]
            out += self._call("query", self.client.query, filter=f"row in {chunk}", output_fields=fields)
        return out

    def _stored(self, ids: list[str], fields: list[str]) -> dict[str, dict]:
        """The stored entities of these ids (absent ones left out)."""
        found = self._by_rows(sorted({row_of(i) for i in ids}), fields)
        wanted = set(ids)
        return {e["id"]: e for e in found if e["id"] in wanted}

    def _after_write(self, changed: int) -> None:
        with self._changed_lock:
            self._changed += changed
            due = self.flush_every and self._changed >= self.flush_every
            if due:
                self._changed = 0
        if due:
            self._call("flush", self.client.flush)

    @property
    def item_count(self) -> int:
        return self._count("")

    @property
    def labelled_count(self) -> int:
        return self._count("label is not null")

    # -- writes -----------------------------------------------------------------------------------
    def upsert(self, items: list[NewItem]) -> int:
        keys = [row_of(item.id) for item in items]
        stored = {int(e["row"]): e for e in self._by_rows(keys, FIELDS[:5])}  # all but the metadata
        taken = [item.id for item, key in zip(items, keys) if key in stored and stored[key]["id"] != item.id]
        if taken:
            raise StorageError("conflict", f"ids {taken[:5]} share a Milvus key with other stored ids; nothing written")
        entities = []
        for item, key in zip(items, keys):
            old = stored.get(key, {})
            entities.append(
                {
                    "row": key,
                    "id": item.id,
                    "label": item.label if item.label is not None else old.get("label"),
                    "predicted_label": old.get("predicted_label"),
                    "predicted_confidence": old.get("predicted_confidence"),
                    "metadata": item.metadata,
                    "embedding": np.ascontiguousarray(item.embedding, dtype=np.float32),
                }
            )
        self._call("upsert", self.client.upsert, entities)
        self._after_write(len(items))
        return len(items)

    def delete(self, ids: list[str], ignore_missing: bool) -> int:
        stored = self._stored(ids, ["row", "id"])
        missing = [i for i in ids if i not in stored]
        if missing and not ignore_missing:
            raise UnknownIds(missing)
        rows = sorted({int(e["row"]) for e in stored.values()})
        if rows:
            self._call("delete", self.client.delete, ids=rows)
            self._after_write(len(rows))
        return len(rows)

    def set_labels(self, assignments: list[tuple[str, str | None, float]], predicted: bool) -> int:
        stored = self._stored([a[0] for a in assignments], [*FIELDS, "embedding"])
        missing = [a[0] for a in assignments if a[0] not in stored]
        if missing:
            raise UnknownIds(missing)
        for item_id, label, confidence in assignments:
            entity = stored[item_id]
            if predicted:
                entity["predicted_label"] = label
                entity["predicted_confidence"] = confidence if label is not None else None
            else:
                entity["label"] = label
        if stored:
            self._call("upsert", self.client.upsert, list(stored.values()))
            self._after_write(len(stored))
        return len(assignments)

    def set_predicted_rows(self, proposals: list[tuple[int, str, float]]) -> None:
        by_row = {row: (label, confidence) for row, label, confidence in proposals}
        entities = self._by_rows(sorted(by_row), [*FIELDS, "embedding"])  # rows deleted meanwhile: absent
        for entity in entities:
            entity["predicted_label"], entity["predicted_confidence"] = by_row[int(entity["row"])]
        if entities:
            self._call("upsert", self.client.upsert, entities)
            self._after_write(len(entities))

    # -- reads ------------------------------------------------------------------------------------
    def get(self, ids: list[str], with_embedding: bool = False) -> dict[str, Row]:
        fields = FIELDS + (["embedding"] if with_embedding else [])
        return {i: _row(e, with_embedding) for i, e in self._stored(ids, fields).items()}

    def by_rows(self, rows: Iterable[int]) -> dict[int, Row]:
        return {int(e["row"]): _row(e, False) for e in self._by_rows([int(r) for r in rows], FIELDS)}

    def encoded(self, rows: Iterable[int]) -> dict[int, bytes]:
        # Not kept between calls: other replicas write the same collection.
        return {r: encode_item(row) for r, row in self.by_rows(rows).items()}

    def _search(self, queries: np.ndarray, k: int, where: str, fields: list[str]) -> list[list[dict]]:
        data = [np.ascontiguousarray(q, dtype=np.float32) for q in queries]
        return self._call(
            "search",
            self.client.search,
            data=data,
            limit=min(k, MAX_LIMIT),
            filter=where,
            output_fields=fields,
            search_params={"metric_type": "IP"},
        )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        labels: set[str],
        excludes: np.ndarray | None,
        min_score: float | None,
        metadata: dict[str, str],
    ) -> list[Hits]:
        where = []
        if labels:
            where.append(f"label in [{', '.join(literal(label) for label in sorted(labels))}]")
        where += [f"metadata[{literal(key)}] == {literal(value)}" for key, value in sorted(metadata.items())]
        found = self._search(queries, k + any_excluded(excludes), " and ".join(where), [])
        out = []
        for q, hits in enumerate(found):
            own = int(excludes[q]) if excludes is not None else -1
            hits = [h for h in hits if int(h["row"]) != own and (min_score is None or h["distance"] >= min_score)]
            out.append(
                Hits(
                    np.array([h["distance"] for h in hits[:k]], dtype=np.float32),
                    np.array([h["row"] for h in hits[:k]], dtype=np.int64),
                )
            )
        return out

    def vote(self, queries: np.ndarray, k: int, tau: float, excludes: np.ndarray | None = None) -> Vote:
        found = self._search(queries, k + any_excluded(excludes), "label is not null", ["label"])
        owns = excludes.tolist() if excludes is not None else [-1] * len(found)
        found = [[h for h in hits if int(h["row"]) != own][:k] for hits, own in zip(found, owns)]
        # Classes: the labels among these neighbours, sorted. A label no neighbour has would get a
        # zero share, so the shares, the argmax and its ties equal a vote over every label.
        classes = sorted({h["entity"]["label"] for hits in found for h in hits})
        if not classes:
            raise NoLabels("no labelled items: label some with Upsert or SetLabels")
        index = {name: c for c, name in enumerate(classes)}
        width = max(len(hits) for hits in found)
        scores = np.zeros((len(found), width), np.float32)
        rows = np.full((len(found), width), -1, np.int64)
        class_of = np.full((len(found), width), -1, np.int64)
        for q, hits in enumerate(found):
            scores[q, : len(hits)] = [h["distance"] for h in hits]
            rows[q, : len(hits)] = [h["row"] for h in hits]
            class_of[q, : len(hits)] = [index[h["entity"]["label"]] for h in hits]
        shares = knn_vote(torch.from_numpy(scores), torch.from_numpy(class_of), len(classes), tau)
        return Vote(classes, shares.numpy(), scores, rows)

    def neighbors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = self._search(queries, k, "", [])
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for q, hits in enumerate(found):
            scores[q, : len(hits)] = [h["distance"] for h in hits]
            rows[q, : len(hits)] = [h["row"] for h in hits]
        return scores, rows

    def _iterate(self, where: str, fields: list[str], chunk: int) -> Iterator[list[dict]]:
        """Every entity matching `where`, in batches, through a query iterator (no giant query)."""
        try:
            iterator = self.client.query_iterator(
                self.collection, batch_size=min(chunk, MAX_LIMIT), filter=where, output_fields=fields
            )
            try:
                while batch := iterator.next():
                    yield batch
            finally:
                iterator.close()
        except MilvusException as exc:
            raise StorageError("io", f"Milvus query failed: {exc}") from exc

    def embeddings(self, labelled: bool | None = None, chunk: int = 4096) -> Iterator[EmbeddingChunk]:
        where = {None: "", True: "label is not null", False: "label is null"}[labelled]
        for batch in self._iterate(where, ["row", "id", "label", "embedding"], chunk):
            yield EmbeddingChunk(
                np.array([e["row"] for e in batch], dtype=np.int64),
                [e["id"] for e in batch],
                [e.get("label") for e in batch],
                np.ascontiguousarray(np.array([e["embedding"] for e in batch], dtype=np.float32)),
            )

    def unlabelled(self, chunk: int) -> Iterator[EmbeddingChunk]:
        return self.embeddings(labelled=False, chunk=chunk)

    def labelled_items(self, human_only: bool, chunk: int) -> Iterator[list[Row]]:
        where = "label is not null" + ("" if human_only else " or predicted_label is not null")
        for batch in self._iterate(where, FIELDS, chunk):
            yield [_row(e, False) for e in batch]

    def counts(self) -> tuple[int, dict[str, int], int]:
        label_counts: dict[str, int] = {}
        for batch in self._iterate("label is not null", ["label"], MAX_LIMIT):
            for entity in batch:
                label_counts[entity["label"]] = label_counts.get(entity["label"], 0) + 1
        return self.item_count, label_counts, self._count("predicted_label is not null and label is null")

    def close(self) -> str:
        try:
            self._call("flush", self.client.flush)
            flushed = "flushed"
        except StorageError as exc:
            log.warning("%s", exc)
            flushed = "not flushed"
        self.client.close()
        return f"Milvus collection {self.collection!r} {flushed}"
