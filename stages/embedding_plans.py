"""The plans of the embedding stage: which tars each partition of a part embeds, which
partitions are done, and taking a part's partitions out again.

A partition is clip-retrieval's unit of output (one npy/parquet triple) and of resume. A
part's plan (``_plans/<part>.json``) keeps its partitions once made: shards added later go
to new partitions, so finished ones are never redone.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.layout import RunLayout, shard_location

PLANS = "_plans"  # one plan per part (_plans/<part>.json): the partitions of its tars
LEGACY_PLAN = "_plan.json"  # the one plan of folders embedded before parts had their own
DONE = "_done"  # one empty file per finished partition, written after its outputs
OUTPUTS = ("img_emb", "text_emb", "metadata", "stats")
PARTITION_DIGITS = 5


def fingerprint(urls: list[str]) -> str:
    """sha256 over (name, size) of every input file: changes when any input changes."""
    h = hashlib.sha256()
    for url in sorted(urls):
        fs, path = url_to_fs(url)
        h.update(f"{url}\0{fs.size(path)}\n".encode())
    return h.hexdigest()


def plan_partitions(shards: int, prepro_workers: int, samples: int, samples_per_partition: int) -> tuple[int, int]:
    """(output partitions, preprocessing workers) for ``shards`` tars holding ``samples``.

    A partition is clip-retrieval's unit of output (one npy/parquet triple) and of resume;
    each costs a few seconds of DataLoader start-up, so partitions hold about
    ``samples_per_partition`` samples. webdataset splits a partition's tars between the
    DataLoader workers and fails on a worker left without one, so every partition also
    gets at least as many tars as workers.
    """
    workers = max(1, min(prepro_workers, shards))
    by_workers = max(1, shards // workers)
    by_samples = max(1, math.ceil(samples / samples_per_partition))
    return min(by_workers, by_samples), workers


def extend_plan(
    previous: dict[str, Any] | None,
    part: str,
    tars: list[str],
    clip_model: str,
    *,
    samples: int,
    samples_per_partition: int,
    workers: int,
) -> tuple[dict[str, Any], bool]:
    """(the embedding plan of one part for ``tars``, whether ``previous`` was kept).

    The plan is ``previous`` plus partitions for the tars it lacks. ``previous`` is kept
    only when it was made for ``clip_model`` and every tar it planned is still there,
    unchanged; otherwise the plan starts over. A partition is named ``<part>_<k>``, ``k``
    counting up within the part, so names never repeat while the plan is kept.
    """
    planned = (previous or {}).get("partitions")
    current = set(tars)
    keep = (
        isinstance(planned, list)
        and previous.get("clip_model") == clip_model
        and all(set(p["tars"]) <= current and p["fingerprint"] == fingerprint(p["tars"]) for p in planned)
    )
    partitions = list(planned) if keep else []
    next_k = previous.get("next", len(partitions)) if keep else 0
    seen = {t for p in partitions for t in p["tars"]}
    new = [t for t in tars if t not in seen]
    if new:
        count, _ = plan_partitions(len(new), workers, max(1, samples * len(new) // max(1, len(tars))), samples_per_partition)
        for i in range(count):
            group = new[i * len(new) // count : (i + 1) * len(new) // count]
            partitions.append({"name": f"{part}_{next_k:0{PARTITION_DIGITS}d}", "tars": group, "fingerprint": fingerprint(group)})
            next_k += 1
    return {"part": part, "clip_model": clip_model, "partitions": partitions, "next": next_k}, keep


def legacy_plan(output_folder: str, part: str, tars: list[str], clip_model: str | None) -> dict[str, Any] | None:
    """A part's plan taken from a folder embedded before parts had their own plans (one
    ``_plan.json`` numbering every partition): its finished partitions of this part keep
    their files (``img_emb_00003.npy``) and are not computed again."""
    old = storage.read_json_or_none(storage.join(output_folder, LEGACY_PLAN))
    if not old or (clip_model is not None and old.get("clip_model") != clip_model):
        return None
    fs, path = url_to_fs(output_folder)
    finished = finished_partitions(output_folder)
    adopted = []
    for i, p in enumerate(old.get("partitions", [])):
        if p["tars"] and (p.get("part") or shard_location(p["tars"][0])[0]) == part and str(i) in finished:
            name = f"{i:0{PARTITION_DIGITS}d}"
            if not fs.exists(posixpath.join(path, DONE, name)):
                storage.write_text(storage.join(output_folder, DONE, name), "")
            adopted.append({"name": name, "tars": p["tars"], "fingerprint": p["fingerprint"]})
    if not adopted or not all(set(p["tars"]) <= set(tars) for p in adopted):
        return None
    return {"part": part, "clip_model": clip_model, "partitions": adopted, "next": 0}


def remove_partitions(output_folder: str, names: list[str]) -> None:
    """Remove the files of the partitions ``names`` and their done files."""
    fs, path = url_to_fs(output_folder)
    for name in names:
        for sub in OUTPUTS:
            for produced in fs.glob(posixpath.join(path, sub, f"{sub}_{name}.*")):
                fs.rm(produced)
        if fs.exists(posixpath.join(path, DONE, name)):
            fs.rm(posixpath.join(path, DONE, name))


def drop_parts(layout: RunLayout, parts: set[str]) -> dict[str, Any]:
    """Take the embeddings of ``parts`` out of ``layout.embeddings`` (a removed batch):
    their partitions' files, plans and markers go. The folder's marker is removed too:
    build_index records the folder again (:func:`gather_embeddings`)."""
    output_folder = layout.embeddings
    removed = 0
    for part in sorted(parts):
        plan_url = storage.join(output_folder, PLANS, f"{part}.json")
        plan = storage.read_json_or_none(plan_url) or legacy_plan(output_folder, part, layout.current_shards([part]), None) or {}
        names = [p["name"] for p in plan.get("partitions", [])]
        remove_partitions(output_folder, names)
        removed += len(names)
        layout.part_embeddings_marker(part).clear()
        if storage.exists(plan_url):
            storage.remove(plan_url)
    layout.embeddings_marker.clear()
    return {"partitions_removed": removed}


def finished_partitions(output_folder: str) -> set[str]:
    """The names of the partitions whose files are in place (``_done/<name>``)."""
    fs, path = url_to_fs(output_folder)
    return {posixpath.basename(p) for p in fs.glob(posixpath.join(path, DONE, "*"))}


def partition_file(sub: str, partition: str, produced: str) -> str:
    """``img_emb_0.npy`` from clip-retrieval -> ``img_emb_part-00003_00001.npy`` for
    partition ``part-00003_00001``.

    Zero-padded part and partition numbers, so name order (the order autofaiss and the
    search service read the files in) is part order, then partition order, however many
    parts and partitions are added later.
    """
    suffix = posixpath.splitext(produced)[1]
    return f"{sub}_{partition}{suffix}"


