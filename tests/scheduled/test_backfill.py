"""`airflow backfill create` over three date partitions: each processed once, into its own
output, with stage metrics sent to StatsD; the same backfill again processes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sampleweb.hostile import HostileServer

pytestmark = pytest.mark.heavy

ROWS = {"2020-01-01": 4, "2020-01-02": 5, "2020-01-03": 6}


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_backfill_processes_each_date_partition_exactly_once(
    airflow_services: Any, run_conf: Any, write_csv: Any, demo_clip_model: str
) -> None:
    services = airflow_services
    data = services.home / "data"  # LAION_METADATA_URLS and LAION_OUTPUT_ROOT point here, per date
    with HostileServer() as server:
        for date, n in ROWS.items():
            rows = [[server.url(f"/good.jpg?d={date}&i={i}"), f"photo {i} of {date}", f"{date}/{i}"] for i in range(n)]
            write_csv(data / "raw" / date / "metadata.csv", rows)
        conf = run_conf(demo_clip_model)
        backfill = ["--from-date", "2020-01-01", "--to-date", "2020-01-03"]
        created = services.backfill("laion_pipeline", *backfill, "--dag-run-conf", json.dumps(conf))
        assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
        runs = services.wait_for_runs("laion_pipeline", len(ROWS), timeout=1200, run_type="backfill")
        requests = sum(server.requests.values())
        outputs = checksums(data / "partitions")

        again = services.backfill("laion_pipeline", *backfill, "--dag-run-conf", json.dumps(conf))
        runs_after = [r for r in services.runs("laion_pipeline") if r["run_type"] == "backfill"]
        requests_after = sum(server.requests.values())

    assert [r["run_type"] for r in runs] == ["backfill"] * len(ROWS)
    for date, n in ROWS.items():
        report = json.loads((data / "partitions" / date.replace("-", "") / "report" / "report.json").read_text())
        assert report["dedup"]["rows_in"] == n, date
        assert report["download"]["successes"] == n, date
        assert report["index"]["image"]["ntotal"] == n, date
    assert requests == sum(ROWS.values())

    # The second backfill finds a run for every date: nothing is created, fetched or written.
    assert len(runs_after) == len(ROWS), (again.stdout[-2000:], runs_after)
    assert requests_after == requests
    assert checksums(data / "partitions") == outputs

    # Each stage's numbers and duration reached StatsD through Airflow's own metrics.
    metrics = services.statsd.metrics("airflow.laion_pipeline.")
    for name, kind in [
        ("airflow.laion_pipeline.download_images.successes", "|g"),
        ("airflow.laion_pipeline.download_images.samples_per_second", "|g"),
        ("airflow.laion_pipeline.dedup.rows_out", "|g"),
        ("airflow.laion_pipeline.clip_embeddings.duration", "|ms"),
        ("airflow.laion_pipeline.build_index.duration", "|ms"),
    ]:
        assert name in metrics and all(v.endswith(kind) for v in metrics[name]), (name, sorted(metrics))
    assert sorted(float(v.split("|")[0]) for v in metrics["airflow.laion_pipeline.download_images.successes"]) == sorted(map(float, ROWS.values()))
