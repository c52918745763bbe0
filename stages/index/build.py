"""build_index: autofaiss knn indexes over the image and the text embeddings, grown in
place as batches of embeddings come and go."""

from __future__ import annotations

import logging
import math
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.embedding_plans import fingerprint
from stages.npy import count_embeddings
from stages.errors import NothingToDo
from stages.index.rerank import (
    StoredVectors,
    cheapest_search,
    fewest_candidates,
    leave_out,
    recall_of,
    sample_positions,
    search_params,
    streamed_neighbours,
)
from stages.layout import RunLayout
from stages.settings import setting

log = logging.getLogger(__name__)

KINDS = {"image": "img_emb", "text": "text_emb"}  # index name -> its embeddings folder
# recall@10 that the search-time nprobe (and, for compressed codes, the re-ranking of k'
# candidates) must keep, measured on rows of the index (queries from outside the index, as
# a search service gets, measured about 0.01 lower here).
RECALL_TARGET = 0.97
# An index grows by add() up to this many times the vectors autofaiss built it on: autofaiss
# chose its key and list count for that size, and lists grown past it get slow to scan.
GROWTH_FACTOR = 2
# An index whose own build already missed RECALL_TARGET (PQ codes lose recall) is retrained
# only when adding costs it more than this: retraining would miss the target as well.
RECALL_SLACK = 0.02
MEMORY = r"^[0-9]+(\.[0-9]+)?[KMG]B?$"  # autofaiss's memory strings: "4G", "512M", "1.5GB"

# What a build did to each index (its marker's "action").
BUILT = "built"  # no earlier index: autofaiss
ADDED = "added"  # the new npy files' vectors added to the earlier index
READDED = "readded"  # some npy files removed: the index emptied (training kept) and refilled
RETRAINED = "retrained"  # an earlier index, but the rule says autofaiss again ("retrain_reason")
SKIPPED = "skipped"  # the index's npy files are those it holds: kept as it is
SOURCE = "curated"  # the marker's "source": the folder whose npy files the index holds (earlier: embeddings)


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
    """Build or grow ``image.index`` and ``text.index`` (+ their infos) from
    ``layout.curated_files`` (the samples curation kept) into ``layout.index`` and measure recall@10.

    Nothing is done when the embeddings and the settings are those of the index marker.
    Otherwise each index takes the first action of :func:`growth_plan` that applies:
    autofaiss builds it again (``retrained``) when the settings changed, an npy file it
    holds changed size, a new file sorts before one it holds, or it would hold more than
    ``GROWTH_FACTOR`` times the vectors it was trained on; it is emptied and refilled with
    the current files (``readded``, the trained quantizer kept) when some of its files are
    gone; the new files' vectors are added (``added``) otherwise. An index grown either way
    is then tuned again (:func:`tune_search`: nprobe, and the candidates k' re-ranked
    exactly when its codes are compressed) and is retrained after all when its recall@10
    falls below ``RECALL_TARGET`` (or, for one whose build already missed it, more than
    ``RECALL_SLACK`` below its recall when built). Recall is measured by streaming over the
    npy files: the vectors are never all in memory here (autofaiss keeps to
    ``current_memory_available`` on its side).

    The two indexes are one publication: both are made in a local temporary folder, and
    only when both are complete is the old marker removed, each file copied to its final
    name (each appears whole or not at all) and the new marker written. A kill during the
    builds leaves the folder as it was; readers take the pair as current only with a
    marker that names its inputs.
    """
    folders = {name: layout.curated_files(sub) for name, sub in KINDS.items()}  # the kept samples only
    npys = sorted(f for folder in folders.values() for f in storage.list_files(folder, "*.npy"))
    index_key = settings.index_key or None
    built_with = {"max_index_memory_usage": settings.max_index_memory_usage, "index_key": index_key, "recall_target": RECALL_TARGET}
    inputs = {"input_fingerprint": fingerprint(npys) + repr(sorted(built_with.items()))}
    done = layout.index_marker.done_with(inputs)
    if done is not None:
        log.info("Skipping build_index: %s matches the current embeddings", layout.index_marker.url)
        return {**done, "skipped": True}

    previous = layout.index_marker.read()
    numbers: dict[str, Any] = {**built_with, "source": SOURCE}
    with tempfile.TemporaryDirectory(prefix="laion-index-") as staging:
        for name, folder in folders.items():
            numbers[name] = update_index(
                layout, settings, name, folder, staging, previous, built_with, recall_queries=recall_queries, nb_cores=nb_cores
            )
        return publish(staging, layout, inputs, numbers)


