"""index: our build_index stage on two kinds of vectors, at autofaiss's choice and at a forced
compressed key: build time and peak RSS, held-out recall@10 without and with exact
re-ranking, memory-mapped latency, resident bytes per vector.

Data: ``clustered`` (about sqrt(n) clusters: close to an IVF index's list count, the shape
the earlier results were measured on) and ``clip_like`` (40 sqrt(n) clusters of heavy-tailed
sizes around a shared mean direction; bench/data.py). Both are written as clip-retrieval
writes embeddings (float16 npy partitions). Queries are held out: drawn from the same
distribution, never added to the index; their exact top 10 comes from a streamed scan of
the npy files. Each case runs in a fresh process (``python -m bench.index measure``), which
builds with ``build_one``, publishes the index as ``build_index`` does (marker, curated npy
files, ``index/metadata`` parquet files with a row per vector) and then serves queries one at
a time through the search service's own ``RunIndex.search_vector``: the index memory-mapped,
``rerank_k`` candidates re-ranked against the memory-mapped npy files, the 10 hits' metadata
rows looked up in the parquet files. Then the case is served again in a fresh process
(``python -m bench.index serve``), as the API server would serve it: the latency targets
are that process's, and the service's memory beyond its mapped files is its growth in
anonymous memory (``RssAnon``) from loading the run to the last query (in the build's
process, the build's own frees would offset it).

    python -m bench.index table RESULTS.json   # the per-case table of docs/benchmarks.md
    python -m bench.index serve WORK/index/CASE QUERIES.npy   # serve a built case's queries again
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import clip_like_vectors, clustered_vectors
from bench.harness import PY, Bench, env_for_tools, run_json
from bench.sizes import Size
from stages.curate.stage import SEARCH_ROW_GROUP
from stages.index.build import IndexSettings

# The DAG's defaults.
MEMORY_BUDGET, MEMORY_AVAILABLE = IndexSettings().max_index_memory_usage, IndexSettings().current_memory_available
DATA = {"clustered": clustered_vectors, "clip_like": clip_like_vectors}
HEADLINE = "clustered-default"  # the case earlier results files measured: what bench.table shows
PARTITION_ROWS = 25_000  # rows per npy file (clip-retrieval writes 10,000-sample partitions and more)
FLAT_QUERIES = 100  # single queries timed against exact in-memory search, the reference
PQ_BUDGET = "128M"  # the pq cases' max_index_memory_usage
SERVICE_MEMORY_MIB = 1024  # the search service's memory beyond its mapped files, at most


def write_dataset(folder: Path, kind: str, n: int, queries: int) -> None:
    """``n`` vectors of ``kind`` as float16 npy partitions under ``folder/img_emb``, their
    metadata rows under ``folder/metadata`` (key: the row number) and ``queries`` more
    vectors of the same distribution, held out, in ``folder/queries.npy``."""
    if not (folder / "queries.npy").exists():
        vectors = DATA[kind](n + queries)
        (folder / "img_emb").mkdir(parents=True, exist_ok=True)
        for number, start in enumerate(range(0, n, PARTITION_ROWS)):
            np.save(folder / "img_emb" / f"img_emb_{number:05d}.npy", vectors[start:min(start + PARTITION_ROWS, n)].astype("float16"))
        np.save(folder / "queries.npy", vectors[n:])
    if not _metadata_current(folder / "metadata", n):
        write_metadata(folder / "metadata", n)


def _metadata_current(folder: Path, n: int) -> bool:
    """Whether ``folder`` holds metadata written as curate writes it now (its row groups)."""
    import pyarrow.parquet as pq

    first = folder / "metadata_00000.parquet"
    if not first.exists():
        return False
    if pq.ParquetFile(first).metadata.row_group(0).num_rows == min(SEARCH_ROW_GROUP, PARTITION_ROWS, n):
        return True
    shutil.rmtree(folder)
    return False


def write_metadata(folder: Path, n: int) -> None:
    """One parquet file per npy partition, in row groups of ``SEARCH_ROW_GROUP`` rows as
    curate writes ``curated/metadata``, written to a temporary name and renamed whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, n, PARTITION_ROWS)):
        rows = range(start, min(start + PARTITION_ROWS, n))
        table = pa.table({"image_path": [f"{i:09d}" for i in rows], "caption": [f"caption of sample {i}" for i in rows],
                          "url": [f"http://127.0.0.1/images/{i}.jpg" for i in rows]})
        pq.write_table(table, staging / f"metadata_{number:05d}.parquet", row_group_size=SEARCH_ROW_GROUP)
    staging.rename(folder)


