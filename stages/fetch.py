"""fetch_metadata: copy the raw metadata sources into ``<output_root>/raw/``."""

from __future__ import annotations

import hashlib
import logging
import posixpath
import shutil
import time
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from stages import storage

log = logging.getLogger(__name__)

GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    url: str
    name: str
    size: int | None


def expand_sources(metadata_urls: list[str]) -> list[Source]:
    """Resolve each entry (URL, local path or fsspec glob) into concrete files.

    An entry that matches nothing is an error naming it: an empty fetch would silently
    produce an empty dataset.
    """
    if not metadata_urls:
        raise ValueError("metadata_urls is empty: give at least one CSV or parquet source")
    sources: list[Source] = []
    for entry in metadata_urls:
        url = entry[len("file://") :] if entry.startswith("file://") else entry
        fs, path = url_to_fs(url)
        if GLOB_CHARS & set(path) and not url.startswith(("http://", "https://")):
            paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        elif url.startswith(("http://", "https://")) or fs.isfile(path):
            paths = [path]
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_")))
        else:
            paths = []
        if not paths:
            raise FileNotFoundError(f"metadata source {entry!r} matches no file")
        for p in paths:
            full = p if url.startswith(("http://", "https://")) else _unstrip(fs, p)
            sources.append(Source(url=full, name=raw_name(full), size=_size(fs, p)))
    return sources


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        return fs.size(path)
    except (OSError, NotImplementedError, ValueError):
        return None


def raw_name(url: str) -> str:
    """``<8 hex of the source URL>-<basename>``: two sources never share a name in raw/,
    and a source fetched again lands on its earlier copy (skipped when the size matches)."""
    return f"{hashlib.sha1(url.encode()).hexdigest()[:8]}-{posixpath.basename(url.split('?')[0])}"


def fetch_metadata(metadata_urls: list[str], raw_dir: str) -> dict:
    """Copy every source into ``raw_dir``; a file already there with the same size is kept."""
    started = time.monotonic()
    fetched, skipped, total_bytes = [], [], 0
    for source in expand_sources(metadata_urls):
        target = storage.join(raw_dir, source.name)
        if source.size is not None and storage.exists(target):
            fs, path = url_to_fs(target)
            if fs.size(path) == source.size:
                log.info("Skipping %s: already fetched with the same size (%d bytes)", source.name, source.size)
                skipped.append(source.name)
                continue
        with fsspec.open(source.url, "rb") as src, storage.atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=4 << 20)
            size = dst.tell()
        log.info("Fetched %s (%d bytes)", source.name, size)
        fetched.append(source.name)
        total_bytes += size
    seconds = time.monotonic() - started
    return {
        "files_fetched": len(fetched),
        "files_skipped": len(skipped),
        "files": sorted(fetched + skipped),
        "bytes": total_bytes,
        "seconds": round(seconds, 3),
    }

