"""Client library and CLI for the retrieval service (retrieval.v1)."""

from .aio import AsyncRetrievalClient
from .client import (
    Classification,
    ItemFailure,
    Neighbor,
    Proposal,
    RetrievalClient,
    RetrievalError,
    ServerInfo,
    StoredItem,
    Suggestion,
    Switched,
    UpsertItem,
    UpsertResult,
)

__all__ = [
    "AsyncRetrievalClient",
    "Classification",
    "ItemFailure",
    "Neighbor",
    "Proposal",
    "RetrievalClient",
    "RetrievalError",
    "ServerInfo",
    "StoredItem",
    "Suggestion",
    "Switched",
    "UpsertItem",
    "UpsertResult",
]
