"""The S3 endpoint goes away for 20 seconds in the middle of a run on s3://: the tasks
that hit the outage fail, Airflow retries them with exponential backoff, and the run ends
successfully with complete outputs and nothing half-written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from sampleweb.hostile import HostileServer

pytestmark = pytest.mark.heavy

GOOD, MISSING = 12, 3
OUTAGE_SECONDS = 20


def test_a_run_on_s3_survives_an_outage_of_the_store(
    airflow_services: Any, s3_outage: Any, run_conf: Any, write_csv: Any, demo_clip_model: str, tmp_path: Path
) -> None:
    import boto3

    services = airflow_services
    with HostileServer() as server:
        rows = [[server.url(f"/good.jpg?i={i}"), f"photo {i}", str(i)] for i in range(GOOD)]
        rows += [[server.url(f"/missing.jpg?i={i}"), f"gone {i}", f"m{i}"] for i in range(MISSING)]
        write_csv(tmp_path / "raw" / "metadata.csv", rows)
        conf = run_conf(demo_clip_model, metadata_urls=[str(tmp_path / "raw" / "*.csv")], output_root="s3://laion-outage/run")
        trigger = services.cli(
            "dags", "trigger", "laion_pipeline", "--run-id", "s3-outage", "--logical-date", "2020-01-05T00:00:00+00:00",
            "--conf", json.dumps(conf),
        )  # fmt: skip
        assert trigger.returncode == 0, trigger.stderr[-2000:]
        deadline = time.monotonic() + 600
        while services.task_tries("laion_pipeline", "s3-outage").get("fetch_metadata", ("", 0))[0] != "success":
            assert time.monotonic() < deadline, services.task_tries("laion_pipeline", "s3-outage")
            time.sleep(0.5)
        s3_outage.down()
        time.sleep(OUTAGE_SECONDS)
        s3_outage.up()
        services.wait_for_run("s3-outage", "success", timeout=1200)

    tries = services.task_tries("laion_pipeline", "s3-outage")
    assert all(state == "success" for state, _ in tries.values()), tries
    retried = {task: n for task, (_, n) in tries.items() if n > 1}
    assert retried, f"no task hit the outage: {tries}"
    history = services.query(
        "SELECT task_id, state FROM task_instance_history WHERE dag_id = 'laion_pipeline' AND run_id = 's3-outage'"
    )
    assert history and {state for _, state in history} <= {"failed", "up_for_retry"}, history

    # Complete outputs in the bucket, and no partial file anywhere.
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{s3_outage.target_port}", aws_access_key_id="any",
        aws_secret_access_key="any", region_name="us-east-1",
    )  # fmt: skip
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="laion-outage", Prefix="run/") for o in page.get("Contents", [])]
    report = json.loads(client.get_object(Bucket="laion-outage", Key="run/report/report.json")["Body"].read())
    assert report["download"]["successes"] == GOOD and report["download"]["errors"] == {"http_404": MISSING}
    assert report["embeddings"]["count"] == GOOD and report["index"]["image"]["ntotal"] == GOOD
    tars = [k for k in keys if k.endswith(".tar")]
    assert tars and all(k[: -len(".tar")] + "_stats.json" in keys for k in tars)
    assert not [k for k in keys if "/_partial/" in k or k.endswith(".tmp")], keys
