"""Which unlabelled items to label next, for a small labelling budget.

With few labels, which examples get labelled matters as much as the encoder: typical examples of
regions that hold no label first (TypiClust, Hacohen et al., ICML 2022), and once labels exist,
also the examples the InstDisc vote is least sure about, weighted by typicality so that outliers,
whose votes are always unsure, do not take the budget. Uncertainty joins only once there are
`uncertain_from` labelled items per label: below that, covering the clusters is worth more (the
low-budget regime of TypiClust; switching to uncertainty later is TCM, Doucet et al. 2023). On
CIFAR-10 with the pretrained encoder (10 seeds), TYPICAL alone was 7.1, 5.1, 5.2 and 3.1 points above
random at 10, 20, 50 and 100 labels, and half UNCERTAIN from the first label 0.9-6.0 points below
random at 20-100 (bench/label_budget.py).

    candidates  a deterministic sample of at most `sample` unlabelled items (seeded keys per row)
    clusters    FAISS spherical k-means of the candidates and the labelled items together (TypiClust
                clusters all data), K = labelled + n (at most the points), best of 3 seeded starts;
                a cluster is covered when it holds a labelled item
    typicality  1 / mean distance to the 20 nearest members of the own cluster (among up to 1,000)
    TYPICAL     the most typical candidate of each cluster without a labelled item, largest first:
                all n below `uncertain_from` labels per label, at most half of them from there on
    UNCERTAIN   the rest: (1 - margin of the vote's top two shares) x typicality / its maximum
Cost: one pass over the unlabelled embeddings; k-means and typicality on the sample and the labelled
items ((sample + labelled) x K and x 1,000 dot products); the vote for the sample. Memory: the sample
and the labelled embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .backend import Backend

TYPICAL, UNCERTAIN = 0, 1
TYPICALITY_NEIGHBOURS = 20
TYPICALITY_REFERENCE = 1000
KMEANS_ITERATIONS = 20
KMEANS_RESTARTS = 3  # best of 3 seeded starts: one unlucky start can merge two clusters and split another
CHUNK = 4096


@dataclass(frozen=True)
class Suggested:
    row: int
    reason: int  # TYPICAL or UNCERTAIN
    score: float
    predicted_label: str  # "" without labelled items
    margin: float


@dataclass(frozen=True)
class Suggestions:
    items: list[Suggested]  # best first
    candidates: int
    clusters: int


def _keys(rows: np.ndarray, seed: int) -> np.ndarray:
    """A well-mixed 64-bit key per row (splitmix64 of row and seed): the sample is the smallest keys."""
    x = rows.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_unlabelled(backend: Backend, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, vectors) of at most `sample` items without a human label, chosen by seeded keys
    (the same for the same store and seed), in row order; memory stays at the sample plus a chunk."""
    rows, vectors, keys = np.zeros(0, np.int64), None, np.zeros(0, np.uint64)
    for chunk in backend.embeddings(labelled=False, chunk=CHUNK):
        rows = np.concatenate([rows, chunk.rows])
        vectors = chunk.vectors if vectors is None else np.concatenate([vectors, chunk.vectors])
        keys = np.concatenate([keys, _keys(chunk.rows, seed)])
        if len(rows) > sample:
            keep = np.sort(np.argpartition(keys, sample - 1)[:sample])
            rows, vectors, keys = rows[keep], vectors[keep], keys[keep]
    return rows, (vectors if vectors is not None else np.zeros((0, 0), np.float32))


