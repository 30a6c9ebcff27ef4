"""The review page's proposals: one snapshot of the LabelCorpus stream per page process, sorted once,
served a page at a time, and told of the page's own writes.

LabelCorpus classifies every unlabelled item on each call, about 20 s for 99k proposals (1k human
labels, 2 CPU cores): far too slow for each page request, and a page must not send 100k cards. So
the page process computes it in a background thread (a page waits up to a second for it, then shows
its progress), keeps the proposals in arrays (about 100 bytes each) sorted by (confidence, id), and
answers every page, filter and count from them with a cursor and numpy masks. The store can change
meanwhile: the page's own writes (accept, relabel, reject, delete) update each proposal's state at
once, a page's cards are checked against the store (Get) when shown, and a snapshot computed before
the labels or items changed is stale. A stale snapshot is recomputed on the next visit when the last
one took under `auto_refresh_s`; otherwise the page says so and the person asks for it (at 100k
that is 20 s of the server's CPU per recompute, not something to start on every accept).

A rejection has no place in the store (the service drops a stored prediction, and LabelCorpus
proposes the same label again), so the process remembers it: a rejected (id, label) stays hidden
from later snapshots of this process while the proposal stays the same.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from retrieval_client import RetrievalError, ServerInfo, StoredItem

from .sessions import Clients

OPEN, ACCEPTED, RELABELLED, REJECTED, GONE = range(5)
STATES = ("open", "accepted", "relabelled", "rejected", "gone")
SHOW = ("open", "decided", "all")  # which proposals a view lists
ORDERS = ("lowest", "highest")  # confidence first
DEFAULT_ACCEPT_SHARE = 0.25  # the default "accept all >=" threshold: what the top quarter of a view reaches
AUTO_REFRESH_S = 2.0  # a stale snapshot that took less than this is recomputed without asking
SLOW_WAIT_S = 1.0  # a page waits this long for a computation that may be long, then shows its progress
QUICK_WAIT_S = 10.0  # and this long for one expected to be quick (the last took under AUTO_REFRESH_S)

Cursor = tuple[float, str]  # (confidence, id) of a proposal: a page starts after, or ends before, one


def version_of(info: ServerInfo) -> tuple:
    """What a snapshot's proposals depend on: the items and the human labels (their counts)."""
    return info.item_count, info.labelled_count, tuple(sorted(info.label_counts.items()))


def cursor_text(cursor: Cursor) -> str:
    """A cursor as a query parameter: "confidence id" (the float's repr reads back exactly)."""
    return f"{cursor[0]!r} {cursor[1]}"


def default_threshold(confidences: np.ndarray, share: float = DEFAULT_ACCEPT_SHARE) -> float | None:
    """The confidence that the top `share` of the proposals reach, rounded down to 0.001 (so at
    least that share qualify, and never a threshold that no proposal reaches); None without any."""
    if not len(confidences):
        return None
    reached = float(np.quantile(confidences, 1.0 - share, method="lower"))
    return math.floor(reached * 1000) / 1000


@dataclass(frozen=True)
class View:
    """Which proposals a page lists: one predicted label ("": all), a confidence range, which states."""

    label: str = ""
    low: float = 0.0
    high: float = 1.0
    show: str = "open"


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    confidence: float
    state: str


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    first: int  # 1-based rank of the first row among the proposals of the view (0: no row)
    total: int  # proposals in the view
    after: Cursor | None  # where the next page starts (None: this is the last)
    before: Cursor | None  # where the previous page ends (None: this is the first)


