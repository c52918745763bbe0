"""docker-compose.yaml's topology as processes on 127.0.0.1, for tests on a machine without Docker.

PostgreSQL and Redis from Debian's packages (`make cluster-deps`), a Spark standalone
master and worker from pyspark's own distribution, moto's S3 server standing in for MinIO,
and Airflow's api-server, scheduler, dag-processor and two Celery workers (queues
``default`` and ``gpu``). Every port is a free loopback port, every file under one
temporary folder; :meth:`LoopbackCluster.stop` ends each process it started, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Mapping
from glob import glob
from pathlib import Path
from typing import Any

import pyspark

from cluster.processes import ProcessGroup, StartupError, http_ok, port_open
from cluster.topology import ADMIN, BUCKET, CPU_WORKER, GPU_WORKER, Ports, Secrets, service_environments

REPO = Path(__file__).resolve().parents[1]
SPARK_CLASS = str(Path(pyspark.__file__).parent / "bin" / "spark-class")
# Inherited settings that would override the cluster's own (the test session sets some).
FOREIGN_PREFIXES = ("AIRFLOW", "LAION_", "SPARK_", "PYSPARK_", "FSSPEC_", "AWS_")


def postgres_bin() -> Path:
    found = sorted(glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise StartupError("PostgreSQL is not installed: run `make cluster-deps`")
    return Path(found[-1]).parent


def start_postgres(processes: ProcessGroup, env: Mapping[str, str], port: int) -> Path:
    """PostgreSQL on 127.0.0.1:``port`` in a new temporary folder (returned; the caller removes
    it after stopping ``processes``), with the database ``POSTGRES_DB`` owned by ``POSTGRES_USER``."""
    pg = postgres_bin()
    # PostgreSQL refuses to run as root: as root, its files belong to the `postgres` user.
    user = "postgres" if os.geteuid() == 0 else None
    data = Path(tempfile.mkdtemp(prefix="laion-postgres-"))
    password_file = data / "password"
    password_file.write_text(env["POSTGRES_PASSWORD"])
    if user:
        for path in (data, password_file):
            shutil.chown(path, user, user)
    processes.run(
        "postgres-initdb",
        [str(pg / "initdb"), "-D", str(data / "db"), "-U", env["POSTGRES_USER"], "--pwfile", str(password_file),
         "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-sync"],
        env, timeout=120, user=user,
    )  # fmt: skip
    processes.start(
        "postgres",
        [str(pg / "postgres"), "-D", str(data / "db"), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(data), "-c", "fsync=off", "-c", "max_connections=200"],
        env, user=user, stop_signal=signal.SIGINT,  # SIGINT: fast shutdown, without waiting on clients
    )  # fmt: skip
    processes.wait_until("postgres", port_open(port), timeout=60)
    import psycopg2

    db = psycopg2.connect(host="127.0.0.1", port=port, user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"], dbname="postgres")
    db.autocommit = True  # CREATE DATABASE runs outside a transaction
    try:
        with db.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{env["POSTGRES_DB"]}"')
    finally:
        db.close()
    return data


class LoopbackCluster:
    """A running loopback cluster; use as a context manager."""

    def __init__(self, root: Path, python: str = sys.executable, gpu_workers: int = 1) -> None:
        self.root = root
        self.python = python
        self.bin = Path(python).parent
        self.ports = Ports.free()
        self.keys = Secrets.generate()
        self.env = service_environments(self.ports, self.keys, root, REPO, python)
        # N gpu-queue workers and a gpu pool of N slots (compose: --scale airflow-worker-gpu=N
        # with LAION_GPU_SLOTS=N), each worker under its own name, as containers would be.
        self.gpu_workers = [GPU_WORKER] if gpu_workers == 1 else [f"{GPU_WORKER}-{i}" for i in range(1, gpu_workers + 1)]
        for env in self.env.values():
            if "LAION_GPU_SLOTS" in env:
                env["LAION_GPU_SLOTS"] = str(gpu_workers)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        for folder in ("scratch", "spark-work", "redis"):
            (root / folder).mkdir(exist_ok=True)
        self.processes = ProcessGroup(root / "logs")
        self.pg_data: Path | None = None

    # --- what tests read -------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    @property
    def spark_master_ui(self) -> str:
        return f"http://127.0.0.1:{self.ports.spark_master_ui}"

    @property
    def spark_worker_ui(self) -> str:
        return f"http://127.0.0.1:{self.ports.spark_worker_ui}"

    @property
    def s3_options(self) -> dict[str, Any]:
        return {
            "key": self.keys.MINIO_ROOT_USER,
            "secret": self.keys.MINIO_ROOT_PASSWORD,
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self.ports.s3}", "region_name": "us-east-1"},
        }

    bucket = BUCKET

    @property
    def worker_names(self) -> dict[str, list[str]]:
        """The hostnames Airflow records for the workers of each queue."""
        return {"default": [CPU_WORKER], "gpu": self.gpu_workers}

    def token(self) -> str:
        body = json.dumps({"username": ADMIN, "password": self.keys.AIRFLOW_ADMIN_PASSWORD}).encode()
        request = urllib.request.Request(f"{self.api_url}/auth/token", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["access_token"]

    def log_tails(self) -> str:
        return "\n".join(f"--- {path.stem}\n{self.processes.tail(path.stem, 25)}" for path in sorted((self.root / "logs").glob("*.log")))

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> LoopbackCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def service_env(self, service: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
        base["PATH"] = f"{self.bin}{os.pathsep}{base.get('PATH', '')}"
        return {**base, **self.env[service]}

    def start(self) -> None:
        self.start_postgres()
        self.start_redis()
        self.start_s3()
        self.start_spark()
        self.processes.run("airflow-init", [self.python, "-m", "cluster.init_airflow"], self.service_env("airflow-init"), timeout=600)
        self.start_airflow()

    def stop(self) -> None:
        try:
            self.processes.stop_all()
        finally:
            if self.pg_data is not None:
                shutil.rmtree(self.pg_data, ignore_errors=True)

    def start_postgres(self) -> None:
        self.pg_data = start_postgres(self.processes, self.service_env("postgres"), self.ports.postgres)

    def start_redis(self) -> None:
        env = self.service_env("redis")
        self.processes.start(
            "redis",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.ports.redis), "--requirepass", env["REDIS_PASSWORD"],
             "--dir", str(self.root / "redis"), "--save", "", "--appendonly", "no"],
            env,
        )  # fmt: skip
        self.processes.wait_until("redis", port_open(self.ports.redis), timeout=30)

    def start_s3(self) -> None:
        # MinIO's stand-in: any key is accepted, so the bucket test shows routing, not MinIO's auth.
        self.processes.start("minio", [str(self.bin / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports.s3)], self.service_env("minio"))
        self.processes.wait_until("minio", http_ok(f"http://127.0.0.1:{self.ports.s3}/moto-api/"), timeout=60)

    def start_spark(self) -> None:
        self.processes.start("spark-master", [SPARK_CLASS, "org.apache.spark.deploy.master.Master"], self.service_env("spark-master"))
        self.processes.wait_until("spark-master", port_open(self.ports.spark_master), timeout=120)
        env = self.service_env("spark-worker")
        self.processes.start("spark-worker", [SPARK_CLASS, "org.apache.spark.deploy.worker.Worker", env["SPARK_MASTER_URL"]], env)
        self.processes.wait_until("spark-worker", self.spark_worker_registered, timeout=120)

    def spark_worker_registered(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.spark_master_ui}/json/", timeout=5) as response:
                return json.load(response).get("aliveworkers", 0) >= 1
        except OSError:
            return False

    def start_airflow(self) -> None:
        airflow = str(self.bin / "airflow")
        self.processes.start("airflow-apiserver", [airflow, "api-server", "--workers", "1"], self.service_env("airflow-apiserver"))
        self.processes.start("airflow-scheduler", [airflow, "scheduler"], self.service_env("airflow-scheduler"))
        self.processes.start("airflow-dag-processor", [airflow, "dag-processor"], self.service_env("airflow-dag-processor"))
        workers = [("airflow-worker", "default", CPU_WORKER)]
        workers += [("airflow-worker-gpu" + (f"-{i}" if i else ""), "gpu", name) for i, name in enumerate(self.gpu_workers)]
        for service, queue, name in workers:
            # --skip-serve-logs: the log server binds every interface; the api-server reads the shared log folder.
            argv = [airflow, "celery", "worker", "--queues", queue, "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
            env = {**self.service_env("airflow-worker-gpu" if queue == "gpu" else service), "LAION_WORKER_NAME": name}
            self.processes.start(service, argv, env)
        self.processes.wait_until("airflow-apiserver", http_ok(f"{self.api_url}/api/v2/monitor/health"), timeout=180)