def update_index(
    layout: RunLayout,
    settings: IndexSettings,
    name: str,
    embeddings: str,
    staging: str,
    previous: dict[str, Any] | None,
    built_with: dict[str, Any],
    *,
    recall_queries: int,
    nb_cores: int | None,
) -> dict[str, Any]:
    """Bring index ``name`` up to date with ``embeddings`` in ``staging`` (no file there when it
    is kept as it is) by the action :func:`growth_plan` chooses; its numbers."""
    files = npy_files(embeddings)
    if not files:
        raise NothingToDo(f"no embeddings under {embeddings}: nothing to index")
    action, reason = growth_plan(previous, built_with, name, files, count_embeddings(embeddings)[0])
    if action == SKIPPED:
        return {**previous[name], "action": SKIPPED, "retrain_reason": None, "added": 0, "build_seconds": 0.0}
    if action in (ADDED, READDED):
        grown = grow_one(layout, embeddings, staging, name, previous[name], action=action, files=files, recall_queries=recall_queries)
        if isinstance(grown, dict):
            return grown
        action, reason = RETRAINED, grown
    if reason:
        log.info("Retraining the %s index: %s", name, reason)
    built = build_one(
        embeddings,
        staging,
        name,
        max_index_memory_usage=settings.max_index_memory_usage,
        current_memory_available=settings.current_memory_available,
        index_key=built_with["index_key"],
        recall_queries=recall_queries,
        nb_cores=nb_cores,
    )
    return {**built, "action": action, "retrain_reason": reason, "files": files, "added": built["ntotal"]}


def npy_files(folder: str) -> dict[str, int]:
    """Name -> size of every .npy in ``folder``, in name order (the order of the index's rows)."""
    fs, path = url_to_fs(folder)
    found = fs.glob(posixpath.join(path.rstrip("/"), "*.npy"), detail=True)
    return {posixpath.basename(p): int(info["size"]) for p, info in sorted(found.items())}


def growth_plan(
    previous: dict[str, Any] | None, built_with: dict[str, Any], name: str, files: dict[str, int], vectors: int
) -> tuple[str, str | None]:
    """(action, why it retrains) for index ``name`` over ``files`` holding ``vectors`` rows,
    given the marker of the published pair (``previous``); the rule is build_indexes's."""
    before = (previous or {}).get(name)
    if before is None:
        return BUILT, None
    if "files" not in before or "trained_on" not in before:
        return RETRAINED, "the earlier index records no npy files (built before indexes grew in place)"
    changed = sorted(key for key, value in built_with.items() if previous.get(key) != value)
    if changed:
        return RETRAINED, f"settings changed: {', '.join(changed)}"
    held = before["files"]
    resized = [f for f in files if f in held and files[f] != held[f]]
    if resized:
        return RETRAINED, f"{resized[0]} changed size ({held[resized[0]]} -> {files[resized[0]]} bytes)"
    new = [f for f in files if f not in held]
    if new and new[0] < max(held):
        return RETRAINED, f"new file {new[0]} sorts before {max(held)}, which the index holds"
    if vectors > GROWTH_FACTOR * before["trained_on"]:
        return RETRAINED, f"{vectors} vectors exceed {GROWTH_FACTOR} x the {before['trained_on']} the index was trained on"
    if any(f not in files for f in held):
        return READDED, None
    return (ADDED, None) if new else (SKIPPED, None)


