"""Unit vectors for index tests: Gaussian clusters, seeded."""

from __future__ import annotations

import numpy as np


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """``n`` unit vectors of ``dim`` around ``clusters`` random centres (noise 0.1), float32."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    vectors = centers[rng.integers(clusters, size=n)] + 0.1 * rng.normal(size=(n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype("float32")
