"""clip_embeddings: webdataset tars -> CLIP image/text embeddings, through clip-retrieval.

The output is clip-retrieval's own layout (``img_emb/img_emb_<part>_<k>.npy``,
``text_emb/text_emb_<part>_<k>.npy``, ``metadata/metadata_<part>_<k>.parquet``), one
triple per partition of a part's tars, so autofaiss and clip-retrieval's back end read it
unchanged. Each dedup part is embedded on its own (one task per part, on as many GPUs as
the ``gpu`` pool has); ``_parts/<part>.json`` marks a part done, and ``_SUCCESS.json``
the folder, once every current part is (:func:`gather_embeddings`, run by build_index).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import posixpath
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from stages import storage
from stages.embedding_plans import (
    DONE, OUTPUTS, PLANS, extend_plan, fingerprint, finished_partitions, legacy_plan, partition_file, remove_partitions,
)  # fmt: skip
from stages.errors import NothingToDo
from stages.npy import count_rows
from stages.layout import RunLayout, shard_location
from stages.processes import spawn_without_main
from stages.settings import setting

log = logging.getLogger(__name__)

PARTIAL = "_partial"  # where a partition is written before it is moved into place


@dataclass(frozen=True)
class EmbeddingSettings:
    """The CLIP model and how it is fed."""

    clip_model: str = setting(
        "open_clip:ViT-B-32/laion2b_s34b_b79k", env="LAION_CLIP_MODEL", type="string", minLength=1,
        description="Any model string clip-retrieval accepts.",
    )  # fmt: skip
    clip_batch_size: int = setting(256, type="integer", minimum=1, maximum=65536)
    # Not on the trigger form: the right number depends on the machine, not on the run
    # (None: every core on a GPU, 2 on a CPU; see embed_part).
    num_prepro_workers: int | None = None
    # Where JPEGs are decoded: "device" (stages.device_embed: batches decoded and
    # preprocessed where the model runs), "reader" (clip-retrieval's reader: PIL in
    # DataLoader workers), None: the device on CUDA, the reader on a CPU.
    decode_on: str | None = None

    def __post_init__(self) -> None:
        if self.decode_on not in (None, "device", "reader"):
            raise ValueError(f"embeddings decode_on {self.decode_on!r} is not one of device, reader (or None)")


def _open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> Any:
    return fsspec.open(url, mode).open()


def register_webdataset_schemes() -> None:
    """webdataset 0.2 opens local files, http and pipes only; let it read s3:// via fsspec."""
    from webdataset import gopen_schemes

    for scheme in ("s3", "s3a", "gs", "gcs", "abfs"):
        gopen_schemes.setdefault(scheme, _open_with_fsspec)


