"""download_images: one dedup part -> webdataset shards, through img2dataset."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from fsspec.core import url_to_fs

from stages import storage
from stages.processes import spawn_without_main
from stages.safe_fetch import FetchPolicy

log = logging.getLogger(__name__)

# What LAION-400M kept next to each image, beside url and caption.
ADDITIONAL_COLUMNS = ["SAMPLE_ID", "NSFW", "similarity", "LICENSE"]
STATS_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize")
# Part i owns shard ids [i * SHARDS_PER_PART, (i + 1) * SHARDS_PER_PART): shard names and
# sample keys are unique across the whole dataset, not only within a part's folder.
SHARDS_PER_PART = 100_000
SHARD_ID_DIGITS = 10
# Shards of a retry of failed samples (stages/retry.py) start this far into the part's range.
RETRY_SHARD_BASE = SHARDS_PER_PART // 2
# Not *.json: img2dataset reads every *.json in its output folder as a finished shard.
VERSION_FILE = "_dedup_version.txt"
# The part's own files that are not shards live in a subfolder img2dataset does not read.
STATE_DIR = "_state"
SETTINGS_FILE = "download_settings.json"  # what a retry of failed samples must reuse
# Columns a retried sample carries: the key and the failure reason of its earlier attempt.
RETRY_OF, RETRY_REASON = "retry_of", "retry_reason"


@dataclass(frozen=True)
class DownloadSettings:
    image_size: int = 256
    resize_mode: str = "border"
    processes_count: int = 1
    thread_count: int = 32
    number_sample_per_shard: int = 10000
    timeout: int = 10
    encode_quality: int = 95
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    # How img2dataset's worker processes start. "fork" (Linux) skips the 3 s of imports a
    # spawned worker redoes; "spawn" is img2dataset's own choice, and the one for macOS.
    start_method: str = "fork" if sys.platform == "linux" else "spawn"

    def __post_init__(self) -> None:
        if self.start_method not in ("fork", "forkserver", "spawn"):
            raise ValueError(f"download start_method {self.start_method!r} is not one of fork, forkserver, spawn")


def part_name(part_url: str) -> str:
    """``.../dedup/part-00003.parquet`` -> ``part-00003``: the part's folder under images/."""
    return posixpath.basename(part_url).split(".")[0]


def part_index(part_url: str) -> int:
    name = part_name(part_url)
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"dedup part {part_url!r} is not named part-<number>") from None


@contextmanager
def first_shard_id(offset: int) -> Iterator[None]:
    """Make img2dataset number this call's shards from ``offset`` instead of 0.

    img2dataset's ``download()`` always passes ``start_shard_id=0`` to its Reader (only
    its "extend" mode moves it); the Reader itself supports any start. Shards are
    numbered in the calling process, so wrapping the Reader there is enough.
    """
    import img2dataset  # noqa: F401 - loads img2dataset.main

    # The package re-exports the function ``main``, which hides the module of that name.
    img2dataset_main = sys.modules["img2dataset.main"]

    reader_class = img2dataset_main.Reader

    def reader_from_offset(*args: Any, **kwargs: Any) -> Any:
        *head, start = args
        return reader_class(*head, start + offset, **kwargs)

    img2dataset_main.Reader = reader_from_offset
    try:
        yield
    finally:
        img2dataset_main.Reader = reader_class


def download_part(part_url: str, output_folder: str, settings: DownloadSettings, *, dedup_version: str) -> dict[str, Any]:
    """Download every (URL, TEXT) of one parquet part into ``output_folder`` as webdataset shards.

    img2dataset's incremental mode makes a rerun skip every shard whose ``_stats.json``
    exists, so a cleared task redoes only unfinished shards. Shards made from another
    version of the dedup output (``dedup_version``, its input fingerprint) hold other
    rows: they are removed first, never mixed in.
    """
    started = time.monotonic()
    shards = math.ceil(_parquet_rows(part_url) / settings.number_sample_per_shard)
    if shards > RETRY_SHARD_BASE:
        raise ValueError(
            f"dedup part {part_url} needs {shards} shards of {settings.number_sample_per_shard} samples; "
            f"a part holds at most {RETRY_SHARD_BASE}: raise number_sample_per_shard or dedup_partitions"
        )
    claim_folder(output_folder, dedup_version)
    recorded = {k: v for k, v in asdict(settings).items() if k in IMAGE_SETTINGS}
    settings_url = storage.join(output_folder, STATE_DIR, SETTINGS_FILE)
    if storage.read_json_or_none(settings_url) != recorded:
        storage.write_json(settings_url, recorded)
    run_img2dataset(part_url, output_folder, settings, part_index(part_url) * SHARDS_PER_PART)
    numbers = summarize_shards(output_folder)
    numbers["seconds"] = round(time.monotonic() - started, 3)
    numbers["settings"] = {k: v for k, v in asdict(settings).items() if k != "fetch_policy"}
    return numbers


