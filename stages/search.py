"""Query a finished run: text or image embeddings against its knn index, samples read from its tars.

build_index publishes, next to the indexes, what a search service needs
(:func:`publish_search_files`):

- ``index/metadata/*.parquet`` -- the embeddings' metadata in index order: clip-retrieval's
  own layout, so its back end (``clip_retrieval.clip_back``) loads the folder unchanged;
- ``index/offsets/<part>/<shard>.parquet`` -- where each member of each webdataset tar
  starts and how long it is, so showing a sample is one ranged read of its tar (local or S3),
  never an unpacking of the shard.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from fsspec.core import url_to_fs

from stages import storage

log = logging.getLogger(__name__)

# The Airflow Asset that build_index updates: a search service reloads a run's index on its events.
INDEX_ASSET = "laion_index"
SEARCH_MARKER = "_SEARCH.json"


@dataclass
class Hit:
    key: str
    caption: str
    url: str
    score: float


# --- what build_index publishes for search ------------------------------------------------


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


def _tar_location(tar_url: str) -> tuple[str, str]:
    """``.../images/part-00001/0000100002.tar`` -> (``part-00001``, ``0000100002``)."""
    return posixpath.basename(posixpath.dirname(tar_url)), posixpath.basename(tar_url)[: -len(".tar")]


def write_offsets(tar_url: str, table_url: str) -> int:
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


def _replace_folder(sources: list[str], folder: str) -> None:
    fs, path = url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    for src in sources:
        storage.copy(src, storage.join(folder, posixpath.basename(src)))


def publish_search_files(output_root: str) -> dict[str, Any]:
    """Write ``index/metadata/`` and one offset table per current shard; unchanged inputs are kept.

    ``index/_SEARCH.json`` records what they were made from (the embeddings' fingerprint
    and each tar's size), so a rerun over the same data rewrites nothing.
    """
    from stages.download import current_parts
    from stages.embeddings import list_tars

    path = lambda *p: storage.join(output_root, *p)  # noqa: E731
    tars = list_tars(path("images"), current_parts(storage.read_json(path("dedup", "_stats.json"))))
    embeddings = storage.read_json(path("embeddings", "_SUCCESS.json"))
    sizes = {}
    for tar in tars:
        fs, tar_path = url_to_fs(tar)
        sizes["/".join(_tar_location(tar))] = fs.size(tar_path)
    wanted = {"embeddings_fingerprint": embeddings["input_fingerprint"], "tars": sizes}
    done = storage.read_json_or_none(path("index", SEARCH_MARKER)) or {}
    if done == wanted:
        log.info("Search files are current: %s matches %d shards", SEARCH_MARKER, len(tars))
        return {"offset_tables_written": 0, "metadata_files_written": 0, "skipped": True}

    written = 0
    for tar in tars:
        part, shard = _tar_location(tar)
        table = path("index", "offsets", part, f"{shard}.parquet")
        if done.get("tars", {}).get(f"{part}/{shard}") != sizes[f"{part}/{shard}"] or not storage.exists(table):
            write_offsets(tar, table)
            written += 1
    for table in _offset_tables(path("index")):
        part, name = posixpath.basename(posixpath.dirname(table)), posixpath.basename(table)
        if f"{part}/{name[: -len('.parquet')]}" not in sizes:  # a shard no longer current
            fs, stale = url_to_fs(table)
            fs.rm(stale)
    metadata = storage.list_files(path("embeddings", "metadata"), "*.parquet")
    if done.get("embeddings_fingerprint") != wanted["embeddings_fingerprint"] or not storage.exists(path("index", "metadata")):
        _replace_folder(metadata, path("index", "metadata"))
    else:
        metadata = []
    storage.write_json(path("index", SEARCH_MARKER), wanted)
    log.info("Published %d offset tables and %d metadata files for search", written, len(metadata))
    return {"offset_tables_written": written, "metadata_files_written": len(metadata), "skipped": False}


def _offset_tables(index_folder: str) -> list[str]:
    fs, path = url_to_fs(index_folder)
    found = sorted(fs.glob(posixpath.join(path, "offsets", "*", "*.parquet")))
    if storage.is_remote(index_folder):
        return [f"{index_folder.split('://')[0]}://{p}" for p in found]
    return found


# --- reading a finished run --------------------------------------------------------------


class SampleReader:
    """Reads one file of a sample (``jpg``, ``txt``, ``json``) by byte range from its tar.

    A shard's offset table comes from ``index/offsets/`` when it matches the tar's size;
    otherwise (a run published before offset tables existed) the tar's headers are read.
    """

    def __init__(self, output_root: str, cached_shards: int = 256) -> None:
        self.output_root = output_root
        self._members = lru_cache(maxsize=cached_shards)(self._load_members)

    @cached_property
    def shards(self) -> dict[str, str]:
        """Shard name (``0000100002``) -> tar URL, for the run's current shards."""
        from stages.download import current_parts
        from stages.embeddings import list_tars

        dedup = storage.read_json(storage.join(self.output_root, "dedup", "_stats.json"))
        tars = list_tars(storage.join(self.output_root, "images"), current_parts(dedup))
        return {_tar_location(tar)[1]: tar for tar in tars}

    def tar_of(self, key: str) -> str:
        """img2dataset names a sample <shard name><index in shard>: its shard is a key prefix."""
        for length in sorted({len(name) for name in self.shards}):
            if key[:length] in self.shards:
                return self.shards[key[:length]]
        raise KeyError(f"no shard of {self.output_root} holds sample {key!r}")

    def _load_members(self, tar_url: str) -> dict[tuple[str, str], tuple[int, int]]:
        import pyarrow.parquet as pq

        part, shard = _tar_location(tar_url)
        table_url = storage.join(self.output_root, "index", "offsets", part, f"{shard}.parquet")
        tar_fs, tar_path = url_to_fs(tar_url)
        if storage.exists(table_url):
            fs, path = url_to_fs(table_url)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            if (table.schema.metadata or {}).get(b"tar_size") == str(tar_fs.size(tar_path)).encode():
                rows = table.to_pydict()
                return {(k, e): (o, s) for k, e, o, s in zip(rows["key"], rows["ext"], rows["offset"], rows["size"])}
        log.info("No current offset table for %s: reading its tar headers", tar_url)
        return {(k, e): (o, s) for k, e, o, s in tar_members(tar_url)}

    def read(self, key: str, ext: str = "jpg") -> bytes:
        tar_url = self.tar_of(key)
        try:
            offset, size = self._members(tar_url)[(key, ext)]
        except KeyError:
            raise KeyError(f"sample {key!r} has no .{ext} in {tar_url}") from None
        fs, path = url_to_fs(tar_url)
        return fs.cat_file(path, start=offset, end=offset + size)


class EmbeddingRows:
    """Row ``i`` of the embeddings in index order, read by byte range from its .npy file."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    @cached_property
    def files(self) -> list[tuple[str, int, int, int, Any]]:
        """(path, header bytes, rows, dim, dtype) of every .npy, in the order autofaiss read them."""
        import numpy as np

        fs, path = url_to_fs(self.folder)
        found = []
        for npy in sorted(fs.glob(posixpath.join(path, "*.npy"))):
            with fs.open(npy, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = np.lib.format._read_array_header(f, version)  # noqa: SLF001 - header only
                found.append((npy, f.tell(), shape[0], shape[1], dtype))
        return found

    def row(self, i: int) -> Any:
        import numpy as np

        fs, _ = url_to_fs(self.folder)
        for path, header, rows, dim, dtype in self.files:
            if i < rows:
                start = header + i * dim * dtype.itemsize
                return np.frombuffer(fs.cat_file(path, start=start, end=start + dim * dtype.itemsize), dtype=dtype)
            i -= rows
        raise IndexError(f"no embedding row {i} under {self.folder}")


class RunIndex:
    """The image index of one run and its metadata rows, in index order."""

    def __init__(self, output_root: str) -> None:
        self.output_root = output_root
        self.memory_mapped = False

    @cached_property
    def index(self) -> Any:
        import faiss

        url = storage.join(self.output_root, "index", "image.index")
        if storage.is_remote(url):
            fs, path = url_to_fs(url)
            local = os.path.join(tempfile.mkdtemp(prefix="laion-search-"), "image.index")
            fs.get_file(path, local)
            url = local
        # IVF indexes are memory-mapped: the file's pages, not a copy, back the search.
        try:
            index = faiss.read_index(url, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            self.memory_mapped = True
        except RuntimeError:  # index types that cannot be mapped are read whole
            index = faiss.read_index(url)
        if self.built.get("image", {}).get("index_param"):
            faiss.ParameterSpace().set_index_parameters(index, self.built["image"]["index_param"])
        return index

    @cached_property
    def built(self) -> dict[str, Any]:
        """build_index's ``_SUCCESS.json``: index keys, search parameters, recall."""
        return storage.read_json_or_none(storage.join(self.output_root, "index", "_SUCCESS.json")) or {}

    @cached_property
    def rows(self) -> Any:
        import pandas as pd

        folder = storage.join(self.output_root, "index", "metadata")
        if not storage.exists(folder):  # published before index/metadata existed
            folder = storage.join(self.output_root, "embeddings", "metadata")
        frames = []
        for part in storage.list_files(folder, "*.parquet"):
            fs, path = url_to_fs(part)
            with fs.open(path, "rb") as f:
                frames.append(pd.read_parquet(f))
        return pd.concat(frames, ignore_index=True)

    @cached_property
    def positions(self) -> dict[str, int]:
        """Sample key -> its row in the index."""
        return {str(key): i for i, key in enumerate(self.rows["image_path"].tolist())}

    @cached_property
    def image_embeddings(self) -> EmbeddingRows:
        return EmbeddingRows(storage.join(self.output_root, "embeddings", "img_emb"))

    def vector_of(self, key: str) -> Any:
        """The stored image embedding of sample ``key`` (KeyError when the run has no such sample)."""
        if key not in self.positions:
            raise KeyError(f"run {self.output_root} has no sample {key!r}")
        return self.image_embeddings.row(self.positions[key])

    def search_vector(self, vector: Any, k: int = 10) -> list[Hit]:
        import numpy as np

        query = np.array(vector, dtype="float32").reshape(1, -1)
        query /= np.linalg.norm(query) or 1.0
        scores, ids = self.index.search(query, k)
        hits = []
        for score, i in zip(scores[0].tolist(), ids[0].tolist()):
            if i < 0:
                continue
            row = self.rows.iloc[i]
            hits.append(Hit(str(row["image_path"]), str(row.get("caption", "")), str(row.get("url", "")), float(score)))
        return hits


class ClipEncoder:
    """Encodes text and image queries with a run's CLIP model (any clip-retrieval model string)."""

    def __init__(self, clip_model: str) -> None:
        from all_clip import load_clip

        self.model, self.preprocess, self.tokenizer = load_clip(clip_model, use_jit=False, device="cpu")

    def encode_text(self, text: str) -> Any:
        import torch

        with torch.no_grad():
            return self._normalized(self.model.encode_text(self.tokenizer([text])))

    def encode_image(self, image: Any) -> Any:
        """``image`` is a PIL image."""
        import torch

        with torch.no_grad():
            return self._normalized(self.model.encode_image(self.preprocess(image.convert("RGB")).unsqueeze(0)))

    @staticmethod
    def _normalized(emb: Any) -> Any:
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return emb[0].float().cpu().numpy()

    encode = encode_text


TextEncoder = ClipEncoder  # the name scripts/demo.py uses
