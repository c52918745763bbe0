"""Near-duplicate groups past one k-means cluster: planted pairs among random vectors."""

from __future__ import annotations

import numpy as np

from stages.curate.near_duplicates import CLUSTER_SIZE, cluster_count, find_groups


def test_planted_near_duplicates_and_identical_bytes_are_found_across_many_clusters() -> None:
    rng = np.random.default_rng(5)
    n, dim = 3 * CLUSTER_SIZE + 500, 24
    vectors = rng.normal(size=(n, dim)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    near = [(10, 4000), (1234, 6111), (2500, 2501)]  # b is a with a little noise
    for a, b in near:
        vectors[b] = vectors[a] + 0.002 * rng.normal(size=dim)
    hashes = rng.integers(0, 2**62, size=n)
    same_bytes = [(77, 5555)]  # unrelated embeddings, one content hash
    for a, b in same_bytes:
        hashes[b] = hashes[a]
    hashes[100] = -1  # no hash: never joined by it
    hashes[101] = -1
    assert cluster_count(n) == 4

    def blocks():
        for start in range(0, n, 1000):
            yield start, vectors[start : start + 1000]

    groups, cosines = find_groups(n, dim, blocks, lambda positions: vectors[positions], hashes, threshold=0.99)
    roots = groups.roots()
    joined = {tuple(sorted(pair)) for pair in cosines}
    assert joined == {tuple(sorted(p)) for p in near + same_bytes}
    for a, b in near + same_bytes:
        assert roots[a] == roots[b] == min(a, b)
    assert len(set(roots.tolist())) == n - len(near) - len(same_bytes)
    assert cosines[(77, 5555)] == 1.0 and all(0.99 <= cosines[p] <= 1.0 for p in near)