# The settings every shard of a part must share (a retry reuses them).
IMAGE_SETTINGS = ("image_size", "resize_mode", "number_sample_per_shard", "encode_quality")


def run_img2dataset(
    url_list: str, output_folder: str, settings: DownloadSettings, first_shard: int, extra_columns: tuple[str, ...] = ()
) -> None:
    """img2dataset over ``url_list`` through the download guard, shards numbered from ``first_shard``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI on import
    from img2dataset import download

    from stages.guarded_img2dataset import guarded_downloads

    arguments = img2dataset_arguments(url_list, output_folder, settings)
    arguments["save_additional_columns"] = [*arguments["save_additional_columns"], *extra_columns]
    with first_shard_id(first_shard), guarded_downloads(settings.fetch_policy, settings.start_method), spawn_without_main():
        download(**arguments)


def _parquet_rows(url: str) -> int:
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def dedup_version(dedup_stats: dict[str, Any]) -> str:
    """Names one dedup output: same raw input, partitions and seed give the same parts."""
    return f'{dedup_stats["input_fingerprint"]}-p{dedup_stats["partitions"]}-s{dedup_stats.get("seed", 0)}'


def current_parts(dedup_stats: dict[str, Any]) -> list[str]:
    """The part names (``part-00000`` ...) of the current dedup output."""
    return [p.split(".")[0] for p in dedup_stats["parts"]]


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
    in ``_partial/`` (img2dataset redoes every shard without a ``_stats.json``).
    """
    from stages.guarded_img2dataset import PARTIAL_DIR

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


def img2dataset_arguments(part_url: str, output_folder: str, settings: DownloadSettings) -> dict[str, Any]:
    """img2dataset's ``download()`` keyword arguments for one part, LAION-400M's choices."""
    return dict(
        url_list=part_url,
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        save_additional_columns=ADDITIONAL_COLUMNS,
        output_format="webdataset",
        output_folder=output_folder,
        image_size=settings.image_size,
        resize_mode=settings.resize_mode,
        processes_count=settings.processes_count,
        thread_count=settings.thread_count,
        number_sample_per_shard=settings.number_sample_per_shard,
        timeout=settings.timeout,
        encode_quality=settings.encode_quality,
        enable_wandb=False,
        incremental_mode="incremental",
        distributor="multiprocessing",
        oom_shard_count=SHARD_ID_DIGITS,
    )


def is_retry_shard(stem: str) -> bool:
    """Whether the shard named ``stem`` (``.../0000050003``) holds retried samples."""
    return int(posixpath.basename(stem)) % SHARDS_PER_PART >= RETRY_SHARD_BASE


def _retried_reasons(fs: Any, parquet: str) -> list[str]:
    """The earlier failure reason of each sample in a retry shard's parquet."""
    import pyarrow.parquet as pq

    with fs.open(parquet, "rb") as f:
        return [str(r) for r in pq.read_table(f, columns=[RETRY_REASON]).column(RETRY_REASON).to_pylist()]


def summarize_shards(folder: str, parts: list[str] | None = None) -> dict[str, Any]:
    """Add up img2dataset's per-shard ``*_stats.json`` files under ``folder``.

    With ``parts``, only the shards of those part folders count (``folder/<part>/``).
    """
    fs, path = url_to_fs(folder)
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    shards, tar_bytes = [], 0
    patterns = [posixpath.join(path, p, "*_stats.json") for p in parts] if parts is not None else [posixpath.join(path, "**", "*_stats.json")]
    for stats_path in sorted(f for pattern in patterns for f in fs.glob(pattern)):
        with fs.open(stats_path, "r") as f:
            stats = json.load(f)
        for key in STATS_KEYS:
            totals[key] += int(stats.get(key, 0))
        errors.update({str(k): int(v) for k, v in stats.get("status_dict", {}).items() if k != "success"})
        stem = stats_path[: -len("_stats.json")]
        retried = is_retry_shard(stem) and _retried_reasons(fs, stem + ".parquet")
        if retried:
            # Each sample of a retry shard replaces one transient failure counted before.
            totals["count"] -= len(retried)
            totals["failed_to_download"] -= len(retried)
            errors.subtract(retried)
        size = fs.size(stem + ".tar") if fs.exists(stem + ".tar") else 0
        tar_bytes += size
        shards.append(
            {
                "shard": posixpath.relpath(stem, path),
                "count": int(stats.get("count", 0)),
                "successes": int(stats.get("successes", 0)),
                "bytes": size,
                "seconds": stats.get("duration"),
                **({"retried": len(retried)} if retried else {}),
            }
        )
    errors = +errors  # drop reasons no sample has any more
    return {**{k: totals[k] for k in STATS_KEYS}, "errors": dict(errors), "shards": shards, "bytes": tar_bytes}
