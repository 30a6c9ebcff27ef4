"""Search and Classify results on the wire, built from bytes rather than message by message.

A Classify with 200 neighbours spent about a third of its server time fetching the 200 store rows
and building 200 Neighbor messages in Python (bench/results/server_profile.json). Each item's
Neighbor is therefore encoded once, without its score (`encode_item`; the embedded backend keeps
these encodings in memory, embedded.py), and a response's neighbours are written as wire bytes:
each encoding with its score appended (protobuf merges a message's fields in any order), then
parsed into the response in one call of the C protobuf runtime.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from moco_retrieval.api.v1 import retrieval_pb2 as pb

from .store import Row

_SCORE = bytes([(pb.Neighbor.DESCRIPTOR.fields_by_name["score"].number << 3) | 5])  # fixed32 wire type


def neighbor(row: Row, score: float) -> pb.Neighbor:
    """A stored item as a search result."""
    return pb.Neighbor(
        id=row.id, score=score, label=row.label or "", predicted_label=row.predicted_label or "", metadata=row.metadata
    )


def encode_item(row: Row) -> bytes:
    """The Neighbor message of a stored item, all but its score (a score of 0 is not on the wire)."""
    return neighbor(row, 0.0).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def neighbors_wire(message: type, items: Sequence[bytes], scores: Sequence[float]) -> bytes:
    """The wire bytes of `message`'s repeated `neighbors` field holding these items (encode_item)
    with these scores; parse them with message.FromString, then set the other fields."""
    tag = _varint((message.DESCRIPTOR.fields_by_name["neighbors"].number << 3) | 2)
    return b"".join(
        tag + _varint(len(item) + 5) + item + _SCORE + struct.pack("<f", score) for item, score in zip(items, scores)
    )