def compute_embeddings(
    tars: list[str],
    layout: RunLayout,
    settings: EmbeddingSettings,
    *,
    samples: int,
    samples_per_partition: int = 10_000,
) -> dict[str, Any]:
    """Embed every image and caption of ``tars`` into ``layout.embeddings``, part after part
    (:func:`embed_part`; a tar's part is its folder), then record the folder as complete
    (:func:`gather_embeddings`). What the pipeline does with one task per part, in one call.

    No shard, or no image in them: :class:`~stages.errors.NothingToDo`.
    """
    if not tars:
        raise NothingToDo(f"no finished image shards to embed under {layout.images}: did every download fail?")
    if not samples:
        raise NothingToDo(f"nothing to embed: the {len(tars)} finished image shards under {layout.images} hold no image")
    by_part: dict[str, list[str]] = {}
    for tar in tars:
        by_part.setdefault(shard_location(tar)[0], []).append(tar)
    results = [
        embed_part(layout, part, part_tars, settings, samples=max(1, samples * len(part_tars) // len(tars)),
                   samples_per_partition=samples_per_partition)
        for part, part_tars in sorted(by_part.items())
    ]  # fmt: skip
    numbers = gather_embeddings(layout, by_part)
    return {**numbers, "skipped": all(r.get("skipped") for r in results)}


def embed_part(
    layout: RunLayout,
    part: str,
    tars: list[str],
    settings: EmbeddingSettings,
    *,
    samples: int,
    samples_per_partition: int = 10_000,
) -> dict[str, Any]:
    """Embed the shards ``tars`` of one dedup part into ``layout.embeddings``; skipped when
    the part's marker (``_parts/<part>.json``) records these shards and this model.

    Parts are independent: tasks of different parts may run at once (one per GPU), each
    writing only its own partitions (``img_emb_<part>_<k>.npy`` ...), plan
    (``_plans/<part>.json``) and marker. Work is planned in partitions of whole tars: a
    partition, once planned, keeps its tars; shards added later (a retry of failed samples)
    go to new partitions, so only those are computed; finished partitions are never redone.

    ``settings.num_prepro_workers`` (JPEG decoding and preprocessing in DataLoader
    workers) defaults to every core on a GPU, where decoding is the bottleneck (on an H100
    the bare ViT-B/32 ran at 10,400 samples/s, the stage at 329/s with 16 workers and 211/s
    with 2), and to 2 on a CPU, where the model itself uses the cores. The model is loaded
    once per call, whatever the number of partitions.
    """
    marker = layout.part_embeddings_marker(part)
    inputs = {"input_fingerprint": fingerprint(tars), "clip_model": settings.clip_model}
    done = marker.done_with(inputs)
    if done is not None:
        log.info("Skipping %s: %s matches its %d shards", part, marker.url, len(tars))
        return {**done, "skipped": True}
    output_folder = layout.embeddings
    plan_url = storage.join(output_folder, PLANS, f"{part}.json")
    written = storage.read_json_or_none(plan_url)
    previous = written or legacy_plan(output_folder, part, tars, settings.clip_model)
    device = "cpu"
    if tars and samples:
        import torch

        register_webdataset_schemes()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if settings.num_prepro_workers is None:
            settings = replace(settings, num_prepro_workers=(os.cpu_count() or 2) if device == "cuda" else 2)
    plan, kept = extend_plan(  # shards without an image (every download failed) need no partition
        previous, part, tars if samples else [], settings.clip_model,
        samples=samples, samples_per_partition=samples_per_partition, workers=settings.num_prepro_workers or 1,
    )  # fmt: skip
    if not kept and previous:
        log.info("Starting %s over: its planned shards changed, or the model did", part)
        remove_partitions(output_folder, [p["name"] for p in previous["partitions"]])
    if plan != written:
        storage.write_json(plan_url, plan)
    finished = finished_partitions(output_folder)
    todo = [p for p in plan["partitions"] if p["name"] not in finished]
    log.info(
        "Embedding %s: %d shards in %d partitions with %s on %s; %d partitions already done",
        part, len(tars), len(plan["partitions"]), settings.clip_model, device, len(plan["partitions"]) - len(todo),
    )  # fmt: skip
    started = time.monotonic()
    for partition in todo:
        embed_partition(partition["name"], partition["tars"], output_folder, settings, device=device)
    seconds = time.monotonic() - started
    names = [p["name"] for p in plan["partitions"]]
    count, dim = count_rows(layout.embedding_files("img_emb"), "img_emb", names)
    text_count, _ = count_rows(layout.embedding_files("text_emb"), "text_emb", names)
    numbers = {
        "part": part,
        "count": count,
        "text_count": text_count,
        "dim": dim,
        "device": device,
        "shards": len(tars),
        "partitions": len(names),
        "partitions_computed": len(todo),
        "compute_seconds": round(seconds, 3),
        "samples_per_second": round(count / seconds, 2) if seconds and todo else None,
        **decoding_counts(output_folder, names),
    }
    return marker.mark_done(inputs, numbers)  # last: the part is done once its marker exists


def decoding_counts(output_folder: str, partitions: list[str]) -> dict[str, int]:
    """Images of ``partitions`` that the device decoder rejected and the CPU decoded
    (``decoded_on_cpu``), and that no decoder could read (``undecodable``), from each
    partition's stats file (clip-retrieval's reader counts neither: both are 0 there)."""
    counts = {"decoded_on_cpu": 0, "undecodable": 0}
    for name in partitions:
        stats = storage.read_json_or_none(storage.join(output_folder, "stats", f"stats_{name}.json")) or {}
        for key in counts:
            counts[key] += int(stats.get(key, 0))
    return counts


def gather_embeddings(layout: RunLayout, tars_by_part: dict[str, list[str]], *, write: bool = True) -> dict[str, Any]:
    """Check that every part of ``tars_by_part`` is embedded from exactly those shards with
    one model, and record the folder as complete (``_SUCCESS.json``: the totals, what
    build_index and the search service read; not written when ``write`` is False). A clear
    error names the first part that is not."""
    parts = sorted(tars_by_part)
    recorded = {part: layout.part_embeddings_marker(part).read() for part in parts}
    missing = [part for part, r in recorded.items() if r is None]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(parts)} parts have no embeddings under {layout.embeddings} "
            f"(first: {missing[0]}): their clip_embeddings task has not finished"
        )
    models = sorted({r["clip_model"] for r in recorded.values()})
    if len(models) > 1:
        raise ValueError(f"the parts under {layout.embeddings} were embedded with {len(models)} models ({', '.join(models)}): embed them again with one")
    for part in parts:
        if recorded[part]["input_fingerprint"] != fingerprint(tars_by_part[part]):
            raise ValueError(
                f"the embeddings of {part} are not of its current shards (they changed since: a retry of failed "
                f"samples?): run clip_embeddings for {part} again"
            )
    all_tars = [t for part in parts for t in tars_by_part[part]]
    count = sum(r["count"] for r in recorded.values())
    computed = [r for r in recorded.values() if r.get("samples_per_second")]
    seconds = sum(r["compute_seconds"] for r in computed)
    numbers = {
        "count": count,
        "text_count": sum(r["text_count"] for r in recorded.values()),
        "dim": max((r["dim"] for r in recorded.values()), default=0),
        "device": next((r["device"] for r in computed), next((r["device"] for r in recorded.values()), None)),
        "parts": len(parts),
        "shards": len(all_tars),
        "partitions": sum(r["partitions"] for r in recorded.values()),
        "partitions_computed": sum(r["partitions_computed"] for r in recorded.values()),
        "compute_seconds": round(seconds, 3),
        "samples_per_second": round(sum(r["count"] for r in computed) / seconds, 2) if seconds else None,
    }
    inputs = {"input_fingerprint": fingerprint(all_tars), "clip_model": models[0] if models else None}
    if not write:
        return {**numbers, **inputs}
    done = layout.embeddings_marker.done_with(inputs)
    if done is not None and done.get("count") == count:
        return done
    return layout.embeddings_marker.mark_done(inputs, numbers)


