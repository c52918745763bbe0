"""Airflow as it runs for users: scheduler, dag-processor and api-server as separate
processes (LocalExecutor, PostgreSQL), in a fresh AIRFLOW_HOME, with StatsD metrics sent to a
UDP listener on 127.0.0.1.

PostgreSQL, not SQLite: with a scheduler, a dag-processor, an api-server and the CLI writing
one SQLite file, a write that starts inside a read transaction (as ``airflow backfill
create`` does) can fail at once with "database is locked" whatever the busy timeout, since
SQLite refuses a lock upgrade that could deadlock.

``dag.test()`` neither retries failed tasks nor runs backfills; these tests need the real
scheduler for both.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.loopback import start_postgres
from cluster.processes import ProcessGroup

REPO = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
TEST_OUTPUT = REPO / "test-output"
# Each test here waits for whole runs through the scheduler, with retries (about two minutes
# each on a loaded 2-core machine); the first one also starts the services (under one). Above
# the sum of a test's own deadlines (at most 30 minutes), so that those report first.
TIMEOUT_S = 2400


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of this folder get TIMEOUT_S unless they set their own (the hook sees every item)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUT_S))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StatsdListener:
    """Collects the StatsD lines (``name:value|type``) sent to a UDP port on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.lines.extend(data.decode(errors="replace").splitlines())

    def metrics(self, prefix: str) -> dict[str, list[str]]:
        """name -> the ``value|type`` parts received for names starting with ``prefix``."""
        found: dict[str, list[str]] = {}
        for line in list(self.lines):
            name, _, rest = line.partition(":")
            if name.startswith(prefix):
                found.setdefault(name, []).append(rest)
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class AirflowServices:
    """The running processes and what a test needs to drive them."""

    def __init__(self, home: Path, env: dict[str, str], statsd: StatsdListener, database: dict[str, Any]) -> None:
        self.home = home
        self.env = env
        self.statsd = statsd
        self.database = database  # psycopg2.connect's arguments
        self.processes: list[subprocess.Popen] = []

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Rows of ``sql`` (``%s`` placeholders) on Airflow's database."""
        import psycopg2

        db = psycopg2.connect(**self.database)
        try:
            with db, db.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            db.close()

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT run_id, state, run_type, logical_date, conf FROM dag_run WHERE dag_id = %s ORDER BY logical_date", dag_id)
        return [dict(zip(("run_id", "state", "run_type", "logical_date", "conf"), row)) for row in rows]

    def backfill(self, dag_id: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """``airflow backfill create --dag-id dag_id *args`` once no earlier backfill of the DAG is
        open: Airflow allows one at a time, and the scheduler marks one complete only on its
        30-second timer, some time after the backfill's last run ended."""
        deadline = time.monotonic() + timeout
        open_ = "SELECT id FROM backfill WHERE dag_id = %s AND completed_at IS NULL"
        while found := self.query(open_, dag_id):
            dead = [p.args for p in self.processes if p.poll() is not None]
            assert not dead, f"Airflow processes exited: {dead}; see {TEST_OUTPUT}"
            assert time.monotonic() < deadline, f"backfills {found} of {dag_id} still open after {timeout:.0f} s"
            time.sleep(1)
        return self.cli("backfill", "create", "--dag-id", dag_id, *args)

    def task_tries(self, dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
        rows = self.query(
            "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = %s AND run_id = %s", dag_id, run_id
        )
        return {f"{t}[{m}]" if m >= 0 else t: (s, n) for t, m, s, n in rows}

    def wait_until(self, happened: Callable[[], Any], what: str, timeout: float, run_id: str) -> Any:
        """Poll ``happened`` until it returns something true, and return that; fails on a dead
        Airflow process, or at ``timeout`` with the task states of ``run_id``."""
        deadline = time.monotonic() + timeout
        while not (found := happened()):
            dead = [p.args for p in self.processes if p.poll() is not None]
            assert not dead, f"Airflow processes exited: {dead}; see {TEST_OUTPUT}"
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s: {self.task_tries('laion_pipeline', run_id)}"
            time.sleep(0.2)
        return found

    def wait_for_runs(
        self, dag_id: str, count: int, timeout: float, run_type: str | None = None, dates: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` runs of ``dag_id`` (of ``run_type``, of logical ``dates``
        "YYYY-MM-DD", if given) have succeeded; fails on a failed run or a dead Airflow process."""
        deadline = time.monotonic() + timeout
        while True:
            runs = [
                r for r in self.runs(dag_id)
                if (run_type is None or r["run_type"] == run_type) and (dates is None or str(r["logical_date"])[:10] in dates)
            ]  # fmt: skip
            failed = [r for r in runs if r["state"] == "failed"]
            assert not failed, f"runs failed: {failed}; logs under {self.home / 'logs'}"
            if len([r for r in runs if r["state"] == "success"]) >= count:
                return runs
            dead = [p.args for p in self.processes if p.poll() is not None]
            assert not dead, f"Airflow processes exited: {dead}; see {TEST_OUTPUT}"
            assert time.monotonic() < deadline, f"{dag_id}: {runs} after {timeout:.0f}s"
            time.sleep(2)


    def wait_for_run(self, run_id: str, state: str, timeout: float) -> None:
        """Wait until the run ``run_id`` is in ``state``; fails on a dead Airflow process."""
        deadline = time.monotonic() + timeout
        while (found := self.query("SELECT state FROM dag_run WHERE run_id = %s", run_id)) != [(state,)]:
            dead = [p.args for p in self.processes if p.poll() is not None]
            assert not dead, f"Airflow processes exited: {dead}; see {TEST_OUTPUT}"
            assert time.monotonic() < deadline, (found, self.query("SELECT task_id, map_index, state, try_number FROM task_instance WHERE run_id = %s", run_id))
            time.sleep(1)


def _start(services: AirflowServices, name: str, *args: str) -> None:
    TEST_OUTPUT.mkdir(exist_ok=True)
    log = open(TEST_OUTPUT / f"scheduled-{name}.log", "w")  # noqa: SIM115 - open while the process runs
    services.processes.append(
        subprocess.Popen([AIRFLOW, *args], env=services.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    )


class OutageProxy:
    """A TCP endpoint on 127.0.0.1 that forwards to ``target_port`` and can go down.

    The S3 stand-in (moto) keeps its data in memory, so stopping its process would lose the
    bucket -- unlike S3 or MinIO, whose data survive an outage. The outage is made here
    instead: while down, every connection is cut as soon as it is accepted, and open ones
    are cut. The listening socket stays bound throughout: closed, its port (an ephemeral
    one) could be taken by any outgoing connection of the machine before it is bound again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._down = False
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def up(self) -> None:
        with self._lock:
            self._down = False

    def down(self) -> None:
        with self._lock:
            self._down = True
            cut, self._open = self._open, []
        for conn in cut:
            _cut(conn)

    def close(self) -> None:
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                down = self._down
            if down:
                _cut(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _cut(client)
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


S3_KEY, S3_SECRET, S3_BUCKET = "AKIALAIONOUTAGE00001", "laion-outage-secret-71b2", "laion-outage"


@pytest.fixture(scope="session")
def s3_outage() -> Iterator[OutageProxy]:
    """A moto S3 server with a bucket, reached through an :class:`OutageProxy`."""
    import boto3
    from moto.server import ThreadedMotoServer

    moto_port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{moto_port}", aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET, region_name="us-east-1",
    ).create_bucket(Bucket=S3_BUCKET)  # fmt: skip
    proxy = OutageProxy(moto_port)
    yield proxy
    proxy.close()
    server.stop()


@pytest.fixture(scope="session")
def airflow_services(tmp_path_factory: pytest.TempPathFactory, s3_outage: OutageProxy) -> Iterator[AirflowServices]:
    """Scheduler, dag-processor and api-server over a fresh PostgreSQL database.

    Deployment settings for laion_pipeline come from the environment, as in production:
    ``LAION_SCHEDULE=@daily`` (a schedule is what backfills need) over the dates
    2020-01-01 to 2020-01-10, metadata and outputs per date under ``<home>/data/``, short retry delays so retries happen within the test, and
    the storage connection for the S3 stand-in.
    """
    home = tmp_path_factory.mktemp("scheduled-airflow")
    port = free_port()
    TEST_OUTPUT.mkdir(exist_ok=True)
    postgres = ProcessGroup(TEST_OUTPUT)
    database = {"host": "127.0.0.1", "port": free_port(), "user": "airflow", "password": secrets.token_hex(16), "dbname": "airflow"}
    pg_data = start_postgres(
        postgres, {**os.environ, "POSTGRES_USER": database["user"], "POSTGRES_PASSWORD": database["password"], "POSTGRES_DB": database["dbname"]},
        database["port"],
    )  # fmt: skip
    statsd = StatsdListener()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://{user}:{password}@{host}:{port}/{dbname}".format(**database),
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__METRICS__STATSD_ON": "True",
        "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
        "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
        "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        "LAION_SCHEDULE": "@daily",
        "LAION_METADATA_URLS": str(home / "data" / "raw" / "{{ ds }}" / "*.csv"),
        "LAION_OUTPUT_ROOT": str(home / "data" / "partitions" / "{{ ds_nodash }}"),
        # Date partitions exist for these days only: no scheduled run starts by itself.
        "LAION_START_DATE": "2020-01-01",
        "LAION_END_DATE": "2020-01-10",
        "AIRFLOW_CONN_LAION_STORAGE": json.dumps(
            {
                "conn_type": "aws", "login": S3_KEY, "password": S3_SECRET,
                "extra": {"endpoint_url": f"http://127.0.0.1:{s3_outage.port}", "region_name": "us-east-1"},
            }
        ),  # fmt: skip
        "LAION_RETRY_DELAY_SECONDS": "4",
        "LAION_TASK_RETRIES": "4",
        "LAION_DOWNLOAD_SLOTS": "2",
    }
    services = AirflowServices(home, env, statsd, database)
    try:
        setup = subprocess.run([sys.executable, str(REPO / "scripts" / "setup_airflow.py")], env=env, capture_output=True, text=True, timeout=600)
        assert setup.returncode == 0, setup.stderr[-3000:]
        _start(services, "api-server", "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1")
        _start(services, "scheduler", "scheduler")
        _start(services, "dag-processor", "dag-processor")
        deadline = time.monotonic() + 180
        while not services.query("SELECT dag_id FROM dag WHERE dag_id = 'laion_pipeline'"):
            assert time.monotonic() < deadline, f"laion_pipeline was not parsed; see {TEST_OUTPUT}"
            assert all(p.poll() is None for p in services.processes), f"an Airflow process exited; see {TEST_OUTPUT}"
            time.sleep(1)
        unpaused = services.cli("dags", "unpause", "laion_pipeline")
        assert unpaused.returncode == 0, unpaused.stderr[-2000:]
        yield services
    finally:
        for process in services.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in services.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        statsd.close()
        postgres.stop_all()
        shutil.rmtree(pg_data, ignore_errors=True)


def _cut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["URL", "TEXT", "SAMPLE_ID"], *rows])


def _run_conf(clip_model: str, **overrides: Any) -> dict[str, Any]:
    return {
        "dedup_partitions": 1,
        "processes_count": 1,
        "thread_count": 8,
        "number_sample_per_shard": 20,
        "clip_model": clip_model,
        "clip_batch_size": 16,
        "allowed_networks": ["127.0.0.0/8"],
        "max_index_memory_usage": "100M",
        "current_memory_available": "1G",
        "index_key": "Flat",
        **overrides,
    }


@pytest.fixture(scope="session")
def write_csv() -> Any:
    """``write_csv(path, rows)``: a raw metadata CSV with URL, TEXT, SAMPLE_ID columns."""
    return _write_csv


@pytest.fixture(scope="session")
def run_conf() -> Any:
    """``run_conf(clip_model, **overrides)``: small, fast settings for a few images on 127.0.0.1."""
    return _run_conf
