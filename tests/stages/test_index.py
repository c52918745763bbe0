"""autofaiss through our index stage, on clustered vectors (never uniform noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.index import build_indexes


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    vectors = centers[rng.integers(clusters, size=n)] + 0.1 * rng.normal(size=(n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype("float32")


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    root = tmp_path / "embeddings"
    for sub, seed in (("img_emb", 1), ("text_emb", 2)):
        (root / sub).mkdir(parents=True)
        vectors = clustered(3000, 64, 300, seed)
        np.save(root / sub / f"{sub}_0.npy", vectors[:1500])
        np.save(root / sub / f"{sub}_1.npy", vectors[1500:])
    return root


def test_opq_pq_index_builds_and_is_measured(embeddings: Path, tmp_path: Path) -> None:
    """The OPQ+PQ path autofaiss picks at tight budgets (broken with faiss-cpu 1.15)."""
    result = build_indexes(str(embeddings), str(tmp_path / "index"), index_key="OPQ16_64,IVF16,PQ16x4", recall_queries=200)
    for name in ("image", "text"):
        assert result[name]["index_key"] == "OPQ16_64,IVF16,PQ16x4"
        assert result[name]["ntotal"] == 3000
        assert 0.3 < result[name]["recall_at_10"] <= 1.0
        assert (tmp_path / "index" / f"{name}.index").stat().st_size == result[name]["size_bytes"]


def test_rebuilds_only_when_embeddings_change(embeddings: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    first = build_indexes(str(embeddings), str(index), recall_queries=100)
    assert first["image"]["recall_at_10"] == pytest.approx(1.0, abs=0.05)
    before = (index / "image.index").read_bytes()
    again = build_indexes(str(embeddings), str(index), recall_queries=100)
    assert again.get("skipped") is True and (index / "image.index").read_bytes() == before
    np.save(embeddings / "img_emb" / "img_emb_2.npy", clustered(10, 64, 2, 3))
    rebuilt = build_indexes(str(embeddings), str(index), recall_queries=100)
    assert not rebuilt.get("skipped") and rebuilt["image"]["ntotal"] == 3010


def test_fewest_probes_is_the_least_nprobe_that_keeps_the_recall_target() -> None:
    import faiss

    from stages.index import exact_neighbours, fewest_probes, recall_of

    vectors = clustered(20_000, 32, 20, seed=3)  # 20 clusters over 128 lists: neighbours span several lists
    quantizer = faiss.IndexFlatIP(32)
    index = faiss.IndexIVFFlat(quantizer, 32, 128, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    sample, truth = exact_neighbours(vectors, queries=300, k=10)

    tuned = fewest_probes(index, sample, truth, "nprobe=128", 0.95)
    probes = int(tuned.split("=")[1])
    assert 1 < probes < 128
    assert recall_of(index, sample, truth, tuned) >= 0.95
    assert recall_of(index, sample, truth, f"nprobe={probes - 1}") < 0.95  # the least that reaches it
    # Parameters beside nprobe are kept; an unreachable target or no nprobe leaves the choice alone.
    assert fewest_probes(index, sample, truth, "nprobe=128,max_codes=0", 0.95) == f"nprobe={probes},max_codes=0"
    assert fewest_probes(index, sample, truth, "nprobe=1", 0.99) == "nprobe=1"
    assert fewest_probes(index, sample, truth, None, 0.95) is None
