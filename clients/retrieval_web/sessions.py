"""Server-side sessions and the bounded cache of gRPC clients.

The browser's cookie holds an opaque random id and nothing else; the bearer token typed into the
sign-in page, the CSRF token, whether the token may write, the label-queue cards skipped (at most
MAX_SKIPPED ids) and the last image uploaded to search (its embedding and a thumbnail) stay in this
process. A session ends
when it signs out (the id is forgotten at once, so a copied cookie stops working), after
`idle_s` without a request, or `lifetime_s` after sign-in, whichever comes first. The table is
bounded: at most `max_sessions` signed-in sessions and as many anonymous ones (visitors before
sign-in, or on a page started with its own token: they hold a CSRF token only); when one of them is
full its least recently used session is dropped. Anonymous visitors cannot push signed-in sessions
out: signing in needs a token the service accepts.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from retrieval_client import RetrievalClient

DEFAULT_IDLE_MINUTES = 120
DEFAULT_LIFETIME_HOURS = 12
DEFAULT_MAX_SESSIONS = 1000
DEFAULT_MAX_CLIENTS = 32
MAX_SKIPPED = 500  # ids a session keeps skipped (the label queue is at most 500 long); the oldest go first


@dataclass(frozen=True)
class UploadedQuery:
    """The image a session searched with: its embedding (for "more" and other filters) and a
    thumbnail (shown above the results: the content security policy allows no data: or blob: image)."""

    name: str
    vector: np.ndarray
    thumbnail: bytes
    number: int  # the session's upload count: the thumbnail's URL changes with each upload


@dataclass
class Session:
    id: str
    csrf: str
    created: float
    last_seen: float
    token: str | None = None  # the token typed into the sign-in page; None: anonymous
    can_write: bool | None = None  # asked once per session (None: not asked yet)
    skipped: dict[str, None] = field(default_factory=dict)  # label-queue ids skipped, oldest first
    upload: UploadedQuery | None = None

    @property
    def signed_in(self) -> bool:
        return self.token is not None

    def skip(self, ids: Iterable[str]) -> None:
        for item_id in ids:
            self.skipped.pop(item_id, None)
            self.skipped[item_id] = None
        for old in list(self.skipped)[: max(0, len(self.skipped) - MAX_SKIPPED)]:
            del self.skipped[old]

    def unskip(self, ids: Iterable[str]) -> None:
        for item_id in ids:
            self.skipped.pop(item_id, None)


class SessionTable:
    def __init__(
        self,
        idle_s: float = DEFAULT_IDLE_MINUTES * 60,
        lifetime_s: float = DEFAULT_LIFETIME_HOURS * 3600,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_s <= 0 or lifetime_s <= 0 or max_sessions <= 0:
            raise ValueError("session idle time, lifetime and table size must be positive")
        self.idle_s, self.lifetime_s, self.max_sessions, self.clock = idle_s, lifetime_s, max_sessions, clock
        self._signed_in: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._anonymous: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def _table(self, session: Session) -> OrderedDict[str, Session]:
        return self._signed_in if session.signed_in else self._anonymous

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen > self.idle_s or now - session.created > self.lifetime_s

    def get(self, session_id: str | None) -> Session | None:
        """The live session of a cookie's id (its idle clock restarted), None if unknown or expired."""
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            for table in (self._signed_in, self._anonymous):
                session = table.get(session_id)
                if session is None:
                    continue
                if self._expired(session, now):
                    del table[session_id]
                    return None
                session.last_seen = now
                table.move_to_end(session_id)
                return session
        return None

    def new(self, token: str | None = None, can_write: bool | None = None) -> Session:
        """A fresh session with a new random id and CSRF token."""
        now = self.clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            created=now,
            last_seen=now,
            token=token,
            can_write=can_write,
        )
        with self._lock:
            table = self._table(session)
            while table:  # drop the expired ones at the old end first, then the least recently used
                oldest = next(iter(table.values()))
                if not (self._expired(oldest, now) or len(table) >= self.max_sessions):
                    break
                del table[oldest.id]
            table[session.id] = session
        return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._signed_in.pop(session_id, None)
            self._anonymous.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._signed_in) + len(self._anonymous)

    def counts(self) -> tuple[int, int]:
        """(signed-in, anonymous) sessions held."""
        with self._lock:
            return len(self._signed_in), len(self._anonymous)


class _Entry:
    def __init__(self, client: RetrievalClient) -> None:
        self.client, self.users, self.evicted = client, 0, False


class Clients:
    """A bounded LRU cache of RetrievalClients, one per token (gRPC channels are thread-safe and
    meant to be shared). An evicted client's channel is closed once no request uses it any more."""

    def __init__(self, address: str, tls: bool | str, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.address, self.tls, self.max_clients = address, tls, max(1, max_clients)
        self._entries: OrderedDict[str | None, _Entry] = OrderedDict()
        self._by_client: dict[int, _Entry] = {}
        self._lock = threading.Lock()

    def acquire(self, token: str | None) -> RetrievalClient:
        """The client of `token`, held until release()."""
        closing = []
        with self._lock:
            entry = self._entries.get(token)
            if entry is None:
                entry = _Entry(RetrievalClient(self.address, token=token, tls=self.tls, timeout=120))
                self._entries[token] = entry
                self._by_client[id(entry.client)] = entry
                while len(self._entries) > self.max_clients:
                    _token, old = self._entries.popitem(last=False)
                    old.evicted = True
                    if not old.users:
                        closing.append(self._forget(old))
            self._entries.move_to_end(token)
            entry.users += 1
        for client in closing:
            client.close()
        return entry.client

    def _forget(self, entry: _Entry) -> RetrievalClient:
        self._by_client.pop(id(entry.client), None)
        return entry.client

    def release(self, client: RetrievalClient) -> None:
        with self._lock:
            entry = self._by_client.get(id(client))
            if entry is None:
                return
            entry.users -= 1
            done = entry.evicted and not entry.users
            if done:
                self._forget(entry)
        if done:
            client.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            entries = list(self._by_client.values())
            self._entries.clear()
            self._by_client.clear()
        for entry in entries:
            entry.client.close()
