"""Exact inner products over the stored embeddings, read from their npy files a block or a
few rows at a time: the exact neighbours that recall is measured against (streamed, never
every vector in memory), and the re-ranking of a compressed index's candidates.

Rows are numbered as the index numbers them: every npy file the index holds, in name order.
A scan reads local files a block at a time and single rows (re-ranking) come from the
memory-mapped files; remote files are read by byte range.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator, Sequence
from functools import cached_property, lru_cache
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.npy import NpyFile, npy_headers

BLOCK_BYTES = 32 * 2**20  # float32 rows scanned at a time by the exact search
# Rows whose pages take() asks for together: a served query's candidates (k <= 100 results,
# k' <= 1,024 per 10). build_index's recall batches (1,000 queries x k') are read for
# throughput, where a system call per row would add about a second per batch.
PREFETCH_ROWS = 16384
# The most candidates a query may fetch for re-ranking, per 10 results: reading more rows
# than this from the npy files costs more than the search itself.
MAX_CANDIDATES = 1024
# What re-ranking one candidate costs against scanning codes, per byte: its row is read at
# a random place of the npy files (2 bytes per value as stored) where codes are read in
# sequence. Measured at 1M vectors, 32-byte PQ codes, 512-d float16 rows: about 4 us a row
# against 16 ns a code, 8 times per byte.
RERANK_BYTE_COST = 8


class StoredVectors:
    """The rows of the npy files under ``folder`` (``names`` of them, or all), in name order."""

    def __init__(self, folder: str, names: Sequence[str] | None = None) -> None:
        self.folder = folder
        self.names = sorted(names) if names is not None else None

    @cached_property
    def files(self) -> list[NpyFile]:
        found = npy_headers(self.folder)
        if self.names is not None:
            by_name = {posixpath.basename(npy.path): npy for npy in found}
            missing = [name for name in self.names if name not in by_name]
            if missing:
                raise FileNotFoundError(f"{self.folder} lacks {', '.join(missing)}, which the index holds")
            found = [by_name[name] for name in self.names]
        dims = {npy.dim for npy in found if npy.rows}
        if len(dims) > 1:
            raise ValueError(f"the npy files under {self.folder} hold rows of different widths: {sorted(dims)}")
        return found

    @cached_property
    def ends(self) -> Any:
        """Row number one past each file's last row."""
        import numpy as np

        return np.cumsum([npy.rows for npy in self.files], dtype="int64")

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.files) else 0

    @property
    def dim(self) -> int:
        return next((npy.dim for npy in self.files if npy.rows), 0)

    @cached_property
    def _fs(self) -> Any:
        return url_to_fs(self.folder)[0]

    @cached_property
    def _maps(self) -> list[Any] | None:
        """Each file's read-only memory map (local folders, None for an empty file); None where
        rows are read by byte range."""
        import mmap

        if storage.is_remote(self.folder):
            return None
        maps = []
        for npy in self.files:
            if not npy.rows:
                maps.append(None)
                continue
            with open(npy.path, "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return maps

    @cached_property
    def _mapped(self) -> list[Any] | None:
        """Each file's rows as an array over its memory map, for :meth:`take`."""
        import numpy as np

        if self._maps is None:
            return None
        return [
            np.frombuffer(m, dtype=npy.dtype, count=npy.rows * npy.dim, offset=npy.data_offset).reshape(npy.rows, npy.dim) if m else None
            for m, npy in zip(self._maps, self.files)
        ]

    def _prefetch(self, file: int, rows: Any) -> None:
        """Ask the kernel for the pages of ``rows`` of file ``file`` without waiting
        (MADV_WILLNEED): rows not in the page cache are then read from disk together rather
        than one page fault after another (a fresh service's p99 over 1M vectors: 26 ms
        without, 4 ms with)."""
        import mmap

        npy = self.files[file]
        width = npy.dim * npy.dtype.itemsize
        for row in rows.tolist():
            first = npy.data_offset + row * width
            page = first - first % mmap.PAGESIZE
            self._maps[file].madvise(mmap.MADV_WILLNEED, page, first + width - page)

    def open(self) -> StoredVectors:
        """Read the headers and map the files now rather than at the first read."""
        self._mapped  # noqa: B018
        return self

    def _rows_of(self, file: int, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of file number ``file``, in their stored type, read into memory
        (not mapped: a scan of every row would leave them all resident in this process)."""
        import numpy as np

        npy = self.files[file]
        width = npy.dim * npy.dtype.itemsize
        offset = npy.data_offset + start * width
        if not storage.is_remote(self.folder):
            data = np.fromfile(npy.path, dtype=npy.dtype, count=(stop - start) * npy.dim, offset=offset)
        else:
            data = np.frombuffer(self._fs.cat_file(npy.path, start=offset, end=offset + (stop - start) * width), dtype=npy.dtype)
        return data.reshape(stop - start, npy.dim)

    def rows(self, start: int, stop: int) -> Any:
        """Rows ``start:stop`` as one float32 array, across file boundaries."""
        import numpy as np

        pieces, begin = [], 0
        for file, npy in enumerate(self.files):
            low, high = max(start - begin, 0), min(stop - begin, npy.rows)
            if low < high:
                pieces.append(self._rows_of(file, low, high))
            begin += npy.rows
        if len(pieces) == 1:  # no copy of the stored rows before the float32 one
            return as_float32(pieces[0])
        return as_float32(np.concatenate(pieces) if pieces else np.zeros((0, self.dim)))

    def blocks(self, start: int = 0, block_rows: int | None = None) -> Iterator[tuple[int, Any]]:
        """(first row, float32 rows) from row ``start`` to the end, in blocks that begin at
        multiples of ``block_rows`` (by default a multiple of the tile faiss's exact search
        splits its database: the same sums in the same order, so the same scores to the bit)."""
        import faiss

        tile = faiss.cvar.distance_compute_blas_database_bs
        block_rows = block_rows or max(1, BLOCK_BYTES // (4 * max(1, self.dim)) // tile) * tile
        first = start
        while first < self.total:
            stop = min((first // block_rows + 1) * block_rows, self.total)
            yield first, self.rows(first, stop)
            first = stop

    def take(self, ids: Any) -> Any:
        """Rows ``ids`` (any order, repeats allowed) in their stored type."""
        import numpy as np

        ids = np.asarray(ids, dtype="int64").reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.total)]
        if len(bad):
            raise IndexError(f"no embedding row {int(bad[0])} under {self.folder} ({self.total} rows)")
        dtype = self.files[0].dtype if self.files else np.dtype("float32")
        out = np.empty((len(ids), self.dim), dtype=dtype)
        file_of = np.searchsorted(self.ends, ids, side="right")
        local = ids - (self.ends - [npy.rows for npy in self.files])[file_of]  # each id's row in its file
        if self._mapped is not None:
            # Ids grouped by file once (not a mask per file: a query's candidates touch most files).
            order = np.argsort(file_of, kind="stable")
            bounds = np.searchsorted(file_of[order], np.arange(len(self.files) + 1))
            files = np.nonzero(np.diff(bounds))[0].tolist()
            if 1 < len(ids) <= PREFETCH_ROWS:
                for file in files:  # every row's pages asked of the disk at once, then read
                    self._prefetch(file, local[order[bounds[file]:bounds[file + 1]]])
            for file in files:
                chosen = order[bounds[file]:bounds[file + 1]]
                out[chosen] = self._mapped[file][local[chosen]]
            return out
        # Remote: one ranged read per row, issued together.
        width = self.dim * dtype.itemsize
        starts = [self.files[f].data_offset + int(row) * width for f, row in zip(file_of, local)]
        data = self._fs.cat_ranges([self.files[f].path for f in file_of], starts, [s + width for s in starts])
        for row, raw in enumerate(data):
            out[row] = np.frombuffer(raw, dtype=dtype)
        return out


def as_float32(rows: Any) -> Any:
    """``rows`` (n x d) as a C-contiguous float32 array; float16 through faiss's SIMD
    decoder, exact and about 8 times faster than numpy's cast (0.03 against 0.2 ms for a
    query's 330 candidates of 512)."""
    import numpy as np

    if rows.dtype != np.float16 or rows.ndim != 2 or not rows.size:
        return np.ascontiguousarray(rows, dtype="float32")
    return _float16_decoder(rows.shape[1]).sa_decode(np.ascontiguousarray(rows).view("uint8"))


@lru_cache(maxsize=8)
def _float16_decoder(dim: int) -> Any:
    import faiss

    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)


def sample_positions(total: int, queries: int, seed: int = 0) -> Any:
    """``queries`` distinct row numbers out of ``total``, drawn with ``seed``."""
    import numpy as np

    return np.random.default_rng(seed).choice(total, size=min(queries, total), replace=False)


def exact_top_k(stored: StoredVectors, queries: Any, k: int, block_rows: int | None = None) -> tuple[Any, Any]:
    """(scores, ids) of the exact inner-product top ``k`` of ``queries`` among every stored
    row, scanning the npy files block by block with a running top-k."""
    import faiss
    import numpy as np

    queries = np.ascontiguousarray(queries, dtype="float32")
    if queries.ndim != 2 or queries.shape[1] != stored.dim:
        raise ValueError(f"queries of shape {queries.shape} do not match the {stored.dim}-d rows under {stored.folder}")
    k = min(k, stored.total)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for first, block in stored.blocks(block_rows=block_rows):
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids + first)
    heap.finalize()
    return heap.D, heap.I


