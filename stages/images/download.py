"""download_images: one dedup part -> webdataset shards, through img2dataset and the download guard."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fsspec.core import url_to_fs

from stages import storage
from stages.curate.blocklists import (
    BlocklistSettings,
    blocklist_changed,
    drop_blocked_urls,
    image_blocklist,
    url_blocklist,
)
from stages.errors import InputError
from stages.images.parts import RETRY_SHARD_BASE, SHARD_ID_DIGITS, claim_folder, first_shard_id, record_settings
from stages.images.safe_fetch import FetchPolicy
from stages.images.shards import finished_shard_ids, summarize_shards
from stages.processes import spawn_without_main
from stages.settings import setting

log = logging.getLogger(__name__)
# What LAION-400M kept next to each image, beside url and caption.
ADDITIONAL_COLUMNS = ["SAMPLE_ID", "NSFW", "similarity", "LICENSE"]
RESIZE_MODES = ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]


@dataclass(frozen=True)
class DownloadSettings:
    """How a part's images are requested and stored."""

    image_size: int = setting(256, type="integer", minimum=16, maximum=4096)
    resize_mode: str = setting("border", type="string", enum=RESIZE_MODES)
    number_sample_per_shard: int = setting(10000, type="integer", minimum=1, maximum=1000000)
    processes_count: int = setting(os.cpu_count() or 1, env="LAION_PROCESSES_COUNT", type="integer", minimum=1, maximum=256)
    thread_count: int = setting(32, env="LAION_THREAD_COUNT", type="integer", minimum=1, maximum=1024)
    timeout: int = setting(
        10, type="integer", minimum=1, maximum=600, description="Seconds per socket operation of an image request."
    )
    encode_quality: int = 95
    # How img2dataset's worker processes start. "fork" (Linux) skips the 3 s of imports a
    # spawned worker redoes; "spawn" is img2dataset's own choice, and the one for macOS.
    start_method: str = "fork" if sys.platform == "linux" else "spawn"
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    blocklists: BlocklistSettings = field(default_factory=BlocklistSettings)

    def __post_init__(self) -> None:
        if self.start_method not in ("fork", "forkserver", "spawn"):
            raise ValueError(f"download start_method {self.start_method!r} is not one of fork, forkserver, spawn")


# The settings every shard of a part must share: a retry reuses the part's own.
IMAGE_SETTINGS = ("image_size", "resize_mode", "number_sample_per_shard", "encode_quality")


def download_part(part_url: str, output_folder: str, settings: DownloadSettings, *, dedup_version: str) -> dict[str, Any]:
    """Download every (URL, TEXT) of one parquet part into ``output_folder`` as webdataset shards.

    img2dataset's incremental mode makes a rerun skip every shard whose stats file exists,
    so a cleared task redoes only unfinished shards. Shards made from another version of
    the dedup output (``dedup_version``) hold other rows: they are removed first, never
    mixed in; so are shards made with another URL blocklist. Rows with a blocked URL are
    left out before img2dataset reads the part. A full disk raises
    :class:`~stages.storage.DiskFullError` naming ``output_folder``; the shards finished
    before it are kept for the rerun. ``complete`` in the numbers says whether every shard
    of the part is finished.
    """
    started = time.monotonic()
    # Checked on the whole part, before any work: the rows a blocklist leaves out do not count.
    shards = math.ceil(_parquet_rows(part_url) / settings.number_sample_per_shard)
    if shards > RETRY_SHARD_BASE:
        raise InputError(
            f"dedup part {part_url} needs {shards} shards of {settings.number_sample_per_shard} samples; "
            f"a part holds at most {RETRY_SHARD_BASE}: raise number_sample_per_shard or dedup_partitions"
        )
    blocked_urls = url_blocklist(settings.blocklists)
    with storage.disk_full_reported(output_folder):
        claim_folder(output_folder, dedup_version)
        if blocklist_changed(output_folder, blocked_urls) and finished_shard_ids(output_folder):
            log.info("Removing shards of %s: made with another URL blocklist", output_folder)
            fs, path = url_to_fs(output_folder)
            fs.rm(path, recursive=True)
            claim_folder(output_folder, dedup_version)
        record_settings(output_folder, {k: getattr(settings, k) for k in IMAGE_SETTINGS})
        rows_url, blocked = drop_blocked_urls(part_url, output_folder, blocked_urls, dedup_version=dedup_version)
    if blocked:
        shards = math.ceil(_parquet_rows(rows_url) / settings.number_sample_per_shard)
    if shards:  # none when every row's URL is blocked
        run_img2dataset(rows_url, output_folder, settings, first_shard_id(part_url))
    numbers = summarize_shards(output_folder)
    wanted = set(range(first_shard_id(part_url), first_shard_id(part_url) + shards))
    numbers["complete"] = wanted <= finished_shard_ids(output_folder)
    numbers["seconds"] = round(time.monotonic() - started, 3)
    numbers["settings"] = {k: v for k, v in asdict(settings).items() if k != "fetch_policy"}
    numbers["blocked_url"] = blocked
    return numbers


def run_img2dataset(
    url_list: str, output_folder: str, settings: DownloadSettings, first_shard: int, extra_columns: tuple[str, ...] = ()
) -> None:
    """img2dataset over ``url_list`` through the download guard, shards numbered from ``first_shard``;
    images on ``settings.blocklists``' image list are dropped as ``blocked_image``.

    A full disk under ``output_folder`` raises :class:`~stages.storage.DiskFullError`.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI on import
    from img2dataset import download

    from stages.images.img2dataset_patches import guarded_downloads, shards_numbered_from

    arguments = img2dataset_arguments(url_list, output_folder, settings)
    arguments["save_additional_columns"] = [*arguments["save_additional_columns"], *extra_columns]
    with (
        storage.disk_full_reported(output_folder),
        shards_numbered_from(first_shard),
        guarded_downloads(settings.fetch_policy, settings.start_method, image_blocklist(settings.blocklists)),
        spawn_without_main(),
    ):
        download(**arguments)


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


def _parquet_rows(url: str) -> int:
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows
