"""The dedup's input folder: which files it holds, what each one is, and setting bad ones aside.

No Spark here: the operator lists and fingerprints the input before deciding to submit.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

DELIMITERS = ("|", ",", "\t", ";")
REJECTED_DIR = "_rejected"  # bad input files are moved here; the output keeps its rejected sample here


class DedupInputError(ValueError):
    """The input folder or one of its files cannot be read as LAION metadata."""


@dataclass(frozen=True)
class InputFile:
    name: str  # file name inside the input folder
    source: str  # where it came from, for messages
    local_path: str  # where Spark reads it
    format: str  # "csv", "parquet" or "empty"
    delimiter: str | None  # None for parquet
    header: str | None = None  # a CSV's first line


def list_input_files(fs: AbstractFileSystem, root: str, input_url: str) -> list[tuple[str, int]]:
    """(name, size) of the data files directly under `root`, sorted; '_' and '.' names are skipped."""
    if not fs.isdir(root):
        raise DedupInputError(f"input folder {input_url} does not exist")
    listing = sorted(
        (Path(entry["name"]).name, int(entry["size"]))
        for entry in fs.ls(root, detail=True)
        if entry["type"] == "file" and not Path(entry["name"]).name.startswith(("_", "."))
    )
    if not listing:
        raise DedupInputError(f"input folder {input_url} holds no data files")
    return listing


def input_fingerprint(listing: Sequence[tuple[str, int]]) -> str:
    return hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()


def detect_file(name: str, source: str, local_path: str) -> InputFile:
    """Tell parquet from CSV (by extension or magic bytes) and sniff a CSV's delimiter."""
    with open(local_path, "rb") as handle:
        magic = handle.read(4)
    if name.lower().endswith(".parquet") or magic == b"PAR1":
        return InputFile(name, source, local_path, "parquet", None)
    gzipped = name.lower().endswith(".gz")
    if magic.startswith(b"\x1f\x8b") and not gzipped:
        raise DedupInputError(f"input file {source} is gzip-compressed: rename it to end in .gz")
    try:
        with (gzip.open if gzipped else open)(local_path, "rb") as handle:
            header = handle.readline(1 << 16).decode("utf-8-sig")
            empty = not header.strip() and not handle.read(1 << 16).strip()
        if empty:
            return InputFile(name, source, local_path, "empty", None)
        if "\x00" in header or not header.strip():
            raise ValueError("no text header row")
    except (OSError, EOFError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise DedupInputError(
            f"input file {source} is neither CSV nor parquet (columns: none, {error}); "
            "expected a CSV with a header row or a parquet file"
        ) from error
    return InputFile(name, source, local_path, "csv", sniff_delimiter(header), header)


def sniff_delimiter(header: str) -> str:
    """The candidate delimiter seen most often outside quotes in a header line (',' if none)."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(DELIMITERS, key=counts.__getitem__)
    return best if counts[best] else ","


def set_aside(fs: AbstractFileSystem, root: str, name: str) -> None:
    """Move a bad input file to ``<input>/_rejected/``, which later runs do not read."""
    fs.makedirs(f"{root}/{REJECTED_DIR}", exist_ok=True)
    fs.mv(f"{root}/{name}", f"{root}/{REJECTED_DIR}/{name}")


# Spark here has no hadoop-aws jars, so remote inputs are copied to the driver's disk (and
# the finished parts uploaded from there, see outputs.work_dir). That suits a local master
# only (executors on other machines cannot see the driver's disk); a cluster should read
# and write s3a:// paths through hadoop-aws instead.
@contextlib.contextmanager
def local_input_dir(fs: AbstractFileSystem, root: str, listing: Sequence[tuple[str, int]]) -> Iterator[str]:
    """A local folder holding the listed files: ``root`` itself when local, else a temporary copy."""
    if isinstance(fs, LocalFileSystem):
        yield root
        return
    staging = tempfile.mkdtemp(prefix="dedup-input-")
    try:
        for name, _ in listing:
            fs.get_file(f"{root}/{name}", os.path.join(staging, name))
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