def streamed_neighbours(stored: StoredVectors, *, queries: int, k: int, seed: int = 0, block_rows: int | None = None) -> tuple[Any, Any]:
    """(a sample of ``queries`` stored rows, their exact top-``k`` among all rows), as
    :func:`stages.index.build.exact_neighbours` computes it in memory, read in blocks."""
    if stored.total == 0:
        raise ValueError(f"no embedding rows under {stored.folder}: nothing to measure recall on")
    sample = as_float32(stored.take(sample_positions(stored.total, queries, seed)))
    return sample, exact_top_k(stored, sample, k, block_rows)[1]


def recall_of(
    index: Any, sample: Any, truth: Any, index_param: str | None, candidates: int | None = None, exclude: Any = None
) -> float:
    """Mean overlap of the index's top-k with the exact top-k ``truth`` of ``sample``; with
    ``candidates``, of the top-k after re-ranking that many candidates by exact inner
    product, which holds every true neighbour among the candidates. ``exclude``: one row
    per query that its results leave out (the query's own, see :func:`leave_out`)."""
    import faiss

    if index_param:
        faiss.ParameterSpace().set_index_parameters(index, index_param)
    wanted = max(truth.shape[1], candidates or 0)
    _, found = index.search(sample, wanted + (exclude is not None))
    if exclude is not None:
        found = [[i for i in f if i != own][:wanted] for f, own in zip(found.tolist(), exclude.tolist())]
    else:
        found = found.tolist()
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found))
    return hits / truth.size


