"""The search service re-ranks a compressed index's candidates exactly (plugins/laion_search/reader.py
RunIndex.search_vector), on runs whose index build_index built and grew here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from laion_search.reader import RunIndex

from stages.index.build import RECALL_TARGET, IndexSettings, build_indexes
from stages.layout import RunLayout

PQ_KEY = "OPQ8_32,IVF16,PQ8"  # compressed codes that alone miss the recall target here


def mixture(n: int, seed: int, dim: int = 64, clusters: int = 300) -> np.ndarray:
    """Unit vectors around ``clusters`` centres (the same centres for every ``seed``)."""
    centers = np.random.default_rng(0).normal(size=(clusters, dim))
    rng = np.random.default_rng(seed)
    vectors = centers[rng.integers(clusters, size=n)] + 0.1 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype("float32")


def add_partition(layout: RunLayout, number: int, vectors: np.ndarray) -> None:
    """One embedding partition as clip_embeddings writes it: float16 rows and their metadata."""
    for sub in ("img_emb", "text_emb"):
        Path(layout.curated_files(sub)).mkdir(parents=True, exist_ok=True)
        np.save(Path(layout.curated_files(sub), f"{sub}_{number:05d}.npy"), vectors.astype("float16"))
    keys = [f"{number:05d}{i:05d}" for i in range(len(vectors))]
    Path(layout.curated_files("metadata")).mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_path": keys, "caption": keys, "url": keys}).to_parquet(
        Path(layout.curated_files("metadata"), f"metadata_{number:05d}.parquet")
    )


def exact_top(stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ stored.astype("float16").astype("float32").T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(index: RunIndex, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    found = [[index.rows.position(hit.key) for hit in index.search_vector(q, k)] for q in queries]
    return sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found)) / truth.size


def test_search_vector_reranks_to_the_exact_top_10_on_held_out_queries(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    stored = mixture(4000, seed=1)
    for number in range(3):
        add_partition(layout, number, stored[number * 1000 : (number + 1) * 1000])
    built = build_indexes(layout, IndexSettings(index_key=PQ_KEY), recall_queries=500)["image"]
    assert built["rerank_k"] > 10

    queries = mixture(200, seed=2)  # not rows of the index
    truth = exact_top(stored[:3000], queries, 10)
    reranked = RunIndex(str(tmp_path))
    with_rerank = recall(reranked, queries, truth)
    alone = RunIndex(str(tmp_path))
    alone.built["image"]["rerank_k"] = 10  # the same index, its codes alone
    without = recall(alone, queries, truth)
    assert without < RECALL_TARGET - 0.05 and with_rerank >= 0.95
    assert with_rerank > without + 0.1
    # The scores are the exact inner products of the stored (float16) rows.
    hits = reranked.search_vector(queries[0], 10)
    exact = stored[[reranked.rows.position(h.key) for h in hits]].astype("float16").astype("float32") @ queries[0]
    assert [h.score for h in hits] == pytest.approx(exact.tolist(), abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # More results ask for proportionally more candidates.
    truth_30 = exact_top(stored[:3000], queries[:50], 30)
    assert recall(reranked, queries[:50], truth_30, k=30) >= 0.95

    add_partition(layout, 3, stored[3000:])  # a new batch: its rows follow the index's
    grown = build_indexes(layout, IndexSettings(index_key=PQ_KEY), recall_queries=500)["image"]
    assert (grown["action"], grown["ntotal"]) == ("added", 4000) and grown["rerank_k"] > 10
    after = RunIndex(str(tmp_path))
    assert recall(after, queries, exact_top(stored, queries, 10)) >= 0.95


def test_a_run_whose_npy_files_no_longer_match_its_index_is_refused_by_name(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    add_partition(layout, 0, mixture(3000, seed=3))
    build_indexes(layout, IndexSettings(index_key=PQ_KEY), recall_queries=300)
    np.save(Path(layout.curated_files("img_emb"), "img_emb_00000.npy"), mixture(2000, seed=3).astype("float16"))
    with pytest.raises(ValueError, match="hold 2000 rows, the image index 3000: rerun build_index"):
        RunIndex(str(tmp_path)).index  # noqa: B018
    Path(layout.curated_files("img_emb"), "img_emb_00000.npy").unlink()
    with pytest.raises(FileNotFoundError, match="lacks img_emb_00000.npy, which the index holds"):
        RunIndex(str(tmp_path)).index  # noqa: B018