def grow_one(
    layout: RunLayout,
    embeddings: str,
    local_folder: str,
    name: str,
    before: dict[str, Any],
    *,
    action: str,
    files: dict[str, int],
    recall_queries: int,
) -> dict[str, Any] | str:
    """Write ``<local_folder>/<name>.index`` (+ infos): the published index with the new
    files' vectors added (``ADDED``), or emptied and refilled with every current vector
    (``READDED``), tuned again; its numbers, or why it must be retrained instead."""
    import faiss

    started = time.monotonic()
    if not storage.exists(layout.index_file(name)):
        return f"{layout.index_file(name)}, which its marker describes, is missing"
    index_path = os.path.join(local_folder, f"{name}.index")
    storage.copy(layout.index_file(name), index_path)  # faiss reads local files only
    index = faiss.read_index(index_path)
    if action == ADDED and index.ntotal != before["ntotal"]:
        os.remove(index_path)
        return f"{layout.index_file(name)} holds {index.ntotal} vectors, its marker says {before['ntotal']}"
    if action == READDED:
        index.reset()  # an IVF index keeps its trained quantizer (and PQ): only its lists are emptied
    stored = StoredVectors(embeddings, names=list(files))
    start = int(index.ntotal)  # the files the index holds come first
    for _, block in stored.blocks(start):
        index.add(block)
    chosen = before.get("autofaiss_index_param")
    tuned = tune_search(index, stored, chosen, recall_queries=recall_queries)
    floor = min(RECALL_TARGET, before.get("trained_recall_at_10", RECALL_TARGET) - RECALL_SLACK)
    if tuned["recall_at_10"] < floor:
        os.remove(index_path)
        return f"recall@10 {tuned['recall_at_10']:.3f} after adding is below {floor:.3f}"
    faiss.write_index(index, index_path)
    size = os.path.getsize(index_path)
    infos = storage.read_json_or_none(storage.join(layout.index, f"{name}_infos.json")) or {}
    updated = {"index_param": tuned["index_param"], "rerank_k": tuned["rerank_k"], "autofaiss_index_param": chosen,
               "nb vectors": int(index.ntotal), "size in bytes": size}
    storage.write_json(os.path.join(local_folder, f"{name}_infos.json"), {**infos, **updated})
    log.info("%s index: %s %d vectors, now %d; recall@10 %.3f at %s, %d candidates",
             name, action, stored.total - start, index.ntotal, tuned["recall_at_10"], tuned["index_param"], tuned["rerank_k"])
    return {
        **before,
        **tuned,
        "ntotal": int(index.ntotal),
        "size_bytes": size,
        "build_seconds": round(time.monotonic() - started, 3),
        "files": files,
        "action": action,
        "retrain_reason": None,
        "added": int(index.ntotal) - start,
    }


