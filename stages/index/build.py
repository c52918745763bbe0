"""build_index: autofaiss knn indexes over the image and the text embeddings."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from stages import storage
from stages.embeddings import fingerprint, load_embeddings
from stages.errors import NothingToDo
from stages.layout import RunLayout
from stages.settings import setting

log = logging.getLogger(__name__)

KINDS = {"image": "img_emb", "text": "text_emb"}  # index name -> its embeddings folder
# recall@10 that the search-time nprobe must keep, measured on rows of the index (queries
# from outside the index, as a search service gets, measured about 0.01 lower here).
RECALL_TARGET = 0.97
MEMORY = r"^[0-9]+(\.[0-9]+)?[KMG]B?$"  # autofaiss's memory strings: "4G", "512M", "1.5GB"


@dataclass(frozen=True)
class IndexSettings:
    """autofaiss's memory budgets and, optionally, a forced index key."""

    max_index_memory_usage: str = setting("4G", type="string", pattern=MEMORY)
    current_memory_available: str = setting("8G", type="string", pattern=MEMORY)
    index_key: str | None = setting(
        None, type=["null", "string"], description="Force a faiss index key; empty lets autofaiss choose."
    )


def build_indexes(
    layout: RunLayout, settings: IndexSettings, *, recall_queries: int = 1000, nb_cores: int | None = None
) -> dict[str, Any]:
    """Build ``image.index`` and ``text.index`` (+ their infos) from ``layout.embeddings``
    into ``layout.index`` and measure recall@10.

    Rebuilt only when the embeddings or the settings changed (a fingerprint in the index
    marker). The two indexes are one publication: both are built in a local temporary
    folder, and only when both are complete is the old marker removed, each file copied to
    its final name (each appears whole or not at all) and the new marker written. A kill
    during the builds leaves the folder as it was; readers take the pair as current only
    with a marker that names its inputs.
    """
    folders = {name: layout.embedding_files(sub) for name, sub in KINDS.items()}
    npys = sorted(f for folder in folders.values() for f in storage.list_files(folder, "*.npy"))
    index_key = settings.index_key or None
    built_with = {"max_index_memory_usage": settings.max_index_memory_usage, "index_key": index_key, "recall_target": RECALL_TARGET}
    inputs = {"input_fingerprint": fingerprint(npys) + repr(sorted(built_with.items()))}
    done = layout.index_marker.done_with(inputs)
    if done is not None:
        log.info("Skipping build_index: %s matches the current embeddings", layout.index_marker.url)
        return {**done, "skipped": True}

    numbers: dict[str, Any] = dict(built_with)
    with tempfile.TemporaryDirectory(prefix="laion-index-") as staging:
        for name, folder in folders.items():
            numbers[name] = build_one(
                folder,
                staging,
                name,
                max_index_memory_usage=settings.max_index_memory_usage,
                current_memory_available=settings.current_memory_available,
                index_key=index_key,
                recall_queries=recall_queries,
                nb_cores=nb_cores,
            )
        return publish(staging, layout, inputs, numbers)


def publish(staging: str, layout: RunLayout, inputs: dict[str, Any], numbers: dict[str, Any]) -> dict[str, Any]:
    """Move a complete pair of indexes from ``staging`` into ``layout.index``, marker last;
    returns what the marker records."""
    layout.index_marker.clear()  # from here until the new marker, no pair is current
    for name in sorted(os.listdir(staging)):
        storage.copy(os.path.join(staging, name), storage.join(layout.index, name))
    return layout.index_marker.mark_done(inputs, numbers)


