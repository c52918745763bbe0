"""What reaches into img2dataset: its workers' signals, shard numbering, and leaving it as found."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pandas as pd

from stages.images.img2dataset_patches import _PoolContext, guarded_downloads, shards_numbered_from
from stages.images.safe_fetch import FetchPolicy


def _handler_in_worker() -> str:
    return repr(signal.getsignal(signal.SIGTERM))


def test_forked_workers_end_on_sigterm_whatever_the_task_installed() -> None:
    """The pool stops its workers with SIGTERM; a handler inherited from the task (Airflow
    installs one) must not run in them."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with _PoolContext("fork").Pool(1) as pool:
            in_worker = pool.apply(_handler_in_worker)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_worker == repr(signal.SIG_DFL)


def test_img2dataset_is_left_as_found() -> None:
    main, distributor = sys.modules["img2dataset.main"], sys.modules["img2dataset.distributor"]
    before = (main.Downloader, main.WebDatasetSampleWriter, main.LoggerProcess, distributor.get_context, main.Reader)
    with guarded_downloads(FetchPolicy(), "fork"), shards_numbered_from(300_000):
        assert main.LoggerProcess is not before[2] and distributor.get_context is not before[3]
    assert (main.Downloader, main.WebDatasetSampleWriter, main.LoggerProcess, distributor.get_context, main.Reader) == before


def test_shards_are_numbered_from_the_offset(tmp_path: Path) -> None:
    urls = tmp_path / "part-00003.parquet"
    pd.DataFrame({"URL": [f"http://example.com/{i}.jpg" for i in range(25)], "TEXT": "t"}).to_parquet(urls)
    (tmp_path / "tmp").mkdir()
    main = sys.modules["img2dataset.main"]
    # Called as img2dataset's download() calls it: start_shard_id last, 0.
    arguments = (str(urls), "parquet", "URL", "TEXT", None, None, [], 10, set(), str(tmp_path / "tmp"), 0)
    with shards_numbered_from(300_000):
        reader = main.Reader(*arguments)
    assert [shard_id for shard_id, _ in reader] == [300_000, 300_001, 300_002]