def publish(staging: str, layout: RunLayout, inputs: dict[str, Any], numbers: dict[str, Any]) -> dict[str, Any]:
    """Move a complete pair of indexes from ``staging`` into ``layout.index``, marker last;
    returns what the marker records. An index kept as it is has no file in ``staging``."""
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
    count, dim = count_embeddings(embeddings)
    if count == 0:
        raise NothingToDo(f"no embeddings under {embeddings}: nothing to index")
    from autofaiss import build_index  # seconds of imports: only once there is something to index
    index_key = index_key or flat_key_within_budget(count, dim, max_index_memory_usage)
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
    chosen = (infos or {}).get("index_param")
    tuned = tune_search(index, StoredVectors(embeddings), chosen, recall_queries=recall_queries)
    log.info("%s index: %s and %d candidates keep recall@10 %.3f (%.3f without re-ranking; autofaiss chose %s)",
             name, tuned["index_param"], tuned["rerank_k"], tuned["recall_at_10"], tuned["recall_at_10_without_rerank"], chosen)
    storage.write_json(infos_path, {**infos, "index_param": tuned["index_param"], "rerank_k": tuned["rerank_k"], "autofaiss_index_param": chosen})
    size = os.path.getsize(index_path)
    return {
        "index_key": (infos or {}).get("index_key"),
        **tuned,
        "autofaiss_index_param": chosen,
        "ntotal": int(index.ntotal),
        "size_bytes": size,
        "build_seconds": round(seconds, 3),
        "trained_on": int(index.ntotal),
        "trained_recall_at_10": tuned["recall_at_10"],
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
    """(a sample of ``queries`` rows, their exact inner-product top-``k`` among all rows), all
    in memory: the reference that :func:`~stages.index.rerank.streamed_neighbours` streams."""
    import faiss
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype="float32")
    k = min(k, len(vectors))
    sample = vectors[sample_positions(len(vectors), queries, seed)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(sample, k)
    return sample, truth


def fewest_probes(
    index: Any, sample: Any, truth: Any, index_param: str | None, target: float, candidates: int | None = None, exclude: Any = None
) -> str | None:
    """``index_param`` with the smallest ``nprobe`` whose recall (re-ranking ``candidates``
    per query, if given; see :func:`~stages.index.rerank.recall_of`) still reaches ``target``.

    autofaiss picks ``nprobe`` from a query-time budget (10 ms by default), not from
    recall; on clustered embeddings far fewer lists hold the true neighbours (57 lists at
    1M vectors in 1,024 lists gave recall 1.0; the query time is proportional to nprobe).
    Recall grows with nprobe, so a bisection finds the least that reaches ``target``. If
    even autofaiss's choice misses ``target``, its choice is kept.
    """
    params = search_params(index_param)
    if "nprobe" not in params:
        return index_param

    def with_probes(n: int) -> str:
        return ",".join(f"{key}={n if key == 'nprobe' else value}" for key, value in params.items())

    low, high = 1, int(params["nprobe"])
    if recall_of(index, sample, truth, with_probes(high), candidates, exclude) < target:
        return index_param
    while low < high:
        middle = (low + high) // 2
        if recall_of(index, sample, truth, with_probes(middle), candidates, exclude) >= target:
            high = middle
        else:
            low = middle + 1
    return with_probes(high)


def tune_search(index: Any, stored: StoredVectors, chosen: str | None, *, recall_queries: int) -> dict[str, Any]:
    """The search settings of ``index`` over ``stored`` and their recall@10: ``index_param``
    (:func:`fewest_probes`) and, where the index's codes alone miss ``RECALL_TARGET`` (PQ),
    ``rerank_k`` candidates re-ranked exactly (:func:`fewest_candidates`, 10: none).

    With re-ranking, recall is measured with each query's own row left out of its truth
    and its results (:func:`~stages.index.rerank.leave_out`): a row finds itself among any
    candidates, so k' measured with it would be too few for queries from outside the index.
    ``nprobe`` is bisected again for the recall at that k', and k' chosen again at the
    nprobe found; then, of that pair and those with more candidates and fewer probes, the
    one that reads the fewest weighted bytes (:func:`~stages.index.rerank.cheapest_search`).
    Exact neighbours are found by streaming over the npy files
    (:func:`~stages.index.rerank.streamed_neighbours`); ``recall_at_10_without_rerank`` is
    the index's alone, at the nprobe chosen without re-ranking (autofaiss's where even
    that misses the target), measured as the recall with re-ranking is.
    """
    sample, truth = streamed_neighbours(stored, queries=recall_queries, k=11)
    k = min(10, stored.total)
    index_param = fewest_probes(index, sample, truth[:, :k], chosen, RECALL_TARGET)
    plain = recall_of(index, sample, truth[:, :k], index_param)
    if plain >= RECALL_TARGET or stored.total <= k:
        return {"index_param": index_param, "rerank_k": k, "recall_at_10": round(plain, 4), "recall_at_10_without_rerank": round(plain, 4)}
    own = sample_positions(stored.total, recall_queries)
    truth = leave_out(truth, own, k)
    plain = recall_of(index, sample, truth, index_param, exclude=own)
    rerank_k = fewest_candidates(index, sample, truth, index_param, RECALL_TARGET, own)
    reranked = rerank_k > k
    if reranked:
        index_param = fewest_probes(index, sample, truth, index_param, RECALL_TARGET, rerank_k, own)
        rerank_k = fewest_candidates(index, sample, truth, index_param, RECALL_TARGET, own)
    recall = recall_of(index, sample, truth, index_param, rerank_k, own)
    if reranked and recall >= RECALL_TARGET:
        cheaper = cheapest_search(index, sample, truth, index_param, rerank_k, RECALL_TARGET, own)
        if cheaper != (index_param, rerank_k):
            index_param, rerank_k = cheaper
            recall = recall_of(index, sample, truth, index_param, rerank_k, own)
    return {
        "index_param": index_param,
        "rerank_k": rerank_k,
        "recall_at_10": round(recall, 4),
        "recall_at_10_without_rerank": round(plain, 4),
    }