class Snapshot:
    """The proposals of one LabelCorpus stream and what the page has done with them since."""

    def __init__(
        self,
        number: int,
        proposals: tuple[list[str], list[str], list[float]],
        version: tuple,
        seconds: float,
        rejected: dict[str, str],
    ) -> None:
        ids, labels, confidences = proposals
        self.number, self.version, self.seconds, self.computed_at = number, version, seconds, time.time()
        self.ids = ids
        self.label_names = sorted(set(labels))
        code_of = {name: code for code, name in enumerate(self.label_names)}
        self.codes = np.fromiter((code_of[label] for label in labels), np.int32, len(labels))
        self.confidence = np.asarray(confidences, np.float32)
        self._keys = self.confidence.tolist()  # as Python floats: the cursors' confidences compare exactly
        self.order = np.array(sorted(range(len(ids)), key=self._key), np.int64)
        self.position = {item_id: n for n, item_id in enumerate(ids)}
        self.state = np.full(len(ids), OPEN, np.int8)
        self.rejected = {i: lab for i, lab in rejected.items() if self.label_of(i) == lab}  # still proposed
        for item_id in self.rejected:
            self.state[self.position[item_id]] = REJECTED
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def _key(self, n: int) -> Cursor:
        return self._keys[n], self.ids[n]

    def label_of(self, item_id: str) -> str | None:
        n = self.position.get(item_id)
        return None if n is None else self.label_names[self.codes[n]]

    def _mask(self, view: View) -> np.ndarray:
        """Which proposals (by position) the view lists."""
        mask = (self.confidence >= view.low) & (self.confidence <= view.high)
        if view.label:
            code = bisect.bisect_left(self.label_names, view.label)
            if code == len(self.label_names) or self.label_names[code] != view.label:
                return np.zeros(len(self), bool)
            mask &= self.codes == code
        if view.show == "open":
            mask &= self.state == OPEN
        elif view.show == "decided":
            mask &= (self.state != OPEN) & (self.state != GONE)
        else:
            mask &= self.state != GONE
        return mask

    def _row(self, n: int) -> Row:
        return Row(self.ids[n], self.label_names[self.codes[n]], self._keys[n], STATES[self.state[n]])

    def row(self, item_id: str) -> Row:
        return self._row(self.position[item_id])

    def page(
        self, view: View, order: str, size: int, after: Cursor | None = None, before: Cursor | None = None
    ) -> Page:
        """`size` proposals of the view in `order` ("lowest" or "highest" confidence first, then by
        id): the first ones, those after a cursor, or those before one (the first page when fewer
        than `size` come before it). The cursors hold when the states change between pages."""
        seq = self.order if order == "lowest" else self.order[::-1]
        listed = self._mask(view)[seq]
        if after is not None:
            start = self._start_after(after, order)
            shown = np.flatnonzero(listed[start:])[:size] + start
        elif before is not None:
            shown = np.flatnonzero(listed[: self._end_before(before, order)])[-size:]
            if len(shown) < size:
                shown = np.flatnonzero(listed)[:size]
        else:
            shown = np.flatnonzero(listed)[:size]
        total = int(listed.sum())
        if not len(shown):
            return Page([], 0, total, None, None)
        first = int(listed[: shown[0]].sum()) + 1
        more = bool(listed[shown[-1] + 1 :].any())
        return Page(
            rows=[self._row(seq[i]) for i in shown],
            first=first,
            total=total,
            after=self._key(seq[shown[-1]]) if more else None,
            before=self._key(seq[shown[0]]) if first > 1 else None,
        )

    def _start_after(self, cursor: Cursor, order: str) -> int:
        if order == "lowest":
            return bisect.bisect_right(self.order, cursor, key=self._key)
        return len(self) - bisect.bisect_left(self.order, cursor, key=self._key)

    def _end_before(self, cursor: Cursor, order: str) -> int:
        if order == "lowest":
            return bisect.bisect_left(self.order, cursor, key=self._key)
        return len(self) - bisect.bisect_right(self.order, cursor, key=self._key)

    def _open(self, view: View) -> np.ndarray:
        return self._mask(dataclasses.replace(view, show="open"))

    def open_at_least(self, view: View, threshold: float) -> list[tuple[str, str]]:
        """(id, label) of the view's open proposals with confidence >= threshold."""
        chosen = np.flatnonzero(self._open(view) & (self.confidence >= threshold))
        return [(self.ids[n], self.label_names[self.codes[n]]) for n in chosen.tolist()]

    def open_confidences(self, view: View) -> np.ndarray:
        return self.confidence[self._open(view)]

    # -- what happened to the proposals since ------------------------------------------------------
    def _set(self, item_id: str, state: int) -> None:
        n = self.position.get(item_id)
        if n is not None:
            self.state[n] = state

    def record_labels(self, labels: dict[str, str]) -> None:
        """Human labels set (or cleared, ""): the proposal is accepted, relabelled or open again."""
        with self._lock:
            for item_id, label in labels.items():
                proposed = self.label_of(item_id)
                if proposed is not None:
                    self.rejected.pop(item_id, None)
                    self._set(item_id, OPEN if not label else ACCEPTED if label == proposed else RELABELLED)

    def record_rejected(self, ids: Iterable[str]) -> None:
        with self._lock:
            for item_id in ids:
                proposed = self.label_of(item_id)
                if proposed is not None:
                    self.rejected[item_id] = proposed
                    self._set(item_id, REJECTED)

    def record_deleted(self, ids: Iterable[str]) -> None:
        with self._lock:
            for item_id in ids:
                self.rejected.pop(item_id, None)
                self._set(item_id, GONE)

    def checked(self, page: Page, stored: list[StoredItem]) -> Page:
        """`page` with the states its rows have once the store's answer (Get of their ids) is known."""
        ids = [row.id for row in page.rows]
        self.reconcile(ids, stored)
        return dataclasses.replace(page, rows=[self.row(i) for i in ids])

    def reconcile(self, asked: list[str], stored: list[StoredItem]) -> None:
        """What the store says of the shown proposals (Get): deleted ones are gone, a human label
        given elsewhere decides an open proposal, a cleared one opens a decided one again."""
        found = {item.id: item for item in stored}
        with self._lock:
            for item_id in asked:
                n, item = self.position.get(item_id), found.get(item_id)
                if n is None:
                    continue
                if item is None:
                    self.state[n] = GONE
                elif item.label and self.state[n] in (OPEN, REJECTED):
                    self.state[n] = ACCEPTED if item.label == self.label_names[self.codes[n]] else RELABELLED
                    self.rejected.pop(item_id, None)
                elif not item.label and self.state[n] in (ACCEPTED, RELABELLED):
                    self.state[n] = OPEN


