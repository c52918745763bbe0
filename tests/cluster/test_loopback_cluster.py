"""docker-compose.yaml's topology on 127.0.0.1: one run of laion_pipeline, triggered through the REST API.

PostgreSQL, Redis, a Spark standalone master and worker, moto's S3 server for MinIO, and
Airflow's api-server, scheduler, dag-processor and two Celery workers (queues `default`
and `gpu`), all started by cluster.loopback and stopped by pid when the module ends.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cluster.loopback import LoopbackCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

DAG = "laion_pipeline"
GPU_TASKS = {"clip_embeddings", "build_index"}
RUN_TIMEOUT_S = 900


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for(what: str, probe: Any, timeout: float, cluster: LoopbackCluster) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := probe():
                return result
        except OSError:
            pass
        time.sleep(3)
    pytest.fail(f"{what} not within {timeout:.0f} s\n{cluster.log_tails()}")


def interrupt(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the teardown short
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def cluster() -> Any:
    # A SIGTERM (a CI time limit) becomes an interrupt, so the cluster is still stopped by pid.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with LoopbackCluster(Path(tempfile.mkdtemp(prefix="laion-cluster-"))) as running:
            yield running
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def finished_run(cluster: LoopbackCluster, sample_web: Any, demo_clip_model: str) -> dict[str, Any]:
    from demo import demo_conf

    web, expected = sample_web
    api = Api(cluster.api_url, cluster.token())
    wait_for("the DAG parsed by the dag-processor", lambda: api.call("GET", f"/api/v2/dags/{DAG}"), 180, cluster)
    api.call("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
    conf = {**demo_conf(web, Path("unused"), demo_clip_model), "output_root": f"s3://{cluster.bucket}/run"}
    run_id = api.call("POST", f"/api/v2/dags/{DAG}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def finished() -> dict[str, Any] | None:
        run = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(f"run {run_id} finished", finished, RUN_TIMEOUT_S, cluster)
    tasks = api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
    return {"run": run, "tasks": tasks, "expected": expected, "cluster": cluster}


def test_the_run_succeeded(finished_run: dict[str, Any]) -> None:
    states = {(t["task_id"], t["map_index"]): t["state"] for t in finished_run["tasks"]}
    assert finished_run["run"]["state"] == "success", f"{states}\n{finished_run['cluster'].log_tails()}"


def test_gpu_stages_ran_on_the_gpu_worker_and_the_rest_on_the_cpu_worker(finished_run: dict[str, Any]) -> None:
    cluster, tasks = finished_run["cluster"], finished_run["tasks"]
    assert GPU_TASKS <= {t["task_id"] for t in tasks}
    assert sum(t["task_id"] == "download_images" for t in tasks) == 2  # one per dedup part
    for task in tasks:
        queue = "gpu" if task["task_id"] in GPU_TASKS else "default"
        where = (task["hostname"], task["queue"])
        assert where == (cluster.worker_names[queue], queue), f"{task['task_id']}[{task['map_index']}] ran on {where}"
        if queue == "gpu":
            assert task["pool"] == "gpu"
        if task["task_id"] == "download_images":
            assert task["pool"] == "download"


def test_dedup_ran_as_an_application_of_the_spark_master(finished_run: dict[str, Any]) -> None:
    cluster = finished_run["cluster"]
    master = get_json(f"{cluster.spark_master_ui}/json/")
    apps = [app for app in master["completedapps"] if app["name"] == "laion-dedup"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED", master["completedapps"]
    worker = get_json(f"{cluster.spark_worker_ui}/json/")
    assert apps[0]["id"] in {executor["appid"] for executor in worker["finishedexecutors"]}  # its executors ran there


# Each stage's artifacts under the run's root: a glob and how many (None: at least one).
ARTIFACTS = {
    "raw/*": None,
    "dedup/part-*.parquet": 2,
    "dedup/_stats.json": 1,
    "images/part-*/*.tar": None,
    "images/part-*/*_stats.json": None,
    "embeddings/img_emb/*": None,
    "embeddings/text_emb/*": None,
    "embeddings/metadata/*": None,
    "index/*.index": 2,
    "index/_SUCCESS.json": 1,
    "report/report.html": 1,
}


def test_every_artifact_is_in_the_bucket(finished_run: dict[str, Any]) -> None:
    import s3fs

    cluster, expected = finished_run["cluster"], finished_run["expected"]
    fs = s3fs.S3FileSystem(**cluster.s3_options)
    root = f"{cluster.bucket}/run"
    found = {pattern: len(fs.glob(f"{root}/{pattern}")) for pattern in ARTIFACTS}
    assert all(found[p] == n if n else found[p] > 0 for p, n in ARTIFACTS.items()), found
    report = json.loads(fs.cat(f"{root}/report/report.json"))
    counts = report["dedup"]["rows_out"], report["download"]["successes"], report["index"]["image"]["ntotal"]
    assert counts == (expected["rows_out"], expected["successes"], expected["successes"])
