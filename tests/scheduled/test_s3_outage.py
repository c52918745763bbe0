"""The S3 endpoint goes away in the middle of a run on s3:// and comes back once a task has
failed because of it: Airflow retries with exponential backoff, and the run ends
successfully with complete outputs and nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sampleweb.hostile import HostileServer

pytestmark = pytest.mark.heavy

GOOD, MISSING = 12, 3


def hit_the_outage(tries: dict[str, tuple[str, int]]) -> bool:
    """A try has failed: the task waits for its retry, or is on its second try already."""
    return any(state in ("up_for_retry", "failed") or number > 1 for state, number in tries.values())


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
        task_tries = lambda: services.task_tries("laion_pipeline", "s3-outage")  # noqa: E731
        services.wait_until(lambda: task_tries().get("fetch_metadata", ("", 0))[0] == "success", "fetch_metadata done", 300, "s3-outage")
        s3_outage.down()
        try:
            # Down until a task has failed a try because of it: dedup reads the raw files from S3.
            services.wait_until(lambda: hit_the_outage(task_tries()), "task failed by the outage", 300, "s3-outage")
        finally:
            s3_outage.up()
        services.wait_for_run("s3-outage", "success", timeout=900)

    tries = services.task_tries("laion_pipeline", "s3-outage")
    # Every task succeeded; export_subset is skipped (the run's export_subset is false).
    assert {t: s for t, (s, _) in tries.items() if s != "success"} == {"export_subset": "skipped"}, tries
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
