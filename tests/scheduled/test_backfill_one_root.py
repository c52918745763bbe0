"""`airflow backfill create` over three date partitions into ONE output root: each date's
run adds its raw file as a batch, dedup spans the dates, and the backfill's runs (up to
ten at once by default) take turns through the root's lock; the same backfill again adds
nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sampleweb.hostile import HostileServer

pytestmark = pytest.mark.heavy

DATES = ("2020-01-07", "2020-01-08", "2020-01-09")


def test_a_backfill_grows_one_dataset_with_each_date_once(
    airflow_services: Any, run_conf: Any, write_csv: Any, demo_clip_model: str
) -> None:
    services = airflow_services
    data = services.home / "data"  # LAION_METADATA_URLS points at data/raw/<date>/
    root = data / "one-root"
    with HostileServer() as server:
        pair = lambda i: [server.url(f"/good.jpg?one-root={i}"), f"photo {i}"]  # noqa: E731
        rows = {  # each date repeats one pair of the date before it
            DATES[0]: [pair(i) for i in range(0, 4)],
            DATES[1]: [pair(i) for i in range(3, 8)],
            DATES[2]: [pair(i) for i in range(7, 11)],
        }
        for date, date_rows in rows.items():
            write_csv(data / "raw" / date / "metadata.csv", [[*r, f"{date}/{i}"] for i, r in enumerate(date_rows)])
        conf = run_conf(demo_clip_model, output_root=str(root))
        backfill = ["--from-date", DATES[0], "--to-date", DATES[-1]]
        created = services.backfill("laion_pipeline", *backfill, "--dag-run-conf", json.dumps(conf))
        assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
        services.wait_for_runs("laion_pipeline", len(DATES), timeout=1800, run_type="backfill", dates=DATES)
        requests = dict(server.requests_by_url)
        runs_before = services.runs("laion_pipeline")
        again = services.backfill("laion_pipeline", *backfill, "--dag-run-conf", json.dumps(conf))
        runs_after = services.runs("laion_pipeline")
        requests_after = dict(server.requests_by_url)

    stats = json.loads((root / "dedup" / "_stats.json").read_text())
    assert len(stats["batches"]) == len(DATES)
    assert (stats["rows_in"], stats["rows_out"], stats["duplicates_of_earlier_batches"]) == (13, 11, 2)
    assert len(stats["files"]) == 3 and all(f["name"].endswith("-metadata.csv") for f in stats["files"])  # one per date
    # Each unique pair was requested once, whichever date's run came first.
    assert sorted(p for p in requests if "one-root=" in p) == sorted(f"/good.jpg?one-root={i}" for i in range(11))
    assert all(n == 1 for p, n in requests.items() if "one-root=" in p)
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["index"]["image"]["ntotal"] == report["download"]["successes"] == 11
    assert not (root / "_lock.json").exists()  # every run gave the lock back
    # The same backfill again creates no run and requests nothing.
    assert runs_after == runs_before and requests_after == requests, again.stdout[-2000:]
