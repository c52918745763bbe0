"""The DAG file parses without work at parse time, imports no heavy library, and is wired as documented.

How long parsing takes is measured by `make bench` (bench/orchestration.py, target 0.3 s),
not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "pyspark", "faiss", "img2dataset", "clip_retrieval", "autofaiss", "open_clip"]
# What makes a parse slow besides imports: reaching out at parse time. The scheduler parses
# the file every few seconds, so none of these may happen then.
WORK_EVENTS = [
    "socket.connect", "socket.getaddrinfo", "sqlite3.connect",
    "subprocess.Popen", "os.system", "os.fork", "os.exec", "os.posix_spawn",
]  # fmt: skip

PARSE_PROBE = """
import json, sqlite3, sys
from airflow.dag_processing.dagbag import DagBag
import airflow.sdk  # Airflow itself is imported before watching starts
watched, seen = set(json.loads(sys.argv[2])), []
sys.addaudithook(lambda event, args: event in watched and seen.append(event))
bag = DagBag(dag_folder=sys.argv[1])
during_parse = list(seen)
sqlite3.connect(":memory:").close()  # proves the hook sees what it watches
heavy = [m for m in sys.argv[3:] if m in sys.modules]
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids),
                  "heavy": heavy, "events": during_parse, "canary": seen[len(during_parse):]}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(REPO / "dags"), json.dumps(WORK_EVENTS), *HEAVY],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors
    return bag


@pytest.fixture(scope="module")
def dag(bag):
    return bag.get_dag("laion_pipeline")


def test_parses_without_errors(probe: dict) -> None:
    assert probe["errors"] == {}
    assert probe["dags"] == ["laion_export_subset", "laion_pipeline", "laion_remove_batch", "laion_retry_failed"]


def test_parsing_connects_to_nothing_and_starts_no_process(probe: dict) -> None:
    assert probe["canary"] == ["sqlite3.connect"]
    assert probe["events"] == []


def test_parsing_imports_no_heavy_library(probe: dict) -> None:
    assert probe["heavy"] == []


def test_stages_in_order(dag) -> None:
    order = ["fetch_metadata", "dedup", "list_dedup_parts", "download_images", "clip_embeddings", "curate", "build_index", "report"]
    assert set(dag.task_ids) == {*order, "export_subset"}
    assert dag.get_task("export_subset").upstream_task_ids == {"curate"}
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids


def test_every_task_retries(dag) -> None:
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id


def test_gpu_stages_in_gpu_pool_and_downloads_pooled(dag) -> None:
    assert dag.get_task("clip_embeddings").pool == "gpu"
    assert dag.get_task("build_index").pool == "gpu"
    download = dag.get_task("download_images")
    assert download.pool == "download"
    assert download.map_index_template == "{{ task.part }}"


def test_params_reject_bad_values(dag) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    good = {"image_size": 256, "resize_mode": "border", "max_index_memory_usage": "4G", "metadata_urls": ["raw/*.csv"]}
    for key, value in good.items():
        assert dag.params.get_param(key).resolve(value) == value
    bad = {"image_size": 0, "resize_mode": "stretch", "max_index_memory_usage": "lots", "metadata_urls": [], "dedup_partitions": "4"}
    for key, value in bad.items():
        with pytest.raises(ParamValidationError):
            dag.params.get_param(key).resolve(value)


def test_retry_dag_maps_over_parts_and_accepts_only_transient_reasons(bag) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    retry = bag.get_dag("laion_retry_failed")
    task = retry.get_task("retry_failed_samples")
    assert task.pool == "download" and task.retries >= 1
    assert task.map_index_template == "{{ task.part }}"
    assert "retry_failed_samples" in retry.get_task("list_dedup_parts").downstream_task_ids
    reasons = retry.params.get_param("reasons")
    assert reasons.resolve(["http_5xx", "read_timeout"]) == ["http_5xx", "read_timeout"]
    for bad in (["http_404"], [], ["read_timeout", "read_timeout"]):
        with pytest.raises(ParamValidationError):
            reasons.resolve(bad)


def test_params_render_with_the_run_date() -> None:
    import jinja2

    from operators.params import FILTERS

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters.update(FILTERS)
    template = env.from_string("{{ params.output_root | with_run_date }}|{{ params.urls | with_run_date | join(',') }}")
    params = {"output_root": "s3://b/runs/{{ ds_nodash }}", "urls": ["/raw/{{ ds }}/*.csv", "/static.csv"]}
    assert template.render(params=params, ds="2026-11-03", ds_nodash="20261103") == "s3://b/runs/20261103|/raw/2026-11-03/*.csv,/static.csv"
    assert env.from_string("{{ p | with_run_date }}").render(p="/plain/{x}") == "/plain/{x}"
    with pytest.raises(ValueError, match="uses a run date template"):
        env.from_string("{{ p | with_run_date }}").render(p="/raw/{{ ds }}")


def _parse_with(env: dict[str, str]) -> dict:
    import os

    probe = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder=sys.argv[1])\n"
        "dag = bag.dags.get('laion_pipeline')\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()},"
        " 'schedule': str(dag.schedule) if dag else None, 'end_date': str(dag.end_date) if dag else None}))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LAION_")}
    out = subprocess.run([sys.executable, "-c", probe, str(REPO / "dags")], env={**clean, **env}, check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_schedule_comes_from_the_deployment_and_needs_metadata_urls() -> None:
    missing = _parse_with({"LAION_SCHEDULE": "@daily"})
    assert "LAION_METADATA_URLS is not set" in " ".join(missing["errors"].values())
    scheduled = _parse_with(
        {"LAION_SCHEDULE": "@daily", "LAION_METADATA_URLS": "/raw/{{ ds }}/*.csv", "LAION_START_DATE": "2020-01-01", "LAION_END_DATE": "2020-01-10"}
    )
    assert scheduled["errors"] == {} and scheduled["schedule"] == "@daily"
    assert scheduled["end_date"].startswith("2020-01-10")
