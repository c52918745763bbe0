"""img2dataset through the download guard, against the hostile server: every reason counted."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sampleweb.hostile import EXPECTED_REASONS, HostileServer
from stages.download import DownloadSettings, download_part
from stages.safe_fetch import FetchPolicy

BOUNDS = dict(max_seconds=4.0, max_bytes=2 * 1024 * 1024, max_redirects=3)


def hostile_part(server: HostileServer, folder: Path) -> tuple[Path, dict[str, str | None]]:
    expected = {server.url(p): reason for p, reason in EXPECTED_REASONS.items()}
    expected[server.url("/truncated.jpg")] = "Image decoding error"  # passes the guard, fails to decode
    rows = [
        {"SAMPLE_ID": i, "URL": url, "TEXT": f"caption {i}", "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}
        for i, url in enumerate(sorted(expected))
    ]
    part = folder / "part-00000.parquet"
    pd.DataFrame(rows).to_parquet(part)
    return part, expected


def shard_rows(images: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(images.glob("*.parquet"))], ignore_index=True)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_every_hostile_url_gets_its_own_status(tmp_path: Path, start_method: str) -> None:
    with HostileServer(trickle_seconds=30) as server:
        part, expected = hostile_part(server, tmp_path)
        settings = DownloadSettings(
            processes_count=1, thread_count=16, number_sample_per_shard=100, timeout=2,
            fetch_policy=FetchPolicy(allowed_networks=("127.0.0.0/8",), **BOUNDS), start_method=start_method,
        )
        started = time.monotonic()
        numbers = download_part(str(part), str(tmp_path / "images"), settings, dedup_version="test")
        elapsed = time.monotonic() - started
    assert elapsed < 60, f"the download stage took {elapsed:.0f}s: a bound did not hold"
    rows = shard_rows(tmp_path / "images")
    got = {row.url: (row.error_message if row.status != "success" else None) for row in rows.itertuples()}
    assert got == expected
    failures = {reason: list(expected.values()).count(reason) for reason in set(expected.values()) if reason}
    assert numbers["errors"] == failures
    assert numbers["successes"] == 2 and numbers["failed_to_resize"] == 1


def test_no_request_reaches_loopback_unless_allowed(tmp_path: Path) -> None:
    with HostileServer() as server:
        part, expected = hostile_part(server, tmp_path)
        settings = DownloadSettings(processes_count=1, thread_count=4, number_sample_per_shard=100, timeout=2)
        numbers = download_part(str(part), str(tmp_path / "images"), settings, dedup_version="test")
        requests = sum(server.requests.values())
    assert requests == 0
    assert numbers["errors"] == {"refused_private_address": len(expected)}
    assert set(shard_rows(tmp_path / "images")["error_message"]) == {"refused_private_address"}


def _handler_in_worker() -> str:
    return repr(signal.getsignal(signal.SIGTERM))


def test_forked_workers_end_on_sigterm_whatever_the_task_installed() -> None:
    """The pool stops its workers with SIGTERM; a handler inherited from the task (Airflow
    installs one) must not run in them."""
    from stages.guarded_img2dataset import _PoolContext

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with _PoolContext("fork").Pool(1) as pool:
            in_worker = pool.apply(_handler_in_worker)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_worker == repr(signal.SIG_DFL)


def test_img2dataset_is_left_as_found() -> None:
    import img2dataset  # noqa: F401

    from stages.guarded_img2dataset import guarded_downloads

    main, distributor = sys.modules["img2dataset.main"], sys.modules["img2dataset.distributor"]
    before = (main.Downloader, main.WebDatasetSampleWriter, main.LoggerProcess, distributor.get_context)
    with guarded_downloads(FetchPolicy(), "fork"):
        assert main.LoggerProcess is not before[2] and distributor.get_context is not before[3]
    assert (main.Downloader, main.WebDatasetSampleWriter, main.LoggerProcess, distributor.get_context) == before


def test_an_unknown_start_method_is_refused() -> None:
    with pytest.raises(ValueError, match="'threads' is not one of fork, forkserver, spawn"):
        DownloadSettings(start_method="threads")