def embed_partition(
    partition: str,
    tars: list[str],
    output_folder: str,
    settings: EmbeddingSettings,
    *,
    device: str = "cpu",
) -> None:
    """One partition through clip-retrieval's worker, written aside, then moved into place.

    clip-retrieval writes its npy and parquet files straight to their final names and has
    no resume; here a partition's files appear in place only once all are complete, and a
    ``_done/<partition>`` file then records it, so a rerun skips it.
    ``settings.num_prepro_workers`` must be set (:func:`embed_part` resolves None). JPEGs
    are decoded where ``settings.decode_on`` says (:mod:`stages.device_embed` on the
    device, by default on CUDA).
    """
    fs, path = url_to_fs(output_folder)
    staging = posixpath.join(path, PARTIAL, str(partition))
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    staging_url = storage.join(output_folder, PARTIAL, str(partition))
    preload_clip(settings.clip_model, settings.clip_batch_size)
    if settings.decode_on == "device" or (settings.decode_on is None and device.startswith("cuda")):
        from stages.device_embed import embed_tars

        embed_tars(tars, staging_url, settings.clip_model, settings.clip_batch_size, device)
    else:
        embed_with_reader(tars, staging_url, settings)
    for sub in OUTPUTS:
        for produced in fs.glob(posixpath.join(staging, sub, "*")):
            fs.makedirs(posixpath.join(path, sub), exist_ok=True)
            fs.mv(produced, posixpath.join(path, sub, partition_file(sub, partition, produced)))
    storage.write_text(storage.join(output_folder, DONE, str(partition)), "")
    if fs.exists(staging):  # on S3 the "folder" is gone once its last file moved
        fs.rm(staging, recursive=True)


