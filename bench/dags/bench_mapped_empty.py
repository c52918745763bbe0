"""N mapped tasks that do nothing: what the scheduler costs per mapped task (bench/orchestration.py)."""

from __future__ import annotations

from airflow.sdk import Param, dag, task


@dag(dag_id="bench_mapped_empty", schedule=None, params={"n": Param(16, type="integer", minimum=1)},
     tags=["bench"], max_active_runs=1)
def bench_mapped_empty() -> None:
    @task
    def list_parts(params: dict | None = None) -> list[str]:
        return [f"part-{i:05d}" for i in range(int(params["n"]))]

    @task(map_index_template="{{ part }}")
    def download_nothing(part: str) -> dict:
        return {"part": part}

    download_nothing.expand(part=list_parts())


bench_mapped_empty()
