"""build_index: autofaiss knn indexes over the image and the text embeddings."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any


from stages import storage
from stages.embeddings import fingerprint, load_embeddings

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"
KINDS = {"image": "img_emb", "text": "text_emb"}


def build_indexes(
    embeddings_folder: str,
    index_folder: str,
    *,
    max_index_memory_usage: str = "4G",
    current_memory_available: str = "8G",
    index_key: str | None = None,
    recall_queries: int = 1000,
    nb_cores: int | None = None,
) -> dict[str, Any]:
    """Build ``image.index`` and ``text.index`` (+ their infos) and measure recall@10.

    Rebuilt only when the embeddings or the settings changed (a fingerprint in
    ``_SUCCESS.json``). Each index is built in a local temporary folder and copied to
    its final name only when complete.
    """
    npys = sorted(
        f for kind in KINDS.values() for f in storage.list_files(storage.join(embeddings_folder, kind), "*.npy")
    )
    settings = {"max_index_memory_usage": max_index_memory_usage, "index_key": index_key or None}
    inputs = fingerprint(npys) + repr(sorted(settings.items()))
    marker = storage.join(index_folder, MARKER)
    done = storage.read_json_or_none(marker)
    if done and done.get("input_fingerprint") == inputs:
        log.info("Skipping build_index: %s matches the current embeddings", MARKER)
        return {**done, "skipped": True}

    result: dict[str, Any] = {"input_fingerprint": inputs, **settings}
    for name, sub in KINDS.items():
        result[name] = build_one(
            storage.join(embeddings_folder, sub),
            index_folder,
            name,
            max_index_memory_usage=max_index_memory_usage,
            current_memory_available=current_memory_available,
            index_key=index_key or None,
            recall_queries=recall_queries,
            nb_cores=nb_cores,
        )
    storage.write_json(marker, result)
    return result


def build_one(
    embeddings: str,
    index_folder: str,
    name: str,
    *,
    max_index_memory_usage: str,
    current_memory_available: str,
    index_key: str | None,
    recall_queries: int,
    nb_cores: int | None,
) -> dict[str, Any]:
    from autofaiss import build_index

    vectors = load_embeddings(embeddings)
    if len(vectors) == 0:
        raise ValueError(f"no embeddings under {embeddings}: nothing to index")
    index_key = index_key or flat_key_within_budget(len(vectors), vectors.shape[1], max_index_memory_usage)
    with tempfile.TemporaryDirectory(prefix=f"laion-index-{name}-") as tmp:
        index_path = os.path.join(tmp, f"{name}.index")
        infos_path = os.path.join(tmp, f"{name}_infos.json")
        started = time.monotonic()
        index, infos = build_index(
            embeddings=embeddings,
            index_path=index_path,
            index_infos_path=infos_path,
            index_key=index_key,
            max_index_memory_usage=max_index_memory_usage,
            current_memory_available=current_memory_available,
            metric_type="ip",
            nb_cores=nb_cores,
            # IVF indexes built this way can be memory-mapped by the search service.
            should_be_memory_mappable=True,
            verbose=logging.WARNING,
        )
        seconds = time.monotonic() - started
        if index is None:
            raise RuntimeError(f"autofaiss built no {name} index from {embeddings} (infos: {infos})")
        recall = recall_at_k(index, vectors, queries=recall_queries, k=10, index_param=(infos or {}).get("index_param"))
        size = os.path.getsize(index_path)
        for local in (index_path, infos_path):
            storage.copy(local, storage.join(index_folder, os.path.basename(local)))
    return {
        "index_key": (infos or {}).get("index_key"),
        "index_param": (infos or {}).get("index_param"),
        "ntotal": int(index.ntotal),
        "size_bytes": size,
        "recall_at_10": round(recall, 4),
        "build_seconds": round(seconds, 3),
    }


def flat_key_within_budget(count: int, dim: int, max_index_memory_usage: str) -> str | None:
    """``IVF<k>,Flat`` for a million vectors or more whose raw floats fit the memory budget;
    None (autofaiss chooses) otherwise.

    autofaiss switches to OPQ+PQ at one million vectors whatever the budget (its
    ``ivf_flat_threshold``): PQ codes cost recall and OPQ training takes many minutes on a
    few cores, while 1M x 512 floats (2 GB) fit the 4G default. Below the threshold
    autofaiss already picks IVF-Flat; ``k`` follows its rule there, about 4 * sqrt(count).
    """
    from autofaiss.utils.cast import cast_memory_to_bytes

    if count < 1_000_000 or count * dim * 4 * 1.1 > cast_memory_to_bytes(max_index_memory_usage):
        return None
    return f"IVF{2 ** round(math.log2(4 * math.sqrt(count)))},Flat"


def recall_at_k(index: Any, vectors: Any, *, queries: int, k: int, index_param: str | None = None, seed: int = 0) -> float:
    """Mean overlap of the index's top-k with exact inner-product search, over a sample of rows."""
    import faiss
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype="float32")
    k = min(k, len(vectors))
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(sample, k)
    if index_param:
        faiss.ParameterSpace().set_index_parameters(index, index_param)
    _, found = index.search(sample, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return hits / (len(sample) * k)
