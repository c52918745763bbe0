"""Hash blocklists: URLs that are never requested, images that are never written.

Each list is a file (local, ``s3://`` or ``http(s)://``) of hex digests, one per line:
sha256 (64 hex digits) or md5 (32), upper or lower case; blank lines are ignored. A URL's
digest is of the exact URL string in UTF-8, an image's of its bytes as served (before any
resize), as Re-LAION-5B's lists are.

- URLs: :func:`drop_blocked_urls` removes a part's blocked rows before img2dataset reads
  the part, and records how many in the part's ``_state/blocked_urls.json``.
- Images: :mod:`stages.images.img2dataset_patches` checks the bytes right after each
  fetch; a match is dropped there with the error ``blocked_image``, which img2dataset
  counts in the shard's stats and which no retry of failed samples retries.

A list's digests never reach a log, an error or the report: only counts do.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable

from fsspec.core import url_to_fs

from stages import storage
from stages.errors import InputError
from stages.images.parts import state_folder
from stages.images.shards import summarize_shards
from stages.layout import RunLayout
from stages.settings import setting

log = logging.getLogger(__name__)

BLOCKED_IMAGE = "blocked_image"  # the sample's error in img2dataset's parquet and stats
BLOCKED_URLS_FILE = "blocked_urls.json"  # in a part's _state/: what drop_blocked_urls did
FILTERED_PART = "unblocked.parquet"  # in a part's _state/: the rows img2dataset downloads
DIGEST_LENGTHS = {64: "sha256", 32: "md5"}
HEX = frozenset("0123456789abcdefABCDEF")
_LIST_FILES = "Files (local, s3:// or http(s)://) of hex digests, one per line: sha256 (64 hex) or md5 (32 hex)"


@dataclass(frozen=True)
class BlocklistSettings:
    """The hash lists a download must honour."""

    blocked_url_hashes: tuple[str, ...] = setting(
        [], type="array", items={"type": "string", "minLength": 1},
        description=f"{_LIST_FILES} of the exact URL string in UTF-8. A listed URL is never requested.",
    )  # fmt: skip
    blocked_image_hashes: tuple[str, ...] = setting(
        [], type="array", items={"type": "string", "minLength": 1},
        description=f"{_LIST_FILES} of the image bytes as served. A listed image is never written to a shard.",
    )  # fmt: skip

    def __post_init__(self) -> None:
        # The params give lists: tuples keep the frozen settings immutable and hashable.
        for name in ("blocked_url_hashes", "blocked_image_hashes"):
            files = self.__dict__[name]
            files = (files,) if isinstance(files, str) else tuple(files)
            if any(not isinstance(f, str) or not f.strip() for f in files):
                raise InputError(f"{name}: every entry must be a file path or URL, got {list(files)!r}")
            object.__setattr__(self, name, files)


@dataclass(frozen=True)
class Blocklist:
    """The digests of one or more lists, as bytes, by algorithm."""

    sha256: frozenset[bytes] = frozenset()
    md5: frozenset[bytes] = frozenset()

    def __len__(self) -> int:
        return len(self.sha256) + len(self.md5)

    def matches(self, data: bytes) -> bool:
        """Whether the sha256 or the md5 of ``data`` is on the list."""
        if self.sha256 and hashlib.sha256(data).digest() in self.sha256:
            return True
        return bool(self.md5) and hashlib.md5(data, usedforsecurity=False).digest() in self.md5

    def matches_url(self, url: str) -> bool:
        return self.matches(url.encode("utf-8"))

    def fingerprint(self) -> str | None:
        """One digest of the whole list (None when empty): which list a part was filtered with."""
        if not self:
            return None
        total = hashlib.sha256()
        for digest in sorted(self.sha256) + sorted(self.md5):
            total.update(digest)
        return total.hexdigest()


def load_blocklist(urls: Iterable[str], param: str) -> Blocklist:
    """The digests of the files ``urls``; an :class:`InputError` naming ``param``, the file
    and the line when a file cannot be read or a line is not a digest."""
    found: dict[str, set[bytes]] = {"sha256": set(), "md5": set()}
    for url in urls:
        for algorithm, digest in _digests(url, param):
            found[algorithm].add(digest)
    return Blocklist(sha256=frozenset(found["sha256"]), md5=frozenset(found["md5"]))


def _digests(url: str, param: str) -> Iterable[tuple[str, bytes]]:
    try:
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
        raise InputError(f"{param}: cannot read the blocklist {url}: {type(error).__name__}") from None
    except Exception as error:
        # Network and store errors may pass: not an InputError, so the task is retried.
        raise OSError(f"{param}: cannot read the blocklist {url}: {type(error).__name__}: {error}") from error
    for number, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        # The line itself is never quoted: it may be most of a listed digest.
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise InputError(f"{param}: {url} line {number}: not a hex digest (it holds non-ASCII bytes)") from None
        if not HEX.issuperset(text):
            raise InputError(f"{param}: {url} line {number}: not a hex digest (it holds characters other than 0-9, a-f)")
        if len(text) not in DIGEST_LENGTHS:
            raise InputError(
                f"{param}: {url} line {number}: {len(text)} hex digits; a digest is sha256 (64 hex digits) or md5 (32)"
            )
        yield DIGEST_LENGTHS[len(text)], bytes.fromhex(text)


def validate_blocklists(settings: BlocklistSettings) -> dict[str, int]:
    """Load both lists (a bad one fails here, before any work); the number of digests of each."""
    return {
        "blocked_url_hashes": len(load_blocklist(settings.blocked_url_hashes, "blocked_url_hashes")),
        "blocked_image_hashes": len(load_blocklist(settings.blocked_image_hashes, "blocked_image_hashes")),
    }


def image_blocklist(settings: BlocklistSettings) -> Blocklist:
    return load_blocklist(settings.blocked_image_hashes, "blocked_image_hashes")


def url_blocklist(settings: BlocklistSettings) -> Blocklist:
    return load_blocklist(settings.blocked_url_hashes, "blocked_url_hashes")


def recorded_blocked_urls(output_folder: str) -> dict[str, Any] | None:
    """What :func:`drop_blocked_urls` recorded for a part folder; None before it ran there."""
    return storage.read_json_or_none(storage.join(state_folder(output_folder), BLOCKED_URLS_FILE))


def drop_blocked_urls(part_url: str, output_folder: str, blocklist: Blocklist, *, dedup_version: str) -> tuple[str, int]:
    """(the rows of ``part_url`` whose URL is not on ``blocklist``, how many rows were left out).

    The rows are the part itself when none is blocked, else a parquet in the part's
    ``_state/``; the count is recorded in ``_state/blocked_urls.json``.

    The filtered rows are kept for reruns: a resumed download must number the same rows
    the same way. Callers remove the part's shards first when the list changed
    (:func:`blocklist_changed`).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fingerprint = blocklist.fingerprint()
    filtered = storage.join(state_folder(output_folder), FILTERED_PART)
    recorded = recorded_blocked_urls(output_folder) or {}
    if recorded.get("url_blocklist") == fingerprint and recorded.get("dedup_version") == dedup_version:
        if not recorded["blocked_url"]:
            return part_url, 0
        if storage.exists(filtered):
            return filtered, recorded["blocked_url"]
    blocked = 0
    if blocklist:
        fs, path = url_to_fs(part_url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        keep = pa.array([not blocklist.matches_url(url) for url in table.column("URL").to_pylist()], pa.bool_())
        blocked = table.num_rows - pc.sum(keep).as_py() if table.num_rows else 0
        if blocked:
            with storage.atomic_open(filtered) as f:
                pq.write_table(table.filter(keep), f)
        log.info("%s: %d of %d rows have a blocked URL and are not downloaded", part_url, blocked, table.num_rows)
    storage.write_json(storage.join(state_folder(output_folder), BLOCKED_URLS_FILE), _record(fingerprint, dedup_version, blocked))
    return (filtered if blocked else part_url), blocked


def blocklist_changed(output_folder: str, blocklist: Blocklist) -> bool:
    """Whether the part's shards were made with another URL list than ``blocklist``."""
    recorded = recorded_blocked_urls(output_folder)
    return (recorded or {}).get("url_blocklist") != blocklist.fingerprint()


def _record(fingerprint: str | None, dedup_version: str, blocked: int | None) -> dict[str, Any]:
    return {"url_blocklist": fingerprint, "dedup_version": dedup_version, "blocked_url": blocked}


def blocked_counts(layout: RunLayout, parts: list[str]) -> dict[str, int]:
    """Rows never requested for a blocked URL, and images dropped as blocked, in ``parts``."""
    urls = sum(int((recorded_blocked_urls(layout.part_images(p)) or {}).get("blocked_url") or 0) for p in parts)
    images = summarize_shards(layout.images, parts)["errors"].get(BLOCKED_IMAGE, 0) if parts else 0
    return {"blocked_url": urls, "blocked_image": int(images)}
