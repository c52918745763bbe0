"""The state of a run's tasks, read from the Airflow database of the test session."""

from __future__ import annotations


def task_tries(dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
    """``{task (with [map index]): (state, try number)}`` of one run, from Airflow's database."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)).all()
        return {
            ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""): (str(ti.state), ti.try_number) for ti in tis
        }
