"""index: our build_index stage on clustered vectors: build time and memory, recall@10, memory-mapped latency.

Queries are held-out points of the same distribution (not rows of the index), searched one
at a time against the memory-mapped index file, as the search service does; recall@10 is
the overlap with exact inner-product search. Exact (flat) search latency is the reference.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import clustered_vectors
from bench.harness import PY, Bench, env_for_tools, run_json
from bench.sizes import Size
from stages.index.build import IndexSettings

# The DAG's defaults.
MEMORY_BUDGET, MEMORY_AVAILABLE = IndexSettings().max_index_memory_usage, IndexSettings().current_memory_available


def build_and_query(vectors_npy: str, work: str, queries: int) -> dict[str, Any]:
    import faiss

    from stages.index import build as stage

    work_dir = Path(work)
    emb = work_dir / "img_emb"
    emb.mkdir(parents=True, exist_ok=True)
    vectors = np.load(vectors_npy, mmap_mode="r")
    held_out = np.ascontiguousarray(vectors[-queries:])
    np.save(emb / "img_emb_0.npy", vectors[:-queries])
    del vectors
    built = stage.build_one(str(emb), str(work_dir / "index"), "image", max_index_memory_usage=MEMORY_BUDGET,
                            current_memory_available=MEMORY_AVAILABLE, index_key=None, recall_queries=queries,
                            nb_cores=None)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data = np.load(emb / "img_emb_0.npy")
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(data)
    _, truth = exact.search(held_out, 10)
    flat = _latencies(lambda q: exact.search(q, 10), held_out[:200])
    del exact
    index = faiss.read_index(str(work_dir / "index" / "image.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if built.get("index_param"):
        faiss.ParameterSpace().set_index_parameters(index, built["index_param"])
    found = np.stack([index.search(q[None], 10)[1][0] for q in held_out])
    mapped = _latencies(lambda q: index.search(q, 10), held_out)
    return {
        **built,
        "peak_rss_mib": round(peak_mib, 1),
        "recall_at_10": _recall(truth, found),
        "recall_at_10_build": built["recall_at_10"],
        "p50_ms": mapped[0], "p99_ms": mapped[1],
        "flat_p50_ms": flat[0], "flat_p99_ms": flat[1],
    }


def _latencies(search: Any, queries: np.ndarray) -> tuple[float, float]:
    times = []
    for q in queries:
        started = time.perf_counter()
        search(q[None])
        times.append((time.perf_counter() - started) * 1000)
    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


def _recall(truth: np.ndarray, found: np.ndarray) -> float:
    return round(sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist())) / truth.size, 4)


def run(size: Size, work: Path) -> Bench:
    bench = Bench("index", settings={"vectors": list(size.index_vectors), "dim": 512, "queries": size.index_queries,
                                     "max_index_memory_usage": MEMORY_BUDGET, "current_memory_available": MEMORY_AVAILABLE,
                                     "data": "Gaussian mixture on a 64-d subspace (sqrt(n) clusters) + noise, unit norm"})
    cases = {}
    for n in size.index_vectors:
        npy = work / "cache" / f"vectors-{n}.npy"
        if not npy.exists():
            npy.parent.mkdir(parents=True, exist_ok=True)
            np.save(npy, clustered_vectors(n + size.index_queries))
        bench.commands[str(n)] = [PY, "-m", "bench.workers", "build-index", str(npy), str(work / "index" / str(n)),
                                  str(size.index_queries)]
        cases[str(n)] = lambda rep, n=n: run_json(bench.commands[str(n)], env=env_for_tools())
    # An index build is long and its time barely varies: one repetition per size.
    med = bench.interleave(cases, 1)
    for n in size.index_vectors:
        bench.target(f"recall@10 at {n:,} vectors (default budget)", med[str(n)]["recall_at_10"], ">=", 0.95)
    bench.target(f"p50 query at {max(size.index_vectors):,} vectors (ms)", med[str(max(size.index_vectors))]["p50_ms"],
                 "<=", 5.0)
    return bench
