"""A dedup part's image folder: its name and shard ids, and the state kept beside its shards.

Part i owns shard ids ``[i * SHARDS_PER_PART, (i + 1) * SHARDS_PER_PART)``, so shard names
and sample keys are unique across the whole dataset, not only within a part's folder. The
part's own shards take the first half of the range; retries of failed samples
(:mod:`stages.images.retry`) take the second.

::

    images/<part>/0000300000.tar ...    the part's shards (img2dataset's)
    images/<part>/_dedup_version.txt    the dedup output the shards were made from
    images/<part>/_partial/             shards being written (moved into place when complete)
    images/<part>/_state/               the recorded image settings, retry batches, the
                                        download marker (_done-<version>.json)
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.layout import STATE_DIR  # the part's files that are not shards: img2dataset does not read it

log = logging.getLogger(__name__)

SHARDS_PER_PART = 100_000
SHARD_ID_DIGITS = 10
RETRY_SHARD_BASE = SHARDS_PER_PART // 2  # retry shards start this far into the part's range
# Columns a retried sample carries: the key and the failure reason of its earlier attempt.
RETRY_OF, RETRY_REASON = "retry_of", "retry_reason"

# Not *.json: img2dataset reads every *.json in its output folder as a finished shard.
VERSION_FILE = "_dedup_version.txt"
PARTIAL_DIR = "_partial"
SETTINGS_FILE = "download_settings.json"  # what a retry of failed samples must reuse


def part_name(part_url: str) -> str:
    """``.../dedup/part-00003.parquet`` -> ``part-00003``: the part's folder under images/."""
    return posixpath.basename(part_url).split(".")[0]


def part_index(part_url: str) -> int:
    name = part_name(part_url)
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"dedup part {part_url!r} is not named part-<number>") from None


def first_shard_id(part_url: str) -> int:
    """The id of the part's first shard."""
    return part_index(part_url) * SHARDS_PER_PART


def retry_shard_ids(part_url: str) -> range:
    """The shard ids the part's retries may use."""
    first = first_shard_id(part_url)
    return range(first + RETRY_SHARD_BASE, first + SHARDS_PER_PART)


def is_retry_shard(stem: str) -> bool:
    """Whether the shard named ``stem`` (``.../0000050003``) holds retried samples."""
    return int(posixpath.basename(stem)) % SHARDS_PER_PART >= RETRY_SHARD_BASE


def state_folder(output_folder: str) -> str:
    return storage.join(output_folder, STATE_DIR)


def recorded_settings(output_folder: str) -> dict[str, Any] | None:
    """The settings the part's first download recorded; None before it."""
    return storage.read_json_or_none(storage.join(state_folder(output_folder), SETTINGS_FILE))


def record_settings(output_folder: str, values: dict[str, Any]) -> None:
    if recorded_settings(output_folder) != values:
        storage.write_json(storage.join(state_folder(output_folder), SETTINGS_FILE), values)


def recorded_dedup_version(output_folder: str) -> str | None:
    """The dedup version a part folder's shards were made from; None before its first download."""
    marker = storage.join(output_folder, VERSION_FILE)
    if not storage.exists(marker):
        return None
    fs, path = url_to_fs(marker)
    return fs.cat_file(path).decode()


def claim_folder(output_folder: str, dedup_version: str) -> None:
    """Prepare ``output_folder`` for (more) shards of ``dedup_version``.

    Shards of another dedup version are removed; so is what a killed run left half-written
    in ``_partial/`` (img2dataset redoes every shard without its stats file).
    """
    marker = storage.join(output_folder, VERSION_FILE)
    fs, path = url_to_fs(output_folder)
    partial = posixpath.join(path, PARTIAL_DIR)
    if fs.exists(path):
        found = recorded_dedup_version(output_folder)
        if found != dedup_version:
            log.info("Removing shards of %s: made from dedup version %s, now %s", output_folder, found, dedup_version)
            fs.rm(path, recursive=True)
        elif fs.exists(partial):
            log.info("Removing unfinished shards left in %s", partial)
            fs.rm(partial, recursive=True)
    if not storage.exists(marker):
        storage.write_text(marker, dedup_version)
    fs.makedirs(partial, exist_ok=True)
