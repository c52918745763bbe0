"""Retry failed samples through Airflow: laion_pipeline, then laion_retry_failed, then
laion_pipeline again over the same output root.

The hostile server's /flaky.jpg, /reset.jpg and /stall.jpg fail the first request for
each URL (503, hang-up, read timeout) and then serve the image; /missing.jpg (404) and
/forbidden.jpg (403) always fail. Its request log proves what was asked for again.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sampleweb.hostile import HostileServer

pytestmark = pytest.mark.heavy

WEB = {"/flaky.jpg": 6, "/reset.jpg": 3, "/stall.jpg": 3, "/missing.jpg": 4, "/forbidden.jpg": 3, "/good.jpg": 9}
TRANSIENT = {"/flaky.jpg", "/reset.jpg", "/stall.jpg"}


def report_of(output: Path) -> dict:
    return json.loads((output / "report" / "report.json").read_text())


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_retry_recovers_transient_failures_and_the_next_run_adds_only_them(
    airflow_db: str, run: Any, conf_for: Any, clip_model: str, tmp_path: Path
) -> None:
    output = tmp_path / "output"
    with HostileServer(stall_seconds=4) as server:
        raw = tmp_path / "raw"
        raw.mkdir()
        with open(raw / "flaky-web.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["URL", "TEXT", "SAMPLE_ID"])
            for path, n in WEB.items():
                for i in range(n):
                    writer.writerow([server.url(f"{path}?i={i}"), f"a photo {path} {i}", f"{path}{i}"])
        conf = {**conf_for(tmp_path, output, clip_model), "metadata_urls": [str(raw / "*.csv")], "timeout": 2, "max_retry_after_seconds": 0}
        run(conf)
        first = report_of(output)
        embeddings_before = checksums(output / "embeddings" / "img_emb")

        run({k: conf[k] for k in ("output_root", "allowed_networks", "max_requests_per_second_per_host", "timeout", "max_retry_after_seconds")}, "laion_retry_failed")
        asked = dict(server.requests_by_url)
        run(conf)
        second = report_of(output)

    assert first["download"]["successes"] == WEB["/good.jpg"]
    assert first["download"]["errors"] == {"http_503": 6, "connection_error": 3, "read_timeout": 3, "http_404": 4, "http_403": 3}
    for path, n in WEB.items():
        assert [asked[f"{path}?i={i}"] for i in range(n)] == [2 if path in TRANSIENT else 1] * n, path

    recovered = sum(WEB[p] for p in TRANSIENT)
    download = second["download"]
    assert download["count"] == first["download"]["count"] == sum(WEB.values())
    assert download["successes"] == WEB["/good.jpg"] + recovered
    assert download["errors"] == {"http_404": 4, "http_403": 3}
    assert download["failed_to_download"] == 7
    assert [f["count"] for f in second["funnel"]][-3:] == [download["successes"]] * 3
    assert second["run"]["run_id"] != first["run"]["run_id"]

    # The next run embedded only the new shards: earlier partitions were kept, byte for byte.
    embeddings = json.loads((output / "embeddings" / "_SUCCESS.json").read_text())
    assert embeddings["count"] == download["successes"]
    assert embeddings["partitions_computed"] == embeddings["partitions"] - len(embeddings_before)
    after = checksums(output / "embeddings" / "img_emb")
    assert {k: after[k] for k in embeddings_before} == embeddings_before
