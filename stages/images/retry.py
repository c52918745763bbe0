"""Retry failed samples: download again only the samples of a part whose failure was transient.

A part's shards are never rewritten. The samples to retry -- failures with a transient
reason (timeouts, DNS errors, connection errors, HTTP 429 and 5xx), not yet retried --
go into a retry batch: ``images/<part>/_state/retry-<first shard>.parquet``, with the key and
reason of the failed attempt (``retry_of``, ``retry_reason``). img2dataset downloads the
batch into new shards of the same part, numbered from the part's retry shard ids
(:func:`stages.images.parts.retry_shard_ids`), the same way the part's own shards are made
(guard, atomic shards, incremental resume). :func:`stages.images.shards.summarize_shards`
counts each retried sample once: a recovered sample moves from its failure reason to the
successes.

A batch is written before any of its shards, so a retry killed mid-way resumes the same
batch (same samples, same shard ids) on the next try, and a sample is never retried twice
at once. Permanent failures (404, 403, decode errors, ``blocked_image``...) are never
requested again, nor is a URL on the URL blocklist (:mod:`stages.curate.blocklists`).
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.curate.blocklists import Blocklist, url_blocklist
from stages.images.download import ADDITIONAL_COLUMNS, IMAGE_SETTINGS, DownloadSettings, run_img2dataset
from stages.images.parts import (
    RETRY_OF,
    RETRY_REASON,
    SHARD_ID_DIGITS,
    claim_folder,
    recorded_dedup_version,
    recorded_settings,
    retry_shard_ids,
    state_folder,
)
from stages.images.shards import finished_shard_ids, summarize_shards
from stages.settings import setting

log = logging.getLogger(__name__)

# Failures worth another request: the server or the network may answer next time.
TRANSIENT_REASONS = (
    "read_timeout",
    "connection_timeout",
    "connection_error",
    "dns_error",
    "download_time_limit",
    "http_429",
    "http_5xx",
)
BATCH_PREFIX = "retry-"


@dataclass(frozen=True)
class RetrySettings:
    """Which failures to retry, and how to request them (the image settings are the part's own)."""

    reasons: tuple[str, ...] = setting(
        list(TRANSIENT_REASONS), type="array", minItems=1, uniqueItems=True,
        items={"type": "string", "enum": list(TRANSIENT_REASONS)},
        description="Which failures to retry (http_5xx: any 5xx status).",
    )  # fmt: skip
    download: DownloadSettings = field(default_factory=DownloadSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", tuple(self.reasons))
        unknown = sorted(set(self.reasons) - set(TRANSIENT_REASONS))
        if unknown:
            raise ValueError(f"reasons {unknown} are not transient failure reasons; choose from {list(TRANSIENT_REASONS)}")


def is_transient(reason: str | None, reasons: tuple[str, ...] = TRANSIENT_REASONS) -> bool:
    """Whether a sample's failure ``reason`` is one of ``reasons`` (``http_5xx``: any 5xx)."""
    if not reason:
        return False
    if "http_5xx" in reasons and re.fullmatch(r"http_5\d\d", reason):
        return True
    return reason in reasons


def retry_part(part_url: str, output_folder: str, settings: RetrySettings, *, dedup_version: str) -> dict[str, Any]:
    """Retry the transiently failed samples of one part; returns the retry's numbers.

    ``settings.download`` gives the fetch policy, processes and threads; the image
    settings are the part's own, as its first download recorded them.
    """
    started = time.monotonic()
    recorded_version = recorded_dedup_version(output_folder)
    found = recorded_settings(output_folder)
    if recorded_version is None or found is None:
        raise ValueError(f"{output_folder} holds no downloaded shards: run laion_pipeline's download_images for it first")
    if recorded_version != dedup_version:
        raise ValueError(
            f"{output_folder} was downloaded from dedup version {recorded_version}, the dedup output is now "
            f"{dedup_version}: run laion_pipeline first, then retry"
        )
    download = replace(settings.download, **{k: found[k] for k in IMAGE_SETTINGS})
    claim_folder(output_folder, dedup_version)  # clears what a killed attempt left half-written

    per_shard = download.number_sample_per_shard
    batch = unfinished_batch(output_folder, per_shard)
    if batch is None:
        batch = new_batch(part_url, output_folder, per_shard, settings.reasons, url_blocklist(download.blocklists))
    retried, shards = 0, range(0)
    if batch is None:
        log.info("Nothing to retry in %s: no sample failed with %s", output_folder, ", ".join(settings.reasons))
    else:
        url, first, retried = batch
        log.info("Retrying %d samples of %s into shards from %d", retried, output_folder, first)
        run_img2dataset(url, output_folder, download, first, extra_columns=(RETRY_OF, RETRY_REASON))
        shards = range(first, first + math.ceil(retried / per_shard))
    totals = summarize_shards(output_folder)
    return {
        "retried": retried,
        "recovered": sum(s["successes"] for s in totals["shards"] if int(s["shard"]) in shards),
        "count": totals["count"],
        "successes": totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "errors": totals["errors"],
        "seconds": round(time.monotonic() - started, 3),
    }


def _batches(output_folder: str) -> list[tuple[str, int]]:
    """(url, first shard id) of every retry batch of the part, oldest first."""
    found = storage.list_files(state_folder(output_folder), f"{BATCH_PREFIX}*.parquet")
    return sorted(((url, int(posixpath.basename(url)[len(BATCH_PREFIX) : -len(".parquet")])) for url in found), key=lambda b: b[1])


def _rows(url: str, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def unfinished_batch(output_folder: str, per_shard: int) -> tuple[str, int, int] | None:
    """(url, first shard id, samples) of a batch whose shards are not all finished."""
    finished = finished_shard_ids(output_folder)
    for url, first in _batches(output_folder):
        rows = _rows(url, [RETRY_OF]).num_rows
        if not set(range(first, first + math.ceil(rows / per_shard))) <= finished:
            log.info("Resuming retry batch %s", url)
            return url, first, rows
    return None


def new_batch(
    part_url: str, output_folder: str, per_shard: int, reasons: tuple[str, ...], blocked_urls: Blocklist = Blocklist()
) -> tuple[str, int, int] | None:
    """Write the next retry batch of the part: its failed samples with a reason in ``reasons``
    that no earlier batch holds and whose URL is not on ``blocked_urls``. None when there are none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches = _batches(output_folder)
    retried = {k for url, _ in batches for k in _rows(url, [RETRY_OF]).column(RETRY_OF).to_pylist()}
    wanted: dict[str, list[Any]] = {c: [] for c in ("URL", "TEXT", *ADDITIONAL_COLUMNS, RETRY_OF, RETRY_REASON)}
    for shard in storage.list_files(output_folder, "*.parquet"):
        table = _rows(shard).to_pylist()
        for row in table:
            if row["status"] == "success" or row["key"] in retried or not is_transient(row.get("error_message"), reasons):
                continue
            if blocked_urls and blocked_urls.matches_url(row["url"]):
                continue  # listed since the part was downloaded: never requested again
            wanted["URL"].append(row["url"])
            wanted["TEXT"].append(row["caption"])
            for column in ADDITIONAL_COLUMNS:
                wanted[column].append(row.get(column))
            wanted[RETRY_OF].append(row["key"])
            wanted[RETRY_REASON].append(row["error_message"])
    if not wanted["URL"]:
        return None
    ids = retry_shard_ids(part_url)
    if batches:
        last_url, last_first = batches[-1]
        first = last_first + math.ceil(_rows(last_url, [RETRY_OF]).num_rows / per_shard)
    else:
        first = ids.start
    if first + math.ceil(len(wanted["URL"]) / per_shard) > ids.stop:
        raise ValueError(f"{output_folder}: no shard ids left for another retry batch")
    dedup_fs, dedup_path = url_to_fs(part_url)
    with dedup_fs.open(dedup_path, "rb") as f:
        dedup_schema = pq.read_schema(f)
    fields = [dedup_schema.field(c) if c in dedup_schema.names else pa.field(c, pa.string()) for c in wanted]
    table = pa.table({c: pa.array(v, type=f.type) for (c, v), f in zip(wanted.items(), fields)})
    url = storage.join(state_folder(output_folder), f"{BATCH_PREFIX}{first:0{SHARD_ID_DIGITS}d}.parquet")
    with storage.atomic_open(url) as f:
        pq.write_table(table, f)
    return url, first, table.num_rows
