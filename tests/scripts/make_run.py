"""What the `make run` tests share: an AIRFLOW_HOME of their own prepared by `make up`'s
setup, a web whose one slow image holds a download open, and `scripts/run_dag.py` started
as a process the way `make run` starts it."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from sampleweb.hostile import HostileServer
from waiting import wait_until

from demo import demo_conf  # scripts/, on the path through conftest.py

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
UNFINISHED = {None, "scheduled", "queued", "running", "up_for_retry", "up_for_reschedule", "deferred", "restarting", "awaiting_input"}


class AirflowHome:
    """An AIRFLOW_HOME on SQLite: its environment, `make up`'s setup of it, what its database holds."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            # run_dag.py, setup_airflow.py and Airflow's services share one SQLite file: wait for the lock.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db?timeout=60",
            **env,
        }

    def setup(self) -> str:
        """Run what `make up` runs before starting Airflow (scripts/setup_airflow.py); its output."""
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "setup_airflow.py")], env=self.env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def cli(self, *args: str) -> str:
        done = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"airflow {' '.join(args)}: {done.stderr[-3000:]}"
        return done.stdout

    def query(self, sql: str, *params: Any) -> list[tuple]:
        with sqlite3.connect(self.home / "airflow.db", timeout=60) as db:
            return db.execute(sql, params).fetchall()

    def run_state(self, run_id: str | None) -> str | None:
        rows = self.query("SELECT state FROM dag_run WHERE run_id = ?", run_id)
        return rows[0][0] if rows else None

    def note(self, run_id: str) -> str:
        rows = self.query(
            "SELECT content FROM dag_run_note JOIN dag_run ON dag_run.id = dag_run_note.dag_run_id WHERE run_id = ?", run_id
        )
        return rows[0][0] if rows else ""

    def task_states(self, run_id: str) -> dict[str, str | None]:
        rows = self.query("SELECT task_id, map_index, state FROM task_instance WHERE run_id = ?", run_id)
        return {f"{t}[{m}]" if m >= 0 else t: s for t, m, s in rows}

    def run_of(self, pid: int) -> str | None:
        """The id of the run that process ``pid`` started (its conf's ``launched_by``), once there is one."""
        for run_id, conf in self.query("SELECT run_id, conf FROM dag_run"):
            if (json.loads(conf or "{}").get("launched_by") or {}).get("pid") == pid:
                return run_id
        return None


class MakeRun:
    """``scripts/run_dag.py CONF`` in a process group of its own, its terminal output in a file."""

    started: list[MakeRun] = []  # for the tests' teardown: a failed test leaves no run behind

    def __init__(self, home: AirflowHome, conf: Path, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.output = folder / "terminal.txt"
        with open(self.output, "w") as terminal:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "run_dag.py"), str(conf), "--log-dir", str(folder / "logs")],
                env=home.env, stdout=terminal, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.pid = self.process.pid
        MakeRun.started.append(self)

    def terminal(self) -> str:
        return self.output.read_text()

    def wait(self, timeout: float = 1200) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run_dag.py did not end within {timeout:.0f} s; its terminal:\n{self.terminal()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL to the script and everything it started, as when the machine runs out of memory."""
        if self.group_alive():
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()

    def group_alive(self) -> bool:
        """Whether a process of its group (the script, spark-submit, tool workers) is left."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        return True


class SlowWeb:
    """Good images and one that trickles: while held, a download of it stays open for minutes."""

    def __init__(self, server: HostileServer) -> None:
        self.server = server

    def hold(self) -> None:
        self.server.trickle_seconds = 900

    def release(self) -> None:
        # Headers and no body: the request fails on the conf's socket timeout, and the run goes on.
        self.server.trickle_seconds = 0

    def slow_requests(self) -> int:
        return self.server.requests["/trickle.jpg"]

    def write_conf(self, folder: Path, clip_model: str, good_images: int = 5) -> Path:
        """A conf for a tiny run over ``good_images`` good images and the slow one: one part, one shard."""
        (folder / "raw").mkdir(parents=True)
        urls = [self.server.url(f"/good.jpg?n={i}") for i in range(good_images)] + [self.server.url("/trickle.jpg")]
        with open(folder / "raw" / "metadata.csv", "w", newline="") as f:
            csv.writer(f).writerows([["URL", "TEXT", "SAMPLE_ID"], *([url, f"photo {i}", str(i)] for i, url in enumerate(urls))])
        # The demo's settings, made lighter: one worker process, one part, an exact index.
        conf = {
            **demo_conf(folder, folder / "output", clip_model),
            "dedup_partitions": 1,
            "processes_count": 1,
            "index_key": "Flat",
            "timeout": 3,  # seconds without a byte: the slow image, once released, fails fast
            "max_download_seconds": 3600,  # while held, it stays in download
        }
        path = folder / "conf.json"
        path.write_text(json.dumps(conf))
        return path


def run_until_download(home: AirflowHome, web: SlowWeb, conf: Path, folder: Path) -> tuple[MakeRun, str]:
    """`make run` started with the slow image held, once its download task runs and has
    asked for that image: the run and its run id."""
    web.hold()
    asked_before = web.slow_requests()
    run = MakeRun(home, conf, folder)
    run_id = wait_until(lambda: home.run_of(run.pid), "run_dag.py creates its run", process=run.process)
    wait_until(lambda: web.slow_requests() > asked_before, "the download asks for the slow image", process=run.process)
    wait_until(lambda: home.task_states(run_id).get("download_images[0]") == "running", "download_images runs", process=run.process)
    return run, run_id


def left_by_a_dead_process(run_id: str, run: MakeRun) -> str:
    """The line `make run` and `make up` print for a run that ``run`` left behind."""
    return f"run {run_id} of laion_pipeline was left running by run_dag.py (pid {run.pid} on {socket.gethostname()}), which is gone: marked failed"