class Job:
    """One LabelCorpus stream being read into a snapshot."""

    def __init__(self, version: tuple, expected: int) -> None:
        self.version, self.expected = version, expected
        self.received = 0
        self.error: str | None = None
        self.started = time.monotonic()
        self.finished = threading.Event()

    def progress(self) -> dict:
        return {
            "computing": not self.finished.is_set(),
            "received": self.received,
            "expected": self.expected,
            "error": self.error,
        }


class Proposals:
    """The page process's current snapshot, the job computing the next one, and the rejections."""

    def __init__(self, clients: Clients, auto_refresh_s: float = AUTO_REFRESH_S) -> None:
        self.clients, self.auto_refresh_s = clients, auto_refresh_s
        self.snapshot: Snapshot | None = None
        self.job: Job | None = None
        self._rejected: dict[str, str] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()

    def stale(self, info: ServerInfo) -> bool:
        return self.snapshot is not None and self.snapshot.version != version_of(info)

    def refresh(self, info: ServerInfo, token: str | None, force: bool = False) -> Job | None:
        """Start computing a snapshot (LabelCorpus with `token`) when there is none, when asked, or
        when the current one is stale and took under auto_refresh_s; the job running, if any."""
        with self._lock:
            if self.job is not None and not self.job.finished.is_set():
                return self.job
            snapshot = self.snapshot
            quick_and_stale = self.stale(info) and snapshot is not None and snapshot.seconds < self.auto_refresh_s
            if not (force or snapshot is None or quick_and_stale):
                return None
            job = self.job = Job(version_of(info), info.item_count - info.labelled_count)
        threading.Thread(target=self._compute, args=(job, token), name="review-proposals", daemon=True).start()
        return job

    def wait(self, job: Job) -> None:
        """Wait for `job` as long as a page should: briefly, unless the last computation was quick."""
        snapshot = self.snapshot
        quick = snapshot is not None and snapshot.seconds < self.auto_refresh_s
        job.finished.wait(QUICK_WAIT_S if quick else SLOW_WAIT_S)

    def _compute(self, job: Job, token: str | None) -> None:
        client = self.clients.acquire(token)
        ids: list[str] = []
        labels: list[str] = []
        confidences: list[float] = []
        try:
            for proposal in client.label_corpus():
                ids.append(proposal.id)
                labels.append(proposal.label)
                confidences.append(proposal.confidence)
                job.received += 1
            with self._lock:
                number, seconds = next(self._numbers), time.monotonic() - job.started
                snapshot = Snapshot(number, (ids, labels, confidences), job.version, seconds, self._rejected)
                self.snapshot, self._rejected = snapshot, snapshot.rejected
        except RetrievalError as exc:
            job.error = str(exc)
        except Exception as exc:  # a bug: said on the page, and the traceback goes to the log
            job.error = f"computing the proposals failed: {exc}"
            raise
        finally:
            self.clients.release(client)
            job.finished.set()

    def record_labels(self, labels: dict[str, str]) -> None:
        with self._lock:
            if self.snapshot is not None:
                self.snapshot.record_labels(labels)

    def record_rejected(self, ids: Iterable[str]) -> None:
        with self._lock:
            if self.snapshot is not None:
                self.snapshot.record_rejected(ids)

    def record_deleted(self, ids: Iterable[str]) -> None:
        with self._lock:
            if self.snapshot is not None:
                self.snapshot.record_deleted(ids)