def leave_out(truth: Any, own: Any, k: int) -> Any:
    """The first ``k`` of each row of ``truth`` without the query's ``own`` row: the
    neighbours a query from outside the index would have, where the query is a row of it."""
    import numpy as np

    return np.array([[i for i in t if i != o][:k] for t, o in zip(truth.tolist(), own.tolist())], dtype="int64")


def fewest_candidates(index: Any, sample: Any, truth: Any, index_param: str | None, target: float, exclude: Any = None) -> int:
    """The least number of candidates k' (at least k) whose exact re-ranking keeps recall
    ``target``; where no k' up to ``MAX_CANDIDATES`` does, the least that gives the recall
    of ``MAX_CANDIDATES``.

    Re-ranking by exact inner product puts every true neighbour among the candidates into
    the top k, and a deeper search holds more of them, so recall grows with k' and a
    bisection finds the least. Each step searches for that many candidates, as a query
    does: PQ codes tie often, and which of the tied a search keeps depends on how many it
    asks for, so the first k' of a deeper search are not quite its result.
    """
    k = truth.shape[1]
    low, high = k, max(k, min(MAX_CANDIDATES, int(index.ntotal)))
    target = min(target, recall_of(index, sample, truth, index_param, high, exclude))
    while low < high:
        middle = (low + high) // 2
        if recall_of(index, sample, truth, index_param, middle, exclude) >= target:
            high = middle
        else:
            low = middle + 1
    return high