def publish(work: Path, data: Path, built: dict[str, Any]) -> None:
    """``work`` as a run whose index ``build_index`` published: the curated npy files and
    the metadata (links to ``data``) and the marker the search service reads."""
    from stages.index.build import SOURCE, npy_files
    from stages.layout import RunLayout

    layout = RunLayout(str(work))
    for link, target in ((layout.curated_files("img_emb"), data / "img_emb"), (layout.search_metadata, data / "metadata")):
        Path(link).parent.mkdir(parents=True, exist_ok=True)
        if not Path(link).exists():
            Path(link).symlink_to(target, target_is_directory=True)
    files = npy_files(str(data / "img_emb"))
    layout.index_marker.mark_done({"input_fingerprint": f"bench {data.name}"}, {"source": SOURCE, "image": {**built, "files": files}})


def measure(embeddings: str, queries_npy: str, work: str, settings_json: str) -> dict[str, Any]:
    """One case in this process: build and publish, then serve the held-out queries one at
    a time through the search service."""
    import faiss

    from plugins.laion_search.reader import RunIndex
    from stages.index import build as stage
    from stages.index.rerank import StoredVectors, exact_top_k

    settings = json.loads(settings_json)
    built = stage.build_one(embeddings, str(Path(work) / "index"), "image", max_index_memory_usage=settings["max_index_memory_usage"],
                            current_memory_available=MEMORY_AVAILABLE, index_key=settings["index_key"], recall_queries=1000,
                            nb_cores=None)
    peak_mib = _status_bytes("VmHWM") / 2**20
    publish(Path(work), Path(embeddings).parent, built)
    stored = StoredVectors(embeddings)
    queries = np.load(queries_npy)
    truth = exact_top_k(stored, queries, 10)[1]  # read in blocks, not mapped: nothing left resident

    resident_before = _rss_bytes()
    service = RunIndex(work)
    index = service.index  # memory-mapped at the recorded index_param; re-ranked: the npy files mapped
    params = faiss.ParameterSpace()
    if built.get("autofaiss_index_param"):
        params.set_index_parameters(index, built["autofaiss_index_param"])
    autofaiss_alone = index.search(queries, 10)[1]
    if built.get("index_param"):
        params.set_index_parameters(index, built["index_param"])
    plain, plain_ms = _serve(lambda q: index.search(q, 10)[1][0], queries)
    resident_index = _rss_bytes()
    len(service.rows)  # the metadata files' footers
    found, served_ms = _serve(lambda q: [int(hit.key) for hit in service.search_vector(q[0], 10)], queries)
    resident_all = _rss_bytes()
    flat = faiss.IndexFlatIP(stored.dim)
    for _, block in stored.blocks():
        flat.add(block)
    _, flat_ms = _serve(lambda q: flat.search(q, 10)[1][0], queries[:FLAT_QUERIES])
    return {
        **built,
        "peak_rss_mib": round(peak_mib, 1),
        "recall_at_10": _recall(truth, found),
        "recall_at_10_without_rerank": _recall(truth, plain),
        "recall_at_10_autofaiss": _recall(truth, autofaiss_alone),
        "recall_at_10_build": built["recall_at_10"],
        "recall_at_10_build_without_rerank": built["recall_at_10_without_rerank"],
        "p50_ms": served_ms[0], "p99_ms": served_ms[1],
        "without_rerank_p50_ms": plain_ms[0], "without_rerank_p99_ms": plain_ms[1],
        "flat_p50_ms": flat_ms[0], "flat_p99_ms": flat_ms[1],
        "index_bytes_per_vector": round(built["size_bytes"] / built["ntotal"], 1),
        "resident_index_bytes_per_vector": round((resident_index - resident_before) / built["ntotal"], 1),
        "resident_bytes_per_vector": round((resident_all - resident_before) / built["ntotal"], 1),
        "service_rss_mib": round((resident_all - resident_before) / 2**20, 1),
    }