def build_one(
    embeddings: str,
    local_folder: str,
    name: str,
    *,
    max_index_memory_usage: str,
    current_memory_available: str,
    index_key: str | None,
    recall_queries: int,
    nb_cores: int | None,
) -> dict[str, Any]:
    """Build ``<local_folder>/<name>.index`` and its infos from one embeddings folder; its numbers."""
    vectors = load_embeddings(embeddings)
    if len(vectors) == 0:
        raise NothingToDo(f"no embeddings under {embeddings}: nothing to index")
    from autofaiss import build_index  # seconds of imports: only once there is something to index
    index_key = index_key or flat_key_within_budget(len(vectors), vectors.shape[1], max_index_memory_usage)
    os.makedirs(local_folder, exist_ok=True)
    index_path = os.path.join(local_folder, f"{name}.index")
    infos_path = os.path.join(local_folder, f"{name}_infos.json")
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
    sample, truth = exact_neighbours(vectors, queries=recall_queries, k=10)
    chosen = (infos or {}).get("index_param")
    index_param = fewest_probes(index, sample, truth, chosen, RECALL_TARGET)
    recall = recall_of(index, sample, truth, index_param)
    if index_param != chosen:
        log.info("%s index: %s keeps recall@10 %.3f (autofaiss chose %s)", name, index_param, recall, chosen)
        storage.write_json(infos_path, {**infos, "index_param": index_param, "autofaiss_index_param": chosen})
    size = os.path.getsize(index_path)
    return {
        "index_key": (infos or {}).get("index_key"),
        "index_param": index_param,
        "autofaiss_index_param": chosen,
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
    few cores, while 1M x 512 floats (2 GB) fit the 4G default. ``k`` is about sqrt(count)
    (1,024 at 1M), not autofaiss's 4 * sqrt(count): k-means training costs k x (100 k
    training points) distance computations per iteration, so 4,096 lists took more than
    13 minutes to train on 2 cores where 1,024 take about one, and each query then scans
    ``nprobe`` lists of about sqrt(count) vectors.
    """
    from autofaiss.utils.cast import cast_memory_to_bytes

    if count < 1_000_000 or count * dim * 4 * 1.1 > cast_memory_to_bytes(max_index_memory_usage):
        return None
    return f"IVF{2 ** round(math.log2(math.sqrt(count)))},Flat"


def exact_neighbours(vectors: Any, *, queries: int, k: int, seed: int = 0) -> tuple[Any, Any]:
    """(a sample of ``queries`` rows, their exact inner-product top-``k`` among all rows)."""
    import faiss
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype="float32")
    k = min(k, len(vectors))
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(sample, k)
    return sample, truth


def recall_of(index: Any, sample: Any, truth: Any, index_param: str | None) -> float:
    """Mean overlap of the index's top-k with the exact top-k ``truth`` of ``sample``."""
    import faiss

    if index_param:
        faiss.ParameterSpace().set_index_parameters(index, index_param)
    _, found = index.search(sample, truth.shape[1])
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
    return hits / truth.size


def fewest_probes(index: Any, sample: Any, truth: Any, index_param: str | None, target: float) -> str | None:
    """``index_param`` with the smallest ``nprobe`` whose recall still reaches ``target``.

    autofaiss picks ``nprobe`` from a query-time budget (10 ms by default), not from
    recall; on clustered embeddings far fewer lists hold the true neighbours (57 lists at
    1M vectors in 1,024 lists gave recall 1.0; the query time is proportional to nprobe).
    Recall grows with nprobe, so a bisection finds the least that reaches ``target``. If
    even autofaiss's choice misses ``target``, its choice is kept.
    """
    params = dict(p.split("=", 1) for p in index_param.split(",")) if index_param else {}
    if "nprobe" not in params:
        return index_param

    def with_probes(n: int) -> str:
        return ",".join(f"{key}={n if key == 'nprobe' else value}" for key, value in params.items())

    low, high = 1, int(params["nprobe"])
    if recall_of(index, sample, truth, with_probes(high)) < target:
        return index_param
    while low < high:
        middle = (low + high) // 2
        if recall_of(index, sample, truth, with_probes(middle)) >= target:
            high = middle
        else:
            low = middle + 1
    return with_probes(high)
