"""Reading a finished run: its knn index, its metadata rows and embeddings, its samples.

Everything is read where the run lies (a local path or s3://) through its
:class:`~stages.layout.RunLayout`: a sample is one ranged read of its tar, an embedding
row a read of its memory-mapped ``.npy`` (one ranged read on S3); nothing is unpacked or
copied whole, the image index aside when it is remote (faiss maps local files only).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.index.rerank import StoredVectors, candidates_for, rerank
from stages.layout import RunLayout, shard_location

log = logging.getLogger(__name__)


CACHE_DIR_ENV = "LAION_SEARCH_CACHE_DIR"
STALE_PARTIAL_SECONDS = 86400


def local_copy(url: str, cache_dir: str | None = None) -> str:
    """A local copy of the remote file ``url``, for memory-mapping: downloaded once per
    version (size and ETag or modification time) into ``cache_dir`` (by default
    ``$LAION_SEARCH_CACHE_DIR``, else ``laion-search-cache`` in the temporary folder), kept
    across restarts, written under a temporary name and renamed whole. Copies of the same
    ``url``'s earlier versions are removed then (a process still mapping one keeps reading it:
    the file's pages live until it is unmapped), so each url holds one file's room.
    """
    import hashlib
    import uuid

    fs, path = url_to_fs(url)
    info = fs.info(path)
    version = "|".join(str(info.get(field) or "") for field in ("size", "ETag", "LastModified", "mtime"))
    folder = os.path.join(cache_dir or os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "laion-search-cache"),
                          hashlib.sha256(url.encode()).hexdigest()[:20])
    name = hashlib.sha256(version.encode()).hexdigest()[:20] + os.path.splitext(path)[1]
    local = os.path.join(folder, name)
    if not os.path.exists(local):
        os.makedirs(folder, exist_ok=True)
        partial = f"{local}.{uuid.uuid4().hex}.partial"
        try:
            fs.get_file(path, partial)
            os.replace(partial, local)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        log.info("Copied %s (%s bytes) to %s", url, info.get("size"), local)
    ours = os.path.getmtime(local)
    for other in os.listdir(folder):
        other_path = os.path.join(folder, other)
        try:
            # Older versions go; a newer one is another process's; a .partial is being
            # written unless a day passed (a killed download's).
            if other.endswith(".partial"):
                stale = time.time() - os.path.getmtime(other_path) > STALE_PARTIAL_SECONDS
            else:
                stale = other != name and os.path.getmtime(other_path) < ours
            if stale:
                os.remove(other_path)
        except FileNotFoundError:  # removed by another process meanwhile
            pass
    return local


@dataclass
class Hit:
    key: str
    caption: str
    url: str
    score: float


class SampleReader:
    """Reads one file of a sample (``jpg``, ``txt``, ``json``) by byte range from its tar.

    A shard's offset table comes from ``index/offsets/`` when it matches the tar's size;
    otherwise (a run published before offset tables existed) the tar's headers are read.
    """

    def __init__(self, output_root: str, cached_shards: int = 256) -> None:
        self.layout = RunLayout(output_root)
        self._members = lru_cache(maxsize=cached_shards)(self._load_members)

    @cached_property
    def shards(self) -> dict[str, str]:
        """Shard name (``0000100002``) -> tar URL, for the run's current shards."""
        return {shard_location(tar)[1]: tar for tar in self.layout.current_shards()}

    def tar_of(self, key: str) -> str:
        """img2dataset names a sample <shard name><index in shard>: its shard is a key prefix."""
        for length in sorted({len(name) for name in self.shards}):
            if key[:length] in self.shards:
                return self.shards[key[:length]]
        raise KeyError(f"no shard of {self.layout.output_root} holds sample {key!r}")

    def _load_members(self, tar_url: str) -> dict[tuple[str, str], tuple[int, int]]:
        import pyarrow.parquet as pq

        from stages.index.search_files import tar_members

        table_url = self.layout.offsets_table(*shard_location(tar_url))
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


class EmbeddingRows(StoredVectors):
    """Row ``i`` of the embeddings in index order: memory-mapped from its .npy file, or one
    ranged read of it on S3."""

    def row(self, i: int) -> Any:
        return self.take([i])[0]


class MetadataRows:
    """The metadata rows of a run's index, read where they lie: row ``i`` (files in name
    order, rows in file order, as the npy files) and the row of a sample key.

    What stays in memory is per file: its row count, its row groups' first rows and the
    range of its keys (``image_path``: the row groups' statistics, else that column read
    once), plus the last ``cached`` row groups read (``image_path``, ``caption``, ``url``),
    the last ``cached`` files' key columns and the last ``open_files`` files opened, footer
    parsed (a hit in a file opened lately costs one row group's read and decoding). Nothing
    grows with the number of samples.
    """

    COLUMNS = ("image_path", "caption", "url")
    REMOTE_BLOCK = 2**20  # bytes read ahead per remote file

    def __init__(self, files: list[str], cached: int = 8, open_files: int = 64) -> None:
        import numpy as np

        self.files = files
        self.starts = [0]  # the first row of each file in index order, then the total
        self.groups: list[Any] = []  # per file: the first row of each row group in it (int64: 8 bytes a group)
        self.key_ranges: list[tuple[str, str] | None] = []  # per file: its least and greatest key
        for f in range(len(files)):
            with self._open(f) as parquet:
                meta = parquet.metadata
                if "image_path" not in parquet.schema_arrow.names:
                    raise ValueError(f"metadata file {files[f]} has no image_path column (columns: {', '.join(parquet.schema_arrow.names)})")
                firsts = [0]
                for g in range(meta.num_row_groups):
                    firsts.append(firsts[-1] + meta.row_group(g).num_rows)
                self.groups.append(np.array(firsts[:-1], dtype="int64"))
                self.starts.append(self.starts[-1] + meta.num_rows)
                self.key_ranges.append(self._key_range(parquet))
        self._opened: OrderedDict[int, tuple[Any, Any, list[str]]] = OrderedDict()  # file -> (handle, ParquetFile, columns), last used last
        self._open_files = open_files
        self._reading = threading.Lock()  # an open file's handle is shared: one read at a time
        self._row_group = lru_cache(maxsize=cached)(self._read_row_group)
        self._positions = lru_cache(maxsize=cached)(self._read_positions)

    def __len__(self) -> int:
        return self.starts[-1]

    @contextmanager
    def _open(self, f: int) -> Iterator[Any]:
        import pyarrow.parquet as pq

        with self._handle(f) as handle:
            yield pq.ParquetFile(handle)

    def _handle(self, f: int) -> Any:
        """File ``f`` opened for reading; on an object store with a small read-ahead buffer
        (fsspec's default block, 50 MiB on S3, would be held by every file kept open)."""
        fs, path = url_to_fs(self.files[f])
        if storage.is_remote(self.files[f]):
            return fs.open(path, "rb", block_size=self.REMOTE_BLOCK, cache_type="readahead")
        return fs.open(path, "rb")

    def _key_range(self, parquet: Any) -> tuple[str, str] | None:
        """The least and greatest key of a file: from its row groups' statistics when every
        one has them (strings), else from its key column, read once."""
        meta = parquet.metadata
        column = [meta.schema.column(c).path for c in range(meta.num_columns)].index("image_path")
        lows, highs = [], []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(column).statistics
            if group.num_rows and stats is not None and stats.has_null_count and stats.null_count == group.num_rows:
                continue  # no key in this row group
            if group.num_rows and (stats is None or not stats.has_min_max or not isinstance(stats.min, str)):
                keys = [str(k) for k in parquet.read(columns=["image_path"]).column(0).to_pylist() if k is not None]
                return (min(keys), max(keys)) if keys else None
            if group.num_rows:
                lows.append(stats.min)
                highs.append(stats.max)
        return (min(lows), max(highs)) if lows else None

    def _opened_file(self, f: int) -> Any:
        """File ``f``'s (handle, ParquetFile, columns to read), kept open (the least lately
        used closed past ``open_files``); the caller holds ``_reading``."""
        import pyarrow.parquet as pq

        if f in self._opened:
            self._opened.move_to_end(f)
        else:
            handle = self._handle(f)
            parquet = pq.ParquetFile(handle)
            self._opened[f] = (handle, parquet, [c for c in self.COLUMNS if c in parquet.schema_arrow.names])
            if len(self._opened) > self._open_files:
                self._opened.popitem(last=False)[1][0].close()
        return self._opened[f]

    def _read_row_group(self, f: int, g: int) -> Any:
        with self._reading:
            _, parquet, columns = self._opened_file(f)
            # One small read: pyarrow's thread pool would cost more than it saves.
            return parquet.read_row_group(g, columns=columns, use_threads=False)

    def close(self) -> None:
        """Close the files kept open."""
        with self._reading:
            while self._opened:
                self._opened.popitem()[1][0].close()

    def _read_positions(self, f: int) -> dict[str, int]:
        """Key -> its row in file ``f`` (the first, for a key written twice)."""
        with self._reading:
            keys = self._opened_file(f)[1].read(columns=["image_path"]).column(0).to_pylist()
        return {str(k): j for j, k in reversed(list(enumerate(keys))) if k is not None}

    def row(self, i: int) -> dict[str, str]:
        """Row ``i`` in index order: its ``image_path``, ``caption`` and ``url`` ("" where missing)."""
        import numpy as np

        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is outside the {len(self)} metadata rows of {os.path.dirname(self.files[0])}")
        f = bisect_right(self.starts, i) - 1
        local = i - self.starts[f]
        g = int(np.searchsorted(self.groups[f], local, side="right")) - 1
        table = self._row_group(f, g)
        j = local - int(self.groups[f][g])
        values = {name: table.column(name)[j].as_py() for name in table.column_names}
        return {name: "" if values.get(name) is None else str(values[name]) for name in self.COLUMNS}

    def position(self, key: str) -> int | None:
        """The row of sample ``key`` in index order (None when no file holds it): the files
        whose key range covers it are searched in order, though in practice one does."""
        for f, bounds in enumerate(self.key_ranges):
            if bounds is not None and bounds[0] <= key <= bounds[1]:
                j = self._positions(f).get(key)
                if j is not None:
                    return self.starts[f] + j
        return None

    def cached(self) -> dict[str, int]:
        """How many decoded row groups and key columns are held now."""
        return {"row_groups": self._row_group.cache_info().currsize, "key_columns": self._positions.cache_info().currsize,
                "open_files": len(self._opened)}


