"""Everything that reaches into img2dataset's internals: :mod:`stages.images.safe_fetch` in
place of its urllib fetch, shards that appear under their final names only when complete,
and shard ids that start where the part's range does.

img2dataset has no hook for how an image is fetched: ``Downloader.download_shard`` calls
the module function ``img2dataset.downloader.download_image_with_retry``. Shards are
downloaded in worker processes that receive the Downloader by pickle, so the subclass
below carries the :class:`FetchPolicy` there and swaps that function (and
``write_stats``) in the worker before each shard. img2dataset also opens ``<shard>.tar``
under its final name and writes into it for the whole shard, so a killed worker leaves a
truncated tar that looks finished; :class:`AtomicWebDatasetWriter` writes under
``_partial/``, and :func:`publish_shard` writes the shard's ``_stats.json`` there too and
then moves the tar, the parquet and, last, the stats into place. A full disk ends the
part's download with its error, where img2dataset would log it and go on to the next shard.
Everything else -- sharding, resizing, stats -- is img2dataset's own.

Two of img2dataset's fixed costs are left out (measured in docs/benchmarks.md): its
worker pool is spawned, so every worker re-imports img2dataset, webdataset and torch
(about 3 s of CPU each) before its first image; and a spawned logger process does the
same only to print running totals, which the stage reports itself from the shards'
stats. Here the pool is forked from the task process, its imports already done, and no
logger process is started. The pool's workers are handed the task's
:class:`~stages.images.politeness.HostPacer` when they start, so that all of them together
keep each host's pace, and the image blocklist
(:mod:`stages.curate.blocklists`), once per worker rather than with every shard.
"""

from __future__ import annotations

import io
import multiprocessing
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from fsspec.core import url_to_fs
from img2dataset import downloader as img2dataset_downloader
from img2dataset import writer as img2dataset_writer
from img2dataset.logger import write_stats as img2dataset_write_stats

from stages.curate.blocklists import BLOCKED_IMAGE, Blocklist
from stages.images import politeness
from stages.images.parts import PARTIAL_DIR
from stages.images.safe_fetch import FetchPolicy, FetchRefused, fetch_image
from stages.layout import SHARD_STATS_SUFFIX
from stages.storage import DISK_FULL_ERRNOS

_policy: FetchPolicy | None = None
_image_blocklist = Blocklist()  # set in each worker when it starts


class AtomicWebDatasetWriter(img2dataset_writer.WebDatasetSampleWriter):
    """img2dataset's webdataset writer, writing in ``_partial/`` (:func:`publish_shard` moves
    the shard into place), and failing the shard on close when a sample could not be written."""

    def __init__(self, shard_id: int, output_folder: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(shard_id, f"{output_folder}/{PARTIAL_DIR}", *args, **kwargs)
        self.write_error: OSError | None = None

    def write(self, *args: Any, **kwargs: Any) -> None:
        if self.write_error is not None:
            return  # the shard is not published (see close): more writes would only fail again
        try:
            super().write(*args, **kwargs)
        except OSError as error:
            # img2dataset logs a sample's error and goes on with the next sample; kept here so
            # that the shard fails instead of being published without it.
            self.write_error = error
            raise

    def close(self) -> None:
        if self.write_error is not None:
            raise self.write_error  # the shard stays in _partial/, cleared by the next run
        super().close()


def publish_shard(output_folder: str, shard_id: int, *stats: Any) -> None:
    """img2dataset's ``write_stats``, then the shard into place: tar, parquet, stats last.

    A shard is finished exactly when its stats file exists, so that file is written in
    ``_partial/`` too: a full disk must not leave an empty one under the final name.
    """
    img2dataset_write_stats(f"{output_folder}/{PARTIAL_DIR}", shard_id, *stats)
    oom_shard_count = stats[-1]  # img2dataset passes it last
    name = f"{shard_id:0{oom_shard_count}d}"
    fs, final = url_to_fs(output_folder)
    for suffix in (".tar", ".parquet", SHARD_STATS_SUFFIX):
        fs.mv(f"{final}/{PARTIAL_DIR}/{name}{suffix}", f"{final}/{name}{suffix}")


def guarded_download_image_with_retry(
    row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None, disallowed_header_directives: Any
) -> tuple[int, io.BytesIO | None, str | None]:
    """Same contract as img2dataset's: (key, body stream or None, reason or None).

    An image on the blocklist is dropped here, before img2dataset decodes or writes it,
    with the reason ``blocked_image``; it is not asked for again.
    """
    key, url = row
    reason = None
    for _ in range(retries + 1):
        try:
            body = fetch_image(
                url,
                _policy or FetchPolicy(),
                timeout=timeout,
                disallowed_directives=disallowed_header_directives,
                user_agent_token=user_agent_token,
            )
            if _image_blocklist and _image_blocklist.matches(body):
                return key, None, BLOCKED_IMAGE
            return key, io.BytesIO(body), None
        except FetchRefused as refused:
            reason = str(refused)
        except Exception as error:  # noqa: BLE001 - see below
            # An exception escaping here would end img2dataset's shard loop while its
            # feeder thread waits on a semaphore: the worker would hang for ever.
            reason = f"download_error: {type(error).__name__}"
    return key, None, reason


class GuardedDownloader(img2dataset_downloader.Downloader):
    """img2dataset's Downloader whose worker fetches through :func:`fetch_image`, publishes
    shards with :func:`publish_shard` and stops the download when the disk is full."""

    fetch_policy: FetchPolicy = FetchPolicy()
    disk_full: OSError | None = None

    def __call__(self, row: Any) -> Any:
        global _policy
        _policy = self.fetch_policy
        img2dataset_downloader.download_image_with_retry = guarded_download_image_with_retry
        img2dataset_downloader.write_stats = publish_shard
        self.disk_full = None
        done = super().__call__(row)  # logs a failed shard's error and reports it failed
        if self.disk_full is not None:
            # img2dataset would go on with the next shard, which fails the same way, and end
            # without an error: raised, it reaches the task process and ends the download.
            raise self.disk_full
        return done

    def download_shard(self, row: Any) -> None:
        try:
            super().download_shard(row)
        except OSError as error:
            if error.errno in DISK_FULL_ERRNOS:
                self.disk_full = error
            raise


class _NoLogger:
    """Stands in for img2dataset's LoggerProcess: the stage sums the shards' stats itself."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def _start_worker(pacer: politeness.HostPacer, image_blocklist: Blocklist) -> None:
    """A forked worker inherits the task's signal handlers (Airflow's SIGTERM handler among
    them); the pool stops its workers with SIGTERM, which must simply end them. Every
    worker paces hosts with the task's pacer and drops the images on the blocklist."""
    global _image_blocklist
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    politeness.install(pacer)
    _image_blocklist = image_blocklist


