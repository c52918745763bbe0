"""Everything that reaches into img2dataset's internals: :mod:`stages.images.safe_fetch` in
place of its urllib fetch, shards that appear under their final names only when complete,
and shard ids that start where the part's range does.

img2dataset has no hook for how an image is fetched: ``Downloader.download_shard`` calls
the module function ``img2dataset.downloader.download_image_with_retry``. Shards are
downloaded in worker processes that receive the Downloader by pickle, so the subclass
below carries the :class:`FetchPolicy` there and swaps that one function in the worker
before each shard. img2dataset also opens ``<shard>.tar`` under its final name and
writes into it for the whole shard, so a killed worker leaves a truncated tar that looks
finished; :class:`AtomicWebDatasetWriter` writes under ``_partial/`` and moves the tar and
parquet into place on close, before img2dataset writes the shard's ``_stats.json``.
Everything else -- sharding, resizing, stats -- is img2dataset's own.

Two of img2dataset's fixed costs are left out (measured in docs/benchmarks.md): its
worker pool is spawned, so every worker re-imports img2dataset, webdataset and torch
(about 3 s of CPU each) before its first image; and a spawned logger process does the
same only to print running totals, which the stage reports itself from the shards'
stats. Here the pool is forked from the task process, its imports already done, and no
logger process is started.
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

from stages.images.parts import PARTIAL_DIR
from stages.images.safe_fetch import FetchPolicy, FetchRefused, fetch_image

_policy: FetchPolicy | None = None


class AtomicWebDatasetWriter(img2dataset_writer.WebDatasetSampleWriter):
    """img2dataset's webdataset writer, writing in ``_partial/`` and publishing on close."""

    def __init__(self, shard_id: int, output_folder: str, *args: Any, **kwargs: Any) -> None:
        self.final_folder = output_folder
        super().__init__(shard_id, f"{output_folder}/{PARTIAL_DIR}", *args, **kwargs)
        self.shard_name = f"{shard_id:0{self.oom_shard_count}d}"

    def close(self) -> None:
        super().close()
        fs, final = url_to_fs(self.final_folder)
        for suffix in (".parquet", ".tar"):
            fs.mv(f"{final}/{PARTIAL_DIR}/{self.shard_name}{suffix}", f"{final}/{self.shard_name}{suffix}")


def guarded_download_image_with_retry(
    row: tuple[int, str], timeout: float, retries: int, user_agent_token: str | None, disallowed_header_directives: Any
) -> tuple[int, io.BytesIO | None, str | None]:
    """Same contract as img2dataset's: (key, body stream or None, reason or None)."""
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
            return key, io.BytesIO(body), None
        except FetchRefused as refused:
            reason = str(refused)
        except Exception as error:  # noqa: BLE001 - see below
            # An exception escaping here would end img2dataset's shard loop while its
            # feeder thread waits on a semaphore: the worker would hang for ever.
            reason = f"download_error: {type(error).__name__}"
    return key, None, reason


class GuardedDownloader(img2dataset_downloader.Downloader):
    """img2dataset's Downloader whose worker fetches through :func:`fetch_image`."""

    fetch_policy: FetchPolicy = FetchPolicy()

    def __call__(self, row: Any) -> Any:
        global _policy
        _policy = self.fetch_policy
        img2dataset_downloader.download_image_with_retry = guarded_download_image_with_retry
        return super().__call__(row)


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


def _reset_worker_signals() -> None:
    """A forked worker inherits the task's signal handlers (Airflow's SIGTERM handler among
    them); the pool stops its workers with SIGTERM, which must simply end them."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _PoolContext:
    """What img2dataset's distributor asks ``get_context("spawn")`` for: a Pool, here
    started with ``start_method``."""

    def __init__(self, start_method: str) -> None:
        self.context = multiprocessing.get_context(start_method)

    def Pool(self, processes: int, maxtasksperchild: int | None = None) -> Any:  # noqa: N802 - multiprocessing's name
        return self.context.Pool(processes, initializer=_reset_worker_signals, maxtasksperchild=maxtasksperchild)


@contextmanager
def guarded_downloads(policy: FetchPolicy, start_method: str) -> Iterator[None]:
    """Within the block, ``img2dataset.download`` fetches through ``policy``, writes
    atomically, starts its workers with ``start_method`` and no logger process."""
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
    distributor.get_context = lambda _method: _PoolContext(start_method)
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
