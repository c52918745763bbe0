"""Near-duplicate images by embedding, on k-means clusters (SemDeDup's scheme).

The image embeddings are clustered with faiss k-means trained on a sample; each vector is
assigned to its nearest centroid in a streamed pass; within each cluster, pairs whose
cosine is at least the threshold are joined into groups (transitively). Only one cluster's
vectors are in memory at a time, so the search scales past memory: what is held for the
whole dataset is one int32 cluster id and one int64 hash prefix per sample. Pairs split
by a cluster boundary are not found (SemDeDup's own trade-off).

Byte-identical images (same sha256 of the bytes as served) are always one group,
whichever clusters they fall in: they are joined by the first 64 bits of their hash before
the clusters are searched.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

# Vectors per k-means cluster: clusters are searched exhaustively, so their size bounds the
# work (a cluster of m vectors costs m^2 dot products) and the memory of one search.
CLUSTER_SIZE = 2000
MAX_CLUSTERS = 65536
TRAIN_PER_CLUSTER = 64  # k-means training sample per centroid (faiss warns below 39)
SEED = 1234


class Groups:
    """Union-find over sample positions 0..n-1."""

    def __init__(self, n: int) -> None:
        import numpy as np

        self.parent = np.arange(n, dtype="int64")

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return int(root)

    def roots(self) -> Any:
        """Each position's group root (the group's least position), by pointer jumping."""
        import numpy as np

        parent = self.parent.copy()
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                return parent
            parent = jumped

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def hash_prefix(sha256: Sequence[str | None]) -> Any:
    """The first 64 bits of each hex digest as an int64 (-1 where there is none)."""
    import numpy as np

    out = np.full(len(sha256), -1, dtype="int64")
    for i, digest in enumerate(sha256):
        if digest:
            out[i] = int(digest[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF
    return out


def cluster_count(n: int) -> int:
    return max(1, min(MAX_CLUSTERS, math.ceil(n / CLUSTER_SIZE)))


def find_groups(
    n: int,
    dim: int,
    blocks: Callable[[], Any],
    take: Callable[[Any], Any],
    hashes: Any,
    threshold: float,
) -> tuple[Groups, dict[tuple[int, int], float]]:
    """Group the ``n`` candidate samples whose image embeddings have cosine >= ``threshold``,
    or the same content hash.

    ``blocks()`` yields (first position, float32 block of rows) over all ``n`` rows in
    order; ``take(positions)`` returns the float32 rows at sorted ``positions``. Returns
    the groups and, for each joined pair, its cosine (1.0 for byte-identical images).
    """
    import faiss
    import numpy as np

    groups = Groups(n)
    cosines: dict[tuple[int, int], float] = {}
    # Byte-identical images: one group, wherever their embeddings fall.
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    same = np.flatnonzero((sorted_hashes[1:] == sorted_hashes[:-1]) & (sorted_hashes[1:] >= 0))
    for i in same.tolist():  # one step per duplicate, not per sample
        a, b = int(order[i]), int(order[i + 1])
        groups.join(a, b)
        cosines[(min(a, b), max(a, b))] = 1.0
    if n < 2:
        return groups, cosines

    k = cluster_count(n)
    assignment = np.zeros(n, dtype="int32")
    if k > 1:
        rng = np.random.default_rng(SEED)
        sample = np.sort(rng.choice(n, size=min(n, k * TRAIN_PER_CLUSTER), replace=False))
        train = normalized(take(sample))
        kmeans = faiss.Kmeans(dim, k, niter=20, seed=SEED, spherical=True, verbose=False)
        kmeans.train(train)
        for start, block in blocks():
            _, nearest = kmeans.index.search(normalized(block), 1)
            assignment[start : start + len(block)] = nearest[:, 0]
    members = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[members], np.arange(k + 1))
    for c in range(k):
        positions = members[bounds[c] : bounds[c + 1]]
        if len(positions) < 2:
            continue
        vectors = normalized(take(positions))
        similar = vectors @ vectors.T
        rows, cols = np.nonzero(np.triu(similar >= threshold, k=1))
        for r, col in zip(rows.tolist(), cols.tolist()):
            a, b = int(positions[r]), int(positions[col])
            groups.join(a, b)
            key = (min(a, b), max(a, b))
            cosines[key] = max(cosines.get(key, -1.0), min(1.0, float(similar[r, col])))  # float32 rounding past 1
    log.info("Near duplicates: %d candidates in %d clusters, %d similar pairs", n, k, len(cosines))
    return groups, cosines


def normalized(vectors: Any) -> Any:
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype="float32")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
