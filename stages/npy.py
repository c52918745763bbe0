"""Rows of 2-D ``.npy`` files (clip-retrieval's embeddings) read by their headers: counts,
shapes and byte offsets without loading the arrays."""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs


@dataclass(frozen=True)
class NpyFile:
    """Where the rows of one 2-D, C-ordered ``.npy`` start, and their shape and type."""

    path: str  # as its filesystem names it (no protocol)
    data_offset: int
    rows: int
    dim: int
    dtype: Any


def read_npy_header(f: Any, name: str) -> NpyFile:
    """The header of the ``.npy`` open in ``f``, read with numpy's public format API only."""
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = npy.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):  # 3.0 differs from 2.0 only in how field names are encoded
        shape, fortran_order, dtype = npy.read_array_header_2_0(f)
    else:
        raise ValueError(f"{name} is .npy format version {version[0]}.{version[1]}; readable: 1.0, 2.0, 3.0")
    # Rows are read by byte range: they must be rows of a 2-D array, one after the other.
    if len(shape) != 2 or fortran_order:
        raise ValueError(f"{name} holds a {'Fortran-ordered ' if fortran_order else ''}array of shape {shape}, not rows of embeddings")
    return NpyFile(name, f.tell(), shape[0], shape[1], dtype)


def npy_headers(folder: str) -> list[NpyFile]:
    """The header of every .npy in ``folder``, in the order autofaiss reads them (by name)."""
    fs, path = url_to_fs(folder)
    found = []
    for npy in sorted(fs.glob(posixpath.join(path, "*.npy"))):
        with fs.open(npy, "rb") as f:
            found.append(read_npy_header(f, npy))
    return found


def count_rows(folder: str, sub: str, partitions: list[str]) -> tuple[int, int]:
    """(rows, dim) over the .npy files of ``partitions`` in ``folder``, reading only their headers."""
    fs, path = url_to_fs(folder)
    rows, dim = 0, 0
    for name in partitions:
        npy = posixpath.join(path, f"{sub}_{name}.npy")
        if fs.exists(npy):  # a partition whose shards held no image writes no npy
            with fs.open(npy, "rb") as f:
                header = read_npy_header(f, npy)
            rows, dim = rows + header.rows, header.dim
    return rows, dim


def count_embeddings(folder: str) -> tuple[int, int]:
    """(rows, dim) over every .npy in ``folder``, reading only the npy headers."""
    headers = npy_headers(folder)
    return sum(h.rows for h in headers), (headers[-1].dim if headers else 0)


def load_embeddings(folder: str) -> "Any":
    """Every .npy in ``folder`` concatenated in name order (the order autofaiss indexes them)."""
    import numpy as np

    fs, path = url_to_fs(folder)
    arrays = []
    for npy in sorted(fs.glob(posixpath.join(path, "*.npy"))):
        with fs.open(npy, "rb") as f:
            arrays.append(np.load(io.BytesIO(f.read())))
    return np.concatenate(arrays) if arrays else np.zeros((0, 0), dtype="float32")


