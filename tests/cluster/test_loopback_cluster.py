"""docker-compose.yaml's topology on 127.0.0.1: one run of laion_pipeline, triggered through the REST API.

PostgreSQL, Redis, a Spark standalone master and worker, moto's S3 server for MinIO, and
Airflow's api-server, scheduler, dag-processor and three Celery workers (one on queue
`default`, two on queue `gpu` with a `gpu` pool of two slots, as `--scale
airflow-worker-gpu=2` gives), all started by cluster.loopback and stopped by pid when the
module ends. No GPU here: the gpu-queue workers run the CPU path of the same tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cluster.loopback import LoopbackCluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

DAG = "laion_pipeline"
GPU_TASKS = {"clip_embeddings", "curate", "build_index"}
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
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout:.0f} s\n{cluster.log_tails()}")


def interrupt(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the teardown short
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A SIGTERM (a CI time limit) becomes an interrupt, so the cluster is still stopped by pid.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with LoopbackCluster(tmp_path_factory.mktemp("cluster"), gpu_workers=2) as running:
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

    def task_instances() -> list[dict[str, Any]]:
        return api.call("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def tasks_now(task_id: str, state: str) -> list[dict[str, Any]]:
        if finished():
            pytest.fail(f"run {run_id} ended before the parts' tasks were seen: {[(t['task_id'], t['map_index'], t['state']) for t in task_instances()]}")
        return [t for t in task_instances() if t["task_id"] == task_id and t["state"] == state and (state != "running" or t["pid"])]

    # Events, not timing: the downloads run one at a time on the one cpu worker. Once the
    # first part's download succeeded, the cpu worker is paused (SIGSTOP: the second
    # download cannot start or end) until the first part's embeddings run; those are then
    # paused until the second part's embeddings run too. So a part's embeddings start
    # before the last download ends, and two run at once, on the two gpu workers.
    wait_for("a part's download done", lambda: tasks_now("download_images", "success"), RUN_TIMEOUT_S, cluster)
    cpu_worker = signal_tree(cluster.processes.started["airflow-worker"].pid, signal.SIGSTOP, children=False)
    paused = list(cpu_worker)
    try:
        first = wait_for("a part's clip_embeddings running", lambda: tasks_now("clip_embeddings", "running"), RUN_TIMEOUT_S, cluster)[0]
        paused += signal_tree(first["pid"], signal.SIGSTOP)
        signal_tree(cpu_worker[0], signal.SIGCONT, children=False)
        second = lambda: [t for t in tasks_now("clip_embeddings", "running") if t["map_index"] != first["map_index"]]  # noqa: E731
        wait_for("the other part's clip_embeddings running", second, RUN_TIMEOUT_S, cluster)
    finally:
        for pid in paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    run = wait_for(f"run {run_id} finished", finished, RUN_TIMEOUT_S, cluster)
    return {"run": run, "tasks": task_instances(), "expected": expected, "cluster": cluster}


def signal_tree(pid: int, signum: int, children: bool = True) -> list[int]:
    """Send ``signum`` to a process and (``children``) every process it started; their pids."""
    import psutil

    pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))] if children else [pid]
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signum)
    return pids


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
        assert where[0] in cluster.worker_names[queue] and where[1] == queue, f"{task['task_id']}[{task['map_index']}] ran on {where}"
        if queue == "gpu":
            assert task["pool"] == "gpu"
        if task["task_id"] == "download_images":
            assert task["pool"] == "download"


def test_parts_embed_at_once_on_two_gpu_workers_while_downloads_go_on(finished_run: dict[str, Any]) -> None:
    """One clip_embeddings task per part, in pool gpu (2 slots): two ran at once on the two
    gpu workers, and a part's embeddings started before the last part's download ended."""
    from datetime import datetime

    def span(task: dict[str, Any]) -> tuple[datetime, datetime]:
        return datetime.fromisoformat(task["start_date"]), datetime.fromisoformat(task["end_date"])

    tasks = finished_run["tasks"]
    embeddings = [t for t in tasks if t["task_id"] == "clip_embeddings"]
    downloads = [t for t in tasks if t["task_id"] == "download_images"]
    assert len(embeddings) == len(downloads) == 2 and {t["rendered_map_index"] for t in embeddings} == {"part-00000", "part-00001"}
    (a_start, a_end), (b_start, b_end) = sorted(span(t) for t in embeddings)
    assert b_start < a_end, f"the two parts' embeddings did not overlap: {[span(t) for t in embeddings]}"
    assert {t["hostname"] for t in embeddings} == set(finished_run["cluster"].worker_names["gpu"])
    assert a_start < max(span(t)[1] for t in downloads), "no part's embeddings started before the last download ended"


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
    "embeddings/img_emb/*_part-00000_*.npy": None,
    "embeddings/img_emb/*_part-00001_*.npy": None,
    "embeddings/_parts/part-*.json": 2,
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