def _serve(search: Any, queries: np.ndarray) -> tuple[list[np.ndarray], tuple[float, float]]:
    """Each query alone, as the search service gets them: the results and the p50 / p99 ms."""
    found, times = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search(q[None]))
        times.append((time.perf_counter() - started) * 1000)
    return found, (round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3))


def _rss_bytes() -> int:
    """Resident set now, file pages mapped by this process included."""
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (its peak) of this process. Not ``ru_maxrss``: Linux carries
    that over an exec from the process that forked, so a worker would report the bench's own."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) * 1024


def _recall(truth: np.ndarray, found: Any) -> float:
    return round(sum(len(set(t) & set(np.asarray(f).tolist())) for t, f in zip(truth.tolist(), found)) / truth.size, 4)


def run(size: Size, work: Path) -> Bench:
    # pq: a budget the raw vectors exceed from 100k on (195 MiB of float32), with the key forced.
    variants = {"default": {"index_key": None, "max_index_memory_usage": MEMORY_BUDGET},
                "pq": {"index_key": size.index_pq_key, "max_index_memory_usage": PQ_BUDGET}}
    bench = Bench("index", settings={
        "vectors": list(size.index_vectors), "dim": 512, "queries": size.index_queries, "stored": "float16 npy",
        "max_index_memory_usage": MEMORY_BUDGET, "current_memory_available": MEMORY_AVAILABLE, "pq_key": size.index_pq_key,
        "pq_max_index_memory_usage": PQ_BUDGET, "metadata_row_group": SEARCH_ROW_GROUP,
        "data": {"clustered": "Gaussian mixture on a 64-d subspace (sqrt(n) clusters) + noise, unit norm",
                 "clip_like": "40 sqrt(n) clusters on a 64-d subspace, Zipf-like sizes (1/r^1.1), + noise, "
                              "+ 0.65 x a shared mean direction (unrelated pairs: cosine about 0.3), unit norm"}})
    cases = {}
    for n in size.index_vectors:
        for kind in DATA:
            data = work / "cache" / f"index-{kind}-{n}-{size.index_queries}"
            write_dataset(data, kind, n, size.index_queries)
            for variant, settings in variants.items():
                case = f"{kind}-{variant}-{n}"
                bench.commands[case] = [PY, "-m", "bench.index", "measure", str(data / "img_emb"), str(data / "queries.npy"),
                                        str(work / "index" / case), json.dumps(settings)]
                # The search service is a process of its own (the API server's): served again in a fresh one.
                bench.commands[f"{case}-service"] = [PY, "-m", "bench.index", "serve", str(work / "index" / case), str(data / "queries.npy")]
                cases[case] = lambda rep, case=case: _built_and_served(bench.commands[case], bench.commands[f"{case}-service"])
    # An index build is long and its time barely varies: one repetition per case.
    measured = bench.interleave(cases, 1)
    # bench.table reads one case per vector count: the headline, with every case beside it.
    bench.median = {str(n): {**measured[f"{HEADLINE}-{n}"], "cases": {c: v for c, v in measured.items() if c.endswith(f"-{n}")}}
                    for n in size.index_vectors}
    budget_mib = _mib(MEMORY_AVAILABLE)
    for case, v in measured.items():
        bench.target(f"recall@10 held out, {case}", v["recall_at_10"], ">=", 0.95)
        bench.target(f"build peak RSS MiB, {case} (current_memory_available)", v["peak_rss_mib"], "<=", budget_mib)
        bench.target(f"search service memory beyond mapped files MiB, {case}", v["service"]["service_anon_mib"], "<=", SERVICE_MEMORY_MIB)
    largest = max(size.index_vectors)
    for kind in DATA:
        service = measured[f"{kind}-pq-{largest}"]["service"]
        bench.target(f"p50 query at {largest:,} vectors (ms), {kind}-pq, fresh service", service["p50_ms"], "<=", 5.0)
        bench.target(f"p99 query at {largest:,} vectors (ms), {kind}-pq, fresh service", service["p99_ms"], "<=", 20.0)
    return bench


