"""Near-duplicate groups: every stored item is linked to those of its nearest items at least
`min_score` similar, and linked items form a group (connected components, with union-find).

One pass over the stored items in chunks: each chunk's embeddings are searched in the backend (FAISS,
on the GPU when it has one, or Milvus), and its links are merged at once, so memory holds the union-find
arrays (two numbers per item) and one chunk of search results, whatever the number of items.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .backend import Backend

CHUNK = 4096


@dataclass(frozen=True)
class Group:
    rows: np.ndarray  # (m,) int64 store rows, m >= 2
    scores: np.ndarray  # (m,) float32: each member's highest similarity to another member


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of x, halving the paths it walks."""
    x = x.copy()
    while True:
        up = parent[x]
        if np.array_equal(up, x):
            return x
        parent[x] = parent[up]
        x = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of each pair (a[i], b[i]), all pairs at once: the larger root of each pair
    is hooked under the smaller (parent[x] <= x throughout), until every pair shares a root."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def duplicate_groups(backend: Backend, min_score: float, max_neighbors: int) -> Iterator[Group]:
    """The groups, largest first (ties by smallest row)."""
    all_rows = np.concatenate([c.rows for c in backend.embeddings(chunk=CHUNK)] or [np.zeros(0, np.int64)])
    all_rows.sort()
    parent = np.arange(len(all_rows))
    best = np.full(len(all_rows), -np.inf, np.float32)
    for chunk in backend.embeddings(chunk=CHUNK):
        scores, rows = backend.neighbors(chunk.vectors, max_neighbors + 1)  # + itself
        me = np.repeat(np.searchsorted(all_rows, chunk.rows), rows.shape[1])
        found = np.searchsorted(all_rows, rows.reshape(-1)).clip(0, len(all_rows) - 1)
        link = (scores.reshape(-1) >= min_score) & (rows.reshape(-1) >= 0) & (all_rows[found] == rows.reshape(-1))
        link &= found != me
        a, b, s = me[link], found[link], scores.reshape(-1)[link]
        np.maximum.at(best, a, s)
        np.maximum.at(best, b, s)
        _union(parent, a, b)
    roots = _find(parent, np.arange(len(all_rows)))
    members = np.flatnonzero(np.bincount(roots, minlength=len(all_rows))[roots] >= 2)
    if not len(members):
        return
    by_root = members[np.argsort(roots[members], kind="stable")]
    starts = np.flatnonzero(np.r_[True, roots[by_root][1:] != roots[by_root][:-1]])
    groups = np.split(by_root, starts[1:])
    for g in sorted(groups, key=lambda g: (-len(g), all_rows[g[0]])):
        yield Group(all_rows[g], best[g])
