"""Retry of failed samples: transient failures are downloaded again, permanent ones never.

The hostile server's /flaky.jpg (503), /reset.jpg (hang-up) and /stall.jpg (read timeout)
fail the first request for each URL and then serve the image.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sampleweb.hostile import HostileServer
from stages.images.download import DownloadSettings, download_part
from stages.images.retry import TRANSIENT_REASONS, RetrySettings, is_transient, retry_part
from stages.images.safe_fetch import FetchPolicy
from stages.images.shards import summarize_shards

# path -> (how many URLs, the reason of the first attempt)
WEB = {
    "/flaky.jpg": (5, "http_503"),
    "/reset.jpg": (3, "connection_error"),
    "/stall.jpg": (3, "read_timeout"),
    "/missing.jpg": (4, "http_404"),
    "/forbidden.jpg": (3, "http_403"),
    "/truncated.jpg": (2, "Image decoding error"),
    "/good.jpg": (5, None),
}
TRANSIENT = ("/flaky.jpg", "/reset.jpg", "/stall.jpg")


def settings(**overrides: object) -> DownloadSettings:
    values = dict(
        processes_count=1, thread_count=8, number_sample_per_shard=10, timeout=2, image_size=64,
        fetch_policy=FetchPolicy(allowed_networks=("127.0.0.0/8",), max_download_seconds=6.0, max_retry_after_seconds=0),
    )  # fmt: skip
    return DownloadSettings(**{**values, **overrides})


def retrying(**overrides: object) -> RetrySettings:
    return RetrySettings(download=settings(**overrides))


def write_part(server: HostileServer, folder: Path) -> Path:
    urls = [server.url(f"{path}?i={i}") for path, (n, _) in WEB.items() for i in range(n)]
    rows = [
        {"SAMPLE_ID": i, "URL": url, "TEXT": f"caption {i}", "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}
        for i, url in enumerate(urls)
    ]
    part = folder / "part-00003.parquet"
    pd.DataFrame(rows).to_parquet(part)
    return part


def test_transient_reasons() -> None:
    assert all(is_transient(r) for r in ("http_503", "http_500", "http_429", "read_timeout", "dns_error"))
    assert not any(is_transient(r) for r in ("http_404", "http_403", "Image decoding error", None, "http_5000"))
    assert not is_transient("http_503", ("read_timeout",))


def test_a_retry_recovers_transient_failures_and_never_asks_for_permanent_ones(tmp_path: Path) -> None:
    images = tmp_path / "images"
    with HostileServer(stall_seconds=4) as server:
        part = write_part(server, tmp_path)
        first = download_part(str(part), str(images), settings(), dedup_version="v1")
        assert first["successes"] == 5 and first["count"] == 25
        assert first["errors"] == {reason: n for n, reason in WEB.values() if reason}

        # Another processes/threads setting for the retry; image settings come from the part.
        retry = retry_part(str(part), str(images), retrying(thread_count=4, image_size=999), dedup_version="v1")
        again = retry_part(str(part), str(images), retrying(), dedup_version="v1")
        requests = dict(server.requests_by_url)

    assert (retry["retried"], retry["recovered"]) == (11, 11)
    assert again["retried"] == 0
    for path, (n, _) in WEB.items():
        wanted = 2 if path in TRANSIENT else 1  # permanent failures: asked once, by the first download
        assert [requests[f"{path}?i={i}"] for i in range(n)] == [wanted] * n, path

    totals = summarize_shards(str(images))
    assert (totals["count"], totals["successes"], totals["failed_to_download"], totals["failed_to_resize"]) == (25, 16, 7, 2)
    assert totals["errors"] == {"http_404": 4, "http_403": 3, "Image decoding error": 2}
    retry_shards = [s for s in totals["shards"] if s.get("retried")]
    assert [int(s["shard"]) for s in retry_shards] == [350_000, 350_001]  # part 3's second half

    rows = pd.concat([pd.read_parquet(p) for p in sorted(images.glob("*.parquet"))], ignore_index=True)
    assert rows["key"].is_unique
    recovered = rows[rows["retry_of"].notna()]
    assert set(recovered["status"]) == {"success"} and set(recovered["width"]) == {64}
    assert set(recovered["retry_reason"]) == {"http_503", "connection_error", "read_timeout"}
    assert not list((images / "_partial").glob("*"))


def test_bad_retry_requests_are_refused_with_the_reason(tmp_path: Path) -> None:
    part = tmp_path / "part-00000.parquet"
    with pytest.raises(ValueError, match="holds no downloaded shards"):
        retry_part(str(part), str(tmp_path / "images"), retrying(), dedup_version="v1")
    with pytest.raises(ValueError, match=r"\['http_404'\] are not transient"):
        RetrySettings(reasons=("http_404", *TRANSIENT_REASONS))
