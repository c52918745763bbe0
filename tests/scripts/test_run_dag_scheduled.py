"""A `make run` killed mid-download no longer holds the DAG for the scheduler: a run
triggered from the UI waits behind the orphaned run (the DAG allows one active run), then
starts and succeeds once `make up`'s setup has marked the orphaned run failed.

Airflow's scheduler, dag-processor and api-server run as processes (LocalExecutor, SQLite)
over the same AIRFLOW_HOME as `make run`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from make_run import AIRFLOW, REPO, UNFINISHED, AirflowHome, SlowWeb, left_by_a_dead_process, run_until_download
from waiting import wait_until

from cluster.processes import ProcessGroup, free_port

pytestmark = pytest.mark.heavy

UI_RUN = "triggered-in-the-ui"


class Services(ProcessGroup):
    """Airflow's services over one home, logs in test-output/make-run/."""

    def alive(self) -> bool:
        dead = {name: p.returncode for name, p in self.started.items() if p.poll() is not None}
        assert not dead, f"Airflow services exited: {dead}; logs in {self.log_dir}"
        return True


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AirflowHome, Services]]:
    """Airflow's services over a fresh home; laion_pipeline parsed, and paused as a new DAG is."""
    port = free_port()
    home = AirflowHome(
        tmp_path_factory.mktemp("make-run-scheduled"),
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
    )
    home.setup()
    (REPO / "test-output" / "make-run").mkdir(parents=True, exist_ok=True)
    services = Services(REPO / "test-output" / "make-run")
    try:
        services.start("api-server", [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], home.env)
        services.start("scheduler", [AIRFLOW, "scheduler"], home.env)
        services.start("dag-processor", [AIRFLOW, "dag-processor"], home.env)
        wait_until(lambda: services.alive() and home.query("SELECT 1 FROM dag WHERE dag_id = 'laion_pipeline'"), "laion_pipeline is parsed")
        yield home, services
    finally:
        services.stop_all()


def examined_after(home: AirflowHome, run_id: str, moment: str) -> str | None:
    """When the scheduler last examined the running run ``run_id``, if after ``moment``.

    Each scheduler loop first starts the queued runs it may start, then examines the
    running ones (DagRun.last_scheduling_decision).
    """
    rows = home.query("SELECT last_scheduling_decision FROM dag_run WHERE run_id = ?", run_id)
    return rows[0][0] if rows and rows[0][0] and rows[0][0] > moment else None


@pytest.mark.timeout(1800)
def test_a_ui_run_starts_once_make_up_has_marked_the_killed_run_failed(
    airflow: tuple[AirflowHome, Services], slow_web: SlowWeb, demo_clip_model: str, tmp_path: Path
) -> None:
    home, services = airflow
    conf = slow_web.write_conf(tmp_path / "data", demo_clip_model)
    killed, killed_id = run_until_download(home, slow_web, conf, tmp_path / "killed")
    killed.kill()

    # The UI: switch the DAG on, trigger a run with the same conf. The scheduler holds it back.
    home.cli("dags", "unpause", "laion_pipeline")
    home.cli("dags", "trigger", "laion_pipeline", "--run-id", UI_RUN, "--conf", conf.read_text())
    # Two scheduler loops after the trigger: the second one began once the UI's run existed.
    triggered = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")  # as the database holds times
    loop = wait_until(lambda: services.alive() and examined_after(home, killed_id, triggered), "a scheduler loop", timeout=300)
    wait_until(lambda: services.alive() and examined_after(home, killed_id, loop), "the next scheduler loop", timeout=300)
    assert home.run_state(UI_RUN) == "queued" and home.run_state(killed_id) == "running"

    slow_web.release()
    setup = home.setup()  # what `make up` runs before it starts Airflow
    assert left_by_a_dead_process(killed_id, killed) in setup
    assert home.run_state(killed_id) == "failed"
    assert not UNFINISHED & set(home.task_states(killed_id).values())

    def ui_run_ended() -> str | None:
        services.alive()
        state = home.run_state(UI_RUN)
        return state if state in ("success", "failed") else None

    assert wait_until(ui_run_ended, "the UI's run ends", timeout=1200) == "success", home.task_states(UI_RUN)
    states = home.task_states(UI_RUN)  # export_subset is skipped: the run's export_subset is false
    assert {t: s for t, s in states.items() if s != "success"} == {"export_subset": "skipped"}, states