def typicality(vectors: np.ndarray, assignment: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """1 / mean Euclidean distance to the 20 nearest members of the own cluster (for L2-normalised
    vectors, |a - b|² = 2 - 2 a·b), measured against up to 1,000 members of each cluster."""
    out = np.zeros(len(vectors), np.float32)
    rng = np.random.default_rng(seed)
    for c in range(clusters):
        members = np.flatnonzero(assignment == c)
        if len(members) < 2:
            continue  # a lone point is typical of nothing (typicality 0)
        reference = (
            members
            if len(members) <= TYPICALITY_REFERENCE
            else np.sort(rng.choice(members, TYPICALITY_REFERENCE, replace=False))
        )
        sims = vectors[members] @ vectors[reference].T
        sims[members[:, None] == reference[None, :]] = -np.inf  # not itself
        k = min(TYPICALITY_NEIGHBOURS, max(1, len(reference) - 1))
        top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
        distance = np.sqrt(np.clip(2.0 - 2.0 * np.where(np.isfinite(top), top, 1.0), 0.0, None)).mean(axis=1)
        out[members] = 1.0 / (distance + 1e-6)
    return out


def suggest(backend: Backend, n: int, seed: int, sample: int, k: int, tau: float, uncertain_from: int) -> Suggestions:
    """Up to n suggestions (fewer when fewer items are unlabelled); see the module docstring."""
    rows, vectors = sample_unlabelled(backend, sample, seed)
    labelled: list[np.ndarray] = []
    names: set[str] = set()  # the labels in use: uncertainty joins at uncertain_from items per label
    for chunk in backend.embeddings(labelled=True, chunk=CHUNK):
        labelled.append(chunk.vectors)
        names.update(chunk.labels)
    labelled_vectors = np.concatenate(labelled) if labelled else np.zeros((0, vectors.shape[1]), np.float32)
    # TypiClust clusters the labelled items with the candidates: a cluster is covered when it holds one.
    points = np.ascontiguousarray(np.concatenate([vectors, labelled_vectors]))
    clusters = min(len(points), len(labelled_vectors) + n)
    kmeans = faiss.Kmeans(
        vectors.shape[1],
        clusters,
        niter=KMEANS_ITERATIONS,
        nredo=KMEANS_RESTARTS,
        seed=seed % 2**31,
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, len(points)),
    )
    kmeans.train(points)
    everywhere = kmeans.index.search(points, 1)[1][:, 0]
    assignment, covered = everywhere[: len(rows)], set(everywhere[len(rows) :].tolist())
    typical = typicality(points, everywhere, clusters, seed)[: len(rows)]
    sizes = np.bincount(everywhere, minlength=clusters)

    vote_label, margins = [""] * len(rows), np.ones(len(rows), np.float32)
    if len(labelled_vectors):
        for start in range(0, len(rows), CHUNK):
            vote = backend.vote(vectors[start : start + CHUNK], k, tau)
            top = -np.sort(-vote.shares, axis=1)
            second = top[:, 1] if top.shape[1] > 1 else np.zeros(len(top))
            margins[start : start + CHUNK] = top[:, 0] - second
            vote_label[start : start + CHUNK] = [vote.classes[c] for c in vote.shares.argmax(axis=1)]

    def pick(i: int, reason: int, score: float) -> Suggested:
        return Suggested(int(rows[i]), reason, float(score), vote_label[i], float(margins[i]))

    chosen: list[Suggested] = []
    taken = np.zeros(len(rows), bool)
    order = sorted(range(clusters), key=lambda c: (-sizes[c], c))
    uncertain = len(labelled_vectors) > 0 and len(labelled_vectors) >= uncertain_from * len(names)
    typical_budget = (n + 1) // 2 if uncertain else n
    for c in (c for c in order if c not in covered and sizes[c]):  # the most typical of each uncovered cluster
        if len(chosen) == typical_budget:
            break
        members = np.flatnonzero(assignment == c)
        best = members[np.argmax(typical[members])]
        chosen.append(pick(best, TYPICAL, typical[best]))
        taken[best] = True
    if len(chosen) < n and uncertain:
        score = (1.0 - margins) * typical / max(float(typical.max()), 1e-12)
        for i in np.lexsort((rows, -score)):  # highest score first, ties by row
            if len(chosen) == n:
                break
            if not taken[i]:
                chosen.append(pick(i, UNCERTAIN, score[i]))
                taken[i] = True
    while len(chosen) < n and not taken.all():  # the next most typical, cluster by cluster
        for c in order:
            members = np.flatnonzero((assignment == c) & ~taken)
            if len(members) and len(chosen) < n:
                best = members[np.argmax(typical[members])]
                chosen.append(pick(best, TYPICAL, typical[best]))
                taken[best] = True
    return Suggestions(chosen, len(rows), clusters)
