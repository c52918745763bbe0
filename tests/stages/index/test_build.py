"""autofaiss through our index stage, on clustered vectors (never uniform noise)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.index.build import IndexSettings, build_indexes, exact_neighbours, fewest_probes, recall_of
from stages.layout import RunLayout


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    vectors = centers[rng.integers(clusters, size=n)] + 0.1 * rng.normal(size=(n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype("float32")


@pytest.fixture
def run(tmp_path: Path) -> RunLayout:
    """A run with image and text embeddings in two partitions each."""
    for sub, seed in (("img_emb", 1), ("text_emb", 2)):
        (tmp_path / "embeddings" / sub).mkdir(parents=True)
        vectors = clustered(3000, 64, 300, seed)
        np.save(tmp_path / "embeddings" / sub / f"{sub}_0.npy", vectors[:1500])
        np.save(tmp_path / "embeddings" / sub / f"{sub}_1.npy", vectors[1500:])
    return RunLayout(str(tmp_path))


def test_opq_pq_index_builds_and_is_measured(run: RunLayout) -> None:
    """The OPQ+PQ path autofaiss picks at tight budgets (broken with faiss-cpu 1.15)."""
    result = build_indexes(run, IndexSettings(index_key="OPQ16_64,IVF16,PQ16x4"), recall_queries=200)
    for name in ("image", "text"):
        assert result[name]["index_key"] == "OPQ16_64,IVF16,PQ16x4"
        assert result[name]["ntotal"] == 3000
        assert result[name]["recall_at_10"] > 0.3
        assert Path(run.index, f"{name}.index").stat().st_size == result[name]["size_bytes"]


def test_rebuilds_only_when_embeddings_change(run: RunLayout) -> None:
    first = build_indexes(run, IndexSettings(), recall_queries=100)
    assert first["image"]["recall_at_10"] == pytest.approx(1.0, abs=0.05)
    # The marker keeps its format: what earlier runs wrote stays valid.
    recorded = json.loads(Path(run.index_marker.url).read_text())
    assert recorded == first
    assert {"input_fingerprint", "max_index_memory_usage", "index_key", "recall_target", "image", "text"} == set(recorded)
    before = Path(run.index, "image.index").read_bytes()
    again = build_indexes(run, IndexSettings(), recall_queries=100)
    assert again.get("skipped") is True and Path(run.index, "image.index").read_bytes() == before
    np.save(Path(run.embeddings, "img_emb", "img_emb_2.npy"), clustered(10, 64, 2, 3))
    rebuilt = build_indexes(run, IndexSettings(), recall_queries=100)
    assert not rebuilt.get("skipped") and rebuilt["image"]["ntotal"] == 3010


def test_a_changed_budget_rebuilds(run: RunLayout) -> None:
    build_indexes(run, IndexSettings(), recall_queries=50)
    assert build_indexes(run, IndexSettings(), recall_queries=50).get("skipped") is True
    rebuilt = build_indexes(run, IndexSettings(max_index_memory_usage="2G"), recall_queries=50)
    assert not rebuilt.get("skipped") and run.index_marker.read()["max_index_memory_usage"] == "2G"


def test_fewest_probes_is_the_least_nprobe_that_keeps_the_recall_target() -> None:
    import faiss

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

