"""Concurrent single-query searches coalesced into one index call, without delaying a lone call.

FAISS answers a batch of B queries in one pass over the vectors (a matrix product), far more cheaply
per query than B searches of one, which each read every vector. Embed's batcher (batcher.py) waits
a few milliseconds for company; a search must not, so this is group commit instead: a call that
finds the index idle runs at once, alone. Calls that arrive while a batch is running queue up; when
that batch ends, the first of them runs every queued call as the next batch (up to `max_batch`) and
hands their results back. A lone call therefore waits for nothing, and under load each index call
carries every query that arrived during the previous one.

Calls are grouped by a key (the search options they share: k, filters, tau); one batch runs one
index call per distinct key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np

R = TypeVar("R")
# (key, queries (B, D), excludes (B,)) -> one result per query, in order
RunBatch = Callable[[Hashable, np.ndarray, np.ndarray], list]


class _Call:
    __slots__ = ("key", "vector", "exclude", "result", "error", "ready", "batch")

    def __init__(self, key: Hashable, vector: np.ndarray, exclude: int) -> None:
        self.key, self.vector, self.exclude = key, vector, exclude
        self.result: object = None
        self.error: BaseException | None = None
        self.ready = threading.Event()  # set when the result is in, or when this call must lead a batch
        self.batch: list[_Call] | None = None  # the batch this call leads


class Coalescer(Generic[R]):
    """`coalescer(key, vector, exclude)` returns what `run(key, vectors, excludes)` gives for that
    query, running it alone when nothing else runs, else in the next batch."""

    def __init__(self, run: RunBatch, max_batch: int) -> None:
        self._run, self._max_batch = run, max_batch
        self._lock = threading.Lock()
        self._running = False
        self._waiting: list[_Call] = []

    def __call__(self, key: Hashable, vector: np.ndarray, exclude: int) -> R:
        call = _Call(key, vector, exclude)
        with self._lock:
            if self._running:
                self._waiting.append(call)
            else:
                self._running, call.batch = True, [call]
        if call.batch is None:
            call.ready.wait()  # a result, or this call now leads the next batch
        if call.batch is not None:
            self._lead(call.batch)
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _lead(self, batch: list[_Call]) -> None:
        """Run `batch`, deliver its results, then hand the waiting calls to the first of them."""
        try:
            self._run_batch(batch)
        finally:
            with self._lock:
                following, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
                if following:
                    following[0].batch = following
                else:
                    self._running = False
            for call in batch:
                if call.batch is None:
                    call.ready.set()
            if following:
                following[0].ready.set()

    def _run_batch(self, batch: list[_Call]) -> None:
        groups: dict[Hashable, list[_Call]] = {}
        for call in batch:
            groups.setdefault(call.key, []).append(call)
        for key, calls in groups.items():
            try:
                results = self._run(
                    key, np.stack([c.vector for c in calls]), np.array([c.exclude for c in calls], dtype=np.int64)
                )
            except Exception as exc:  # noqa: BLE001 - each caller gets the error of its own query's call
                for c in calls:
                    c.error = exc
                continue
            for c, result in zip(calls, results):
                c.result = result
