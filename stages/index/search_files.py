"""What build_index publishes, next to the indexes, for a search service.

- ``index/metadata/*.parquet`` -- the kept samples' metadata in index order: clip-retrieval's
  own layout, so its back end (``clip_retrieval.clip_back``) loads the folder unchanged;
- ``index/offsets/<part>/<shard>.parquet`` -- where each member of each webdataset tar
  starts and how long it is, so showing a sample is one ranged read of its tar (local or S3),
  never an unpacking of the shard;
- ``index/_SEARCH.json``, written last -- what they were made from, the index marker's
  fingerprint included: a search service takes a new index as published once it names it.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.layout import RunLayout, shard_location

log = logging.getLogger(__name__)


def tar_members(tar_url: str) -> list[tuple[str, str, int, int]]:
    """(key, extension, data offset, size) of every file in a webdataset tar, read in one pass."""
    fs, path = url_to_fs(tar_url)
    members = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as archive:
        for info in archive:
            if not info.isfile():
                continue
            name = posixpath.basename(info.name)
            key, _, ext = name.partition(".")
            members.append((key, ext, info.offset_data, info.size))
    return members


def write_offsets(tar_url: str, table_url: str) -> int:
    """Write the offset table of one tar (its size in the table's metadata); its member count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    members = tar_members(tar_url)
    fs, path = url_to_fs(tar_url)
    table = pa.table(
        {name: [m[i] for m in members] for i, name in enumerate(("key", "ext", "offset", "size"))},
        schema=pa.schema([("key", pa.string()), ("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]),
    ).replace_schema_metadata({"tar_size": str(fs.size(path))})
    with storage.atomic_open(table_url, "wb") as f:
        pq.write_table(table, f)
    return len(members)


def files_by_name(folder: str, pattern: str = "*") -> dict[str, int]:
    """Name -> size of the files directly under ``folder`` matching ``pattern`` (none when it is missing)."""
    fs, path = url_to_fs(folder)
    found = fs.glob(posixpath.join(path.rstrip("/"), pattern), detail=True)
    return {posixpath.basename(p): int(info["size"]) for p, info in sorted(found.items()) if info["type"] == "file"}


def mirror_folder(source: str, folder: str, pattern: str) -> int:
    """Make ``folder`` hold exactly the files of ``source`` matching ``pattern``: those missing
    or of another size are copied, those no longer in ``source`` removed, the rest left alone.
    Returns how many were copied."""
    wanted, present = files_by_name(source, pattern), files_by_name(folder, pattern)
    for name in sorted(set(present) - set(wanted)):
        storage.remove(storage.join(folder, name))
    copied = [name for name, size in wanted.items() if present.get(name) != size]
    for name in copied:
        storage.copy(storage.join(source, name), storage.join(folder, name))
    return len(copied)


def publish_search_files(layout: RunLayout) -> dict[str, Any]:
    """Write ``index/metadata/`` and one offset table per current shard; unchanged inputs are kept.

    The search marker, written last, records what they were made from (the index marker's
    fingerprint, the embeddings' fingerprint and each tar's size): a rerun over the same data
    rewrites nothing, and a search service takes a new index as published only once this
    marker names it (until then index/metadata/ may be half updated).
    """
    curated = layout.curation_marker.recorded()
    tars = layout.current_shards()
    sizes = {}
    for tar in tars:
        fs, tar_path = url_to_fs(tar)
        sizes["/".join(shard_location(tar))] = fs.size(tar_path)
    index = layout.index_marker.read() or {}
    wanted = {"index_fingerprint": index.get("input_fingerprint"), "curation_fingerprint": curated["input_fingerprint"], "curation_settings": curated.get("settings"), "tars": sizes}
    marker = layout.search_marker
    if marker.done_with(wanted) is not None:
        log.info("Search files are current: %s matches %d shards", marker.url, len(tars))
        return {"offset_tables_written": 0, "metadata_files_written": 0, "skipped": True}

    published = marker.read() or {}
    written = 0
    for tar in tars:
        part, shard = shard_location(tar)
        table = layout.offsets_table(part, shard)
        if published.get("tars", {}).get(f"{part}/{shard}") != sizes[f"{part}/{shard}"] or not storage.exists(table):
            write_offsets(tar, table)
            written += 1
    for table in layout.offsets_tables():
        part, name = posixpath.basename(posixpath.dirname(table)), posixpath.basename(table)
        if f"{part}/{name[: -len('.parquet')]}" not in sizes:  # a shard no longer current
            storage.remove(table)
    copied = mirror_folder(layout.curated_files("metadata"), layout.search_metadata, "*.parquet")
    marker.mark_done(wanted, {})
    log.info("Published %d offset tables and %d metadata files for search", written, copied)
    return {"offset_tables_written": written, "metadata_files_written": copied, "skipped": False}