class _PoolContext:
    """What img2dataset's distributor asks ``get_context("spawn")`` for: a Pool, here
    started with ``start_method``, whose workers share one host pacer (replaced workers too:
    img2dataset's pool ends each worker after a few shards), and one image blocklist."""

    def __init__(self, start_method: str, image_blocklist: Blocklist = Blocklist()) -> None:
        self.context = multiprocessing.get_context(start_method)
        self.pacer = politeness.HostPacer(self.context)
        self.image_blocklist = image_blocklist

    def Pool(self, processes: int, maxtasksperchild: int | None = None) -> Any:  # noqa: N802 - multiprocessing's name
        initargs = (self.pacer, self.image_blocklist)
        return self.context.Pool(processes, initializer=_start_worker, initargs=initargs, maxtasksperchild=maxtasksperchild)


@contextmanager
def guarded_downloads(
    policy: FetchPolicy, start_method: str, image_blocklist: Blocklist = Blocklist()
) -> Iterator[None]:
    """Within the block, ``img2dataset.download`` fetches through ``policy``, drops the
    images on ``image_blocklist``, writes atomically, starts its workers with
    ``start_method``, all pacing hosts together, and no logger process."""
    img2dataset_main = sys.modules["img2dataset.main"]
    distributor = sys.modules["img2dataset.distributor"]

    def build(*args: Any, **kwargs: Any) -> GuardedDownloader:
        downloader = GuardedDownloader(*args, **kwargs)
        downloader.fetch_policy = policy  # an instance attribute: pickled to the workers
        return downloader

    originals = (img2dataset_main.Downloader, img2dataset_main.WebDatasetSampleWriter, img2dataset_main.LoggerProcess,
                 distributor.get_context)  # fmt: skip
    img2dataset_main.Downloader = build
    img2dataset_main.WebDatasetSampleWriter = AtomicWebDatasetWriter
    img2dataset_main.LoggerProcess = _NoLogger
    pools = _PoolContext(start_method, image_blocklist)  # one pacer for the whole download
    distributor.get_context = lambda _method: pools
    try:
        yield
    finally:
        (img2dataset_main.Downloader, img2dataset_main.WebDatasetSampleWriter, img2dataset_main.LoggerProcess,
         distributor.get_context) = originals  # fmt: skip


@contextmanager
def shards_numbered_from(offset: int) -> Iterator[None]:
    """Make img2dataset number this call's shards from ``offset`` instead of 0.

    img2dataset's ``download()`` always passes ``start_shard_id=0`` to its Reader (only
    its "extend" mode moves it); the Reader itself supports any start. Shards are
    numbered in the calling process, so wrapping the Reader there is enough.
    """
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