def search_params(index_param: str | None) -> dict[str, str]:
    """faiss's ``ParameterSpace`` string (``nprobe=7,ht=2048``) as name -> value."""
    return dict(p.split("=", 1) for p in index_param.split(",")) if index_param else {}


def search_cost(index: Any, index_param: str | None, candidates: int, dim: int) -> float:
    """Bytes a query reads, weighted: the codes of the ``nprobe`` lists it scans (the whole
    index without ``nprobe``) and ``RERANK_BYTE_COST`` times the rows it re-ranks."""
    import faiss

    params = search_params(index_param)
    try:
        ivf = faiss.extract_index_ivf(index)
        scanned = int(params.get("nprobe", ivf.nlist)) * index.ntotal / ivf.nlist * ivf.code_size
    except RuntimeError:  # not an IVF index: every code is scanned
        scanned = index.ntotal * index.sa_code_size()
    return scanned + RERANK_BYTE_COST * candidates * 2 * dim


def cheapest_search(
    index: Any, sample: Any, truth: Any, index_param: str, candidates: int, target: float, exclude: Any = None
) -> tuple[str, int]:
    """Of the (``index_param``, k') pairs that keep ``target``, the one of least
    :func:`search_cost`: starting from ``candidates`` at ``index_param``, k' doubled up to
    ``MAX_CANDIDATES``, each with the fewest probes that then keep ``target`` and the
    fewest candidates at those probes. More candidates re-ranked let a search probe fewer
    lists: on data whose neighbours spread over many lists that is the cheaper way."""
    from stages.index.build import fewest_probes  # the bisection over nprobe

    dim = sample.shape[1]
    best = (search_cost(index, index_param, candidates, dim), index_param, candidates)
    wider, cap = candidates, max(candidates, min(MAX_CANDIDATES, int(index.ntotal)))
    while wider < cap:
        wider = min(cap, wider * 2)
        probes = fewest_probes(index, sample, truth, index_param, target, wider, exclude)
        if recall_of(index, sample, truth, probes, wider, exclude) < target:
            continue
        fewest = fewest_candidates(index, sample, truth, probes, target, exclude)
        cost = search_cost(index, probes, fewest, dim)
        if cost < best[0]:
            best = (cost, probes, fewest)
    return best[1], best[2]


def candidates_for(rerank_k: int | None, k: int, ntotal: int) -> int:
    """How many candidates a query for ``k`` results fetches: ``rerank_k`` was chosen for 10."""
    if not rerank_k or rerank_k <= 10:
        return min(k, ntotal)
    return min(max(k, math.ceil(rerank_k * k / 10)), ntotal)


def rerank(queries: Any, candidates: Any, stored: StoredVectors, k: int) -> tuple[Any, Any]:
    """(scores, ids): the top ``k`` of each row of ``candidates`` (ids, -1 for none) by exact
    inner product with the stored rows; -1 / -inf where fewer than ``k`` candidates exist."""
    import numpy as np

    queries = np.asarray(queries, dtype="float32")
    candidates = np.asarray(candidates, dtype="int64")
    valid = candidates >= 0
    vectors = as_float32(stored.take(candidates[valid]))
    scores = np.full(candidates.shape, -np.inf, dtype="float32")
    rows = np.nonzero(valid)[0]
    scores[valid] = np.einsum("ij,ij->i", vectors, queries[rows])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(candidates, order, axis=1), -1)
    return top_scores, top_ids