class RunIndex:
    """The image index of one run and its metadata rows, in index order."""

    def __init__(self, output_root: str) -> None:
        self.layout = RunLayout(output_root)
        self.memory_mapped = False

    @property
    def output_root(self) -> str:
        return self.layout.output_root

    @cached_property
    def index(self) -> Any:
        import faiss

        url = self.layout.index_file("image")
        if storage.is_remote(url):
            url = local_copy(url)
        # IVF indexes are memory-mapped: the file's pages, not a copy, back the search.
        try:
            index = faiss.read_index(url, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            self.memory_mapped = True
        except RuntimeError:  # index types that cannot be mapped are read whole
            index = faiss.read_index(url)
        if self.built.get("image", {}).get("index_param"):
            faiss.ParameterSpace().set_index_parameters(index, self.built["image"]["index_param"])
        if self.rerank_k > 10:
            self.indexed_vectors.open()  # mapped now: a batch removed later leaves these rows readable
        return index

    @property
    def rerank_k(self) -> int:
        """Candidates per 10 results that build_index chose to re-rank exactly (0 or 10: none)."""
        return int(self.built.get("image", {}).get("rerank_k") or 0)

    @cached_property
    def indexed_vectors(self) -> StoredVectors:
        """The stored image embeddings the index holds, in its row order (the npy files its marker names)."""
        built = self.built.get("image", {})
        stored = StoredVectors(self.indexed_files("img_emb"), names=list(built["files"]) if "files" in built else None)
        if "ntotal" in built and stored.total != built["ntotal"]:
            raise ValueError(f"the npy files under {stored.folder} hold {stored.total} rows, the image index {built['ntotal']}: "
                             "rerun build_index")
        return stored

    def indexed_files(self, kind: str) -> str:
        """The folder of the npy (or metadata) files the index holds: the curated samples
        (indexes built before curation existed hold all of ``embeddings/``)."""
        if self.built.get("source") == "curated":
            return self.layout.curated_files(kind)
        return self.layout.embedding_files(kind)

    @cached_property
    def built(self) -> dict[str, Any]:
        """build_index's marker: index keys, search parameters, recall."""
        return self.layout.index_marker.read() or {}

    @cached_property
    def rows(self) -> MetadataRows:
        """The metadata rows in index order, looked up where they lie (footers read now)."""
        folder = self.layout.search_metadata
        if not storage.exists(folder):  # published before index/metadata existed
            folder = self.indexed_files("metadata")
        files = storage.list_files(folder, "*.parquet")
        if not files:
            raise FileNotFoundError(f"{folder} holds no metadata .parquet: the index of {self.output_root} has no rows to show")
        return MetadataRows(files)

    @cached_property
    def image_embeddings(self) -> EmbeddingRows:
        return EmbeddingRows(self.indexed_files("img_emb"), names=list(self.built.get("image", {}).get("files", {})) or None)

    def vector_of(self, key: str) -> Any:
        """The stored image embedding of sample ``key`` (KeyError when the run has no such sample)."""
        position = self.rows.position(key)
        if position is None:
            raise KeyError(f"run {self.output_root} has no sample {key!r}")
        return self.image_embeddings.row(position)

    def search_vector(self, vector: Any, k: int = 10) -> list[Hit]:
        import numpy as np

        query = np.array(vector, dtype="float32").reshape(1, -1)
        query /= np.linalg.norm(query) or 1.0
        # A compressed index's codes rank only roughly: its top k' are re-ranked by exact
        # inner products with their stored rows (k' rows read from the npy files).
        wanted = candidates_for(self.rerank_k, k, self.index.ntotal)
        scores, ids = self.index.search(query, wanted)
        if wanted > k:
            scores, ids = rerank(query, ids, self.indexed_vectors, k)
        hits = []
        for score, i in zip(scores[0].tolist(), ids[0].tolist()):
            if i < 0:
                continue
            row = self.rows.row(i)
            hits.append(Hit(row["image_path"], row["caption"], row["url"], float(score)))
        return hits
