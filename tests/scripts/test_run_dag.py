"""`make run` (scripts/run_dag.py) stopped mid-download: SIGTERM marks its run failed and
leaves nothing running; after a SIGKILL the next start marks the orphaned run failed and
runs; `make up`'s setup leaves a live run alone."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from make_run import UNFINISHED, AirflowHome, MakeRun, SlowWeb, left_by_a_dead_process, run_until_download
from waiting import wait_until

from run_dag import main, owner_state, this_process  # scripts/, on the path through conftest.py


def test_the_process_behind_a_run_is_alive_gone_or_elsewhere() -> None:
    assert owner_state(this_process()) == "alive"
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner = {"host": socket.gethostname(), "pid": child.pid, "pid_started_at": psutil.Process(child.pid).create_time()}
    assert owner_state(owner) == "alive"
    child.communicate(b"")
    assert owner_state(owner) == "gone"
    # The pid now belongs to a process that started at another time: the run's process is gone.
    assert owner_state({**this_process(), "pid_started_at": this_process()["pid_started_at"] - 3600}) == "gone"
    assert owner_state({**this_process(), "host": socket.gethostname() + "-elsewhere"}) == "elsewhere"
    assert owner_state(None) == owner_state({"pid": 1}) == "unknown"


def test_a_conf_that_is_not_an_object_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "conf.json"
    conf.write_text('["s3://bucket/*.parquet"]')
    assert main(["run_dag.py", str(conf)]) == 2
    assert f"run conf {conf} holds a JSON array; it must be an object of params" in capsys.readouterr().err
    assert main(["run_dag.py", str(tmp_path / "missing.json")]) == 2
    assert f"cannot read run conf {tmp_path / 'missing.json'}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> AirflowHome:
    home = AirflowHome(tmp_path_factory.mktemp("make-run-home"))
    home.setup()
    return home


@pytest.fixture(scope="module")
def pipeline_conf(slow_web: SlowWeb, demo_clip_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow_web.write_conf(tmp_path_factory.mktemp("make-run-data"), demo_clip_model)


@pytest.mark.heavy
@pytest.mark.timeout(1200)
def test_sigterm_marks_the_run_failed_and_make_up_leaves_a_live_run_alone(
    airflow_home: AirflowHome, slow_web: SlowWeb, pipeline_conf: Path, tmp_path: Path
) -> None:
    home = airflow_home
    run, run_id = run_until_download(home, slow_web, pipeline_conf, tmp_path)

    # `make up` meanwhile: the run's process is alive, so the run is not touched.
    setup = home.setup()
    assert f"run {run_id} of laion_pipeline is being run by run_dag.py (pid {run.pid} on {socket.gethostname()}): left as it is" in setup
    assert home.run_state(run_id) == "running" and run.process.poll() is None

    run.process.send_signal(signal.SIGTERM)  # to the script only, as `kill PID` does
    assert run.wait() == 1
    assert home.run_state(run_id) == "failed"
    states = home.task_states(run_id)
    assert states["download_images[0]"] == "failed", states
    assert not UNFINISHED & set(states.values()), states
    assert "Stopped by SIGTERM" in home.note(run_id)
    assert f"SIGTERM received: run {run_id} marked failed" in run.terminal()
    # Nothing of the run is left running: img2dataset's workers went with it.
    wait_until(lambda: not run.group_alive(), "the run's process group is empty", timeout=120)


def spark_jvm(run: MakeRun) -> bool:
    """Whether the run's dedup has started Spark (spark-submit's JVM among its processes)."""
    try:
        return any(child.name() == "java" for child in psutil.Process(run.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return False


@pytest.mark.heavy
@pytest.mark.timeout(1200)
def test_ctrl_c_during_dedup_marks_the_run_failed_and_stops_spark(
    airflow_home: AirflowHome, slow_web: SlowWeb, demo_clip_model: str, tmp_path: Path
) -> None:
    home = airflow_home
    run = MakeRun(home, slow_web.write_conf(tmp_path / "data", demo_clip_model), tmp_path)
    run_id = wait_until(lambda: home.run_of(run.pid), "run_dag.py creates its run", process=run.process)
    wait_until(lambda: spark_jvm(run), "dedup starts Spark", process=run.process)

    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    assert run.wait() == 1
    assert home.run_state(run_id) == "failed"
    states = home.task_states(run_id)
    assert states["fetch_metadata"] == "success" and states["dedup"] == "failed", states
    assert not UNFINISHED & set(states.values()), states
    assert f"SIGINT received: run {run_id} marked failed" in run.terminal()
    wait_until(lambda: not run.group_alive(), "the run's process group is empty", timeout=120)


@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_a_killed_run_is_marked_failed_by_the_next_start_which_succeeds(
    airflow_home: AirflowHome, slow_web: SlowWeb, pipeline_conf: Path, tmp_path: Path
) -> None:
    home = airflow_home
    killed, killed_id = run_until_download(home, slow_web, pipeline_conf, tmp_path / "killed")
    killed.kill()
    # What held the DAG: a run still running, with nothing behind it.
    assert home.run_state(killed_id) == "running"
    assert home.task_states(killed_id)["download_images[0]"] == "running"

    slow_web.release()
    again = MakeRun(home, pipeline_conf, tmp_path / "again")
    assert again.wait() == 0, again.terminal()[-3000:]
    # Every stage that started says how it ended: export_subset (not asked for) skips itself.
    lines = again.terminal().splitlines()
    started = {line.split()[1] for line in lines if line.endswith(" started")}
    ended = {line.split()[1] for line in lines if re.search(r" (done in|skipped after) ", line)}
    assert started == ended and "export_subset" in started, lines

    assert left_by_a_dead_process(killed_id, killed) in again.terminal()
    assert home.run_state(killed_id) == "failed"
    states = home.task_states(killed_id)
    assert states["download_images[0]"] == states["report"] == "failed", states
    assert not UNFINISHED & set(states.values()), states
    assert f"pid {killed.pid}" in home.note(killed_id)
    assert home.run_state(home.run_of(again.pid)) == "success"