def embed_with_reader(tars: list[str], staging_url: str, settings: EmbeddingSettings) -> None:
    """One partition through clip-retrieval's own worker (its reader decodes with PIL in
    DataLoader workers) into ``staging_url``."""
    from clip_retrieval.clip_inference.worker import worker

    try:
        with spawn_without_main(), stats_in_process():
            worker(
                tasks=[0],
                input_dataset=tars,
                output_folder=staging_url,
                output_partition_count=1,
                input_format="webdataset",
                enable_text=True,
                enable_image=True,
                enable_metadata=True,
                batch_size=settings.clip_batch_size,
                # webdataset fails on a DataLoader worker left without a tar
                num_prepro_workers=max(1, min(settings.num_prepro_workers, len(tars))),
                clip_model=settings.clip_model,
                use_jit=False,
            )
    finally:
        # A DataLoader worker left behind by an exception would keep the task from exiting.
        for child in multiprocessing.active_children():
            child.terminate()


class InProcessStatsWriter:
    """clip-retrieval's LoggerWriter, without its process.

    clip-retrieval starts a spawned process per partition only to add up the batches'
    counters and write ``stats/<partition>.json``; that process re-imports clip-retrieval
    (about 6 s of CPU, taken from the inference on a small machine). Here the counters are
    added up in the worker and the same file is written when the partition ends.
    """

    def __init__(self, partition_id: int, stats_folder: str) -> None:
        self.partition_id = partition_id
        self.stats_folder = stats_folder
        self.stats: dict[str, float] = {}

    def start(self) -> None:
        self.stats = {}

    def __call__(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0) + value

    def end(self) -> None:
        storage.write_text(storage.join(self.stats_folder, f"{self.partition_id}.json"), json.dumps(self.stats))


@contextmanager
def stats_in_process() -> Iterator[None]:
    """Within the block, clip-retrieval's worker keeps its stats in :class:`InProcessStatsWriter`."""
    from clip_retrieval.clip_inference import worker as worker_module

    original = worker_module.LoggerWriter
    worker_module.LoggerWriter = InProcessStatsWriter
    try:
        yield
    finally:
        worker_module.LoggerWriter = original


def preload_clip(clip_model: str, clip_batch_size: int) -> None:
    """Load the model into all_clip's cache exactly as clip-retrieval's worker asks for it,
    warmed up on one sample instead of two full batches.

    clip-retrieval warms the model up with two batches of ``clip_batch_size`` images and
    captions: on a CPU that costs as much as embedding ``2 * clip_batch_size`` more samples. One
    sample is enough for the first call's allocations.
    """
    from all_clip import main as all_clip_main

    full_warmup = all_clip_main.warmup
    all_clip_main.warmup = lambda _batch_size, *args: full_warmup(1, *args)
    try:  # the same keyword arguments, in the same order, as the worker's call: the same cache entry
        all_clip_main.load_clip(clip_model=clip_model, use_jit=False, warmup_batch_size=clip_batch_size, clip_cache_path=None)
    finally:
        all_clip_main.warmup = full_warmup