def _built_and_served(measure_command: list[str], serve_command: list[str]) -> dict[str, Any]:
    """A case built and served in one process, then served again in a fresh one, whose
    memory growth is the service's (the build process's own frees would offset it)."""
    built = run_json(measure_command, env=env_for_tools())
    service = run_json(serve_command, env=env_for_tools())
    return {**built, "service": service}


def _mib(memory: str) -> float:
    from autofaiss.utils.cast import cast_memory_to_bytes

    return cast_memory_to_bytes(memory) / 2**20


def case_table(bench: dict[str, Any]) -> str:
    """Every case of an index results entry as one markdown table."""
    lines = ["| case | key | index_param, k' | recall@10 held out: autofaiss alone / alone / **served** (build) "
             "| p50 / p99 ms served (alone) | build s, peak MiB | bytes/vector: file / resident index / + npy rows "
             "| fresh service: p50 / p99 ms (again), MiB beyond mapped files |",
             "|---|---|---|---|---|---|---|---|"]
    for n, headline in bench["median"].items():
        for case, v in headline["cases"].items():
            lines.append(
                f'| {case} | {v["index_key"]} | {v["index_param"] or "-"}, {v["rerank_k"]} '
                f'| {v["recall_at_10_autofaiss"]} / {v["recall_at_10_without_rerank"]} / **{v["recall_at_10"]}** ({v["recall_at_10_build"]}) '
                f'| {v["p50_ms"]} / {v["p99_ms"]} ({v["without_rerank_p50_ms"]} / {v["without_rerank_p99_ms"]}) '
                f'| {v["build_seconds"]:.1f}, {v["peak_rss_mib"]:,.0f} '
                f'| {v["index_bytes_per_vector"]:,.0f} / {v["resident_index_bytes_per_vector"]:,.0f} / {v["resident_bytes_per_vector"]:,.0f} '
                f'| {_service_cell(v)} |')
    return "\n".join(lines)


def _service_cell(v: dict[str, Any]) -> str:
    service = v.get("service")
    if service is None:  # results recorded before the fresh service was measured
        return str(v.get("service_anon_mib", "-"))
    return f'{service["p50_ms"]} / {service["p99_ms"]} ({service["warm_p50_ms"]} / {service["warm_p99_ms"]}), {service["service_anon_mib"]}'


def serve_again(work: str, queries_npy: str) -> dict[str, Any]:
    """Time the held-out queries again through the search service on a case's published
    folder (a case that ``measure`` built), in a fresh process: latency without a rebuild,
    for a quieter machine than the build had."""
    from plugins.laion_search.reader import RunIndex

    queries = np.load(queries_npy)
    anon_before = _status_bytes("RssAnon")
    service = RunIndex(work)
    _, served_ms = _serve(lambda q: [hit.key for hit in service.search_vector(q[0], 10)], queries)
    _, again_ms = _serve(lambda q: [hit.key for hit in service.search_vector(q[0], 10)], queries)  # the page cache warm
    return {"case": Path(work).name, "index_param": service.built["image"]["index_param"], "rerank_k": service.rerank_k,
            "queries": len(queries), "p50_ms": served_ms[0], "p99_ms": served_ms[1], "warm_p50_ms": again_ms[0],
            "warm_p99_ms": again_ms[1], "service_anon_mib": round((_status_bytes("RssAnon") - anon_before) / 2**20, 1),
            "loadavg": os.getloadavg()}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "serve":
        print(json.dumps(serve_again(*argv[2:])))
        return 0
    if len(argv) == 6 and argv[1] == "measure":
        print(json.dumps(measure(*argv[2:]), default=str))
        return 0
    if len(argv) == 3 and argv[1] == "table":
        print(case_table(json.loads(Path(argv[2]).read_text())["benchmarks"]["index"]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
