"""orchestration: DAG parse time, N empty mapped tasks through Airflow, a run's time outside its tasks.

Runs use ``dag.test`` (what `make run` and `make demo` use): Airflow's scheduling loop and
task runner in one process, on SQLite, the embedded default.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench.harness import PY, REPO, Bench, env_for_tools, run_json, run_timed
from bench.sizes import Size

BENCH_DAGS = Path(__file__).with_name("dags")


def airflow_env(work: Path) -> dict[str, str]:
    """A bench AIRFLOW_HOME on SQLite, the pipeline's and the bench's DAG folders, as the Makefile sets."""
    return {
        **env_for_tools(),
        "AIRFLOW_HOME": str((work / "airflow").resolve()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[*]"}',
        "AIRFLOW__API__HOST": "127.0.0.1",
    }


def migrate(work: Path) -> None:
    run_timed([PY, "-m", "airflow", "db", "migrate"], env=airflow_env(work), timeout=900)


def run_dag(dag_folder: str, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """One ``dag.test`` run: its wall time, each task's duration and its own numbers (XCom)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    bag = DagBag(dag_folder=dag_folder)
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    started = time.perf_counter()
    dag_run = bag.get_dag(dag_id).test(run_conf=conf)
    wall = time.perf_counter() - started
    if not str(dag_run.state).endswith("success"):
        raise RuntimeError(f"{dag_id} run {dag_run.run_id} ended {dag_run.state}")
    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.run_id == dag_run.run_id)).all()
        xcoms = session.scalars(select(XComModel).where(XComModel.run_id == dag_run.run_id,
                                                        XComModel.key == "return_value")).all()
        numbers = {(x.task_id, x.map_index): XComModel.deserialize_value(x) for x in xcoms}
        tasks = [{"task": ti.task_id, "map_index": ti.map_index, "duration": round(ti.duration or 0, 3),
                  "own_seconds": (numbers.get((ti.task_id, ti.map_index)) or {}).get("seconds")
                  if isinstance(numbers.get((ti.task_id, ti.map_index)), dict) else None} for ti in tis]
    task_seconds = sum(t["duration"] for t in tasks)
    own = sum(t["own_seconds"] or 0 for t in tasks)
    return {"seconds": round(wall, 3), "tasks": len(tasks), "sum_task_seconds": round(task_seconds, 3),
            "sum_own_seconds": round(own, 3), "outside_tasks_seconds": round(wall - task_seconds, 3),
            "outside_own_compute_seconds": round(wall - own, 3), "per_task": tasks}


def run(size: Size, work: Path) -> Bench:
    bench = Bench("orchestration", settings={"runner": "dag.test on SQLite (the embedded default)",
                                             "mapped_tasks": list(size.mapped_tasks)})
    env = airflow_env(work)
    dag_file = str(REPO / "dags" / "laion_pipeline.py")
    bench.commands["parse"] = [PY, "-m", "bench.workers", "parse-dag", dag_file]
    bench.interleave({"parse": lambda rep: run_json(bench.commands["parse"], env=env)}, size.reps)
    cases = {}
    for n in size.mapped_tasks:
        bench.commands[f"mapped_{n}"] = [PY, "-m", "bench.workers", "run-dag", str(BENCH_DAGS), "bench_mapped_empty",
                                         f'{{"n": {n}}}']

        def mapped(rep: int, n: int = n) -> dict[str, Any]:
            done = run_json(bench.commands[f"mapped_{n}"], env={**env, "AIRFLOW__CORE__DAGS_FOLDER": str(BENCH_DAGS)})
            done.pop("per_task")
            return {**done, "seconds_per_mapped_task": round(done["seconds"] / n, 4)}

        cases[f"mapped_{n}"] = mapped
    # A run of 256 mapped tasks takes minutes here: one repetition each.
    med = bench.interleave(cases, 1)
    bench.target("DAG parse (s)", med["parse"]["seconds"], "<=", 0.3)
    return bench


def ensure_home(work: Path) -> None:
    if not (work / "airflow" / "airflow.db").exists():
        (work / "airflow").mkdir(parents=True, exist_ok=True)
        migrate(work)
    os.environ.setdefault("AIRFLOW_HOME", str((work / "airflow").resolve()))
