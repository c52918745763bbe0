"""The loopback topology: docker-compose.yaml's services as processes on 127.0.0.1.

`service_environments` gives each service the environment `docker-compose.yaml` gives the
service of the same name, with loopback values; tests/cluster checks that the variable
names agree. Only the names in ``LOOPBACK_ONLY`` differ, because several processes share
one host here where containers each have their own.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, fields
from pathlib import Path

from cluster.processes import free_port

BUCKET = "laion"
ADMIN = "admin"
CPU_WORKER, GPU_WORKER = "cpu-worker", "gpu-worker"

LOOPBACK_ONLY = {
    "SPARK_LOCAL_IP": "every Spark endpoint binds 127.0.0.1; a container binds its own address",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "two workers share this host's name; containers each have one",
    "LAION_WORKER_NAME": "the name cluster.hostname.worker_name records for a worker on a shared host",
}


@dataclass(frozen=True)
class Secrets:
    """The values `.env` holds for `docker compose`; generated afresh for each loopback cluster."""

    POSTGRES_PASSWORD: str
    REDIS_PASSWORD: str
    MINIO_ROOT_USER: str
    MINIO_ROOT_PASSWORD: str
    AIRFLOW_FERNET_KEY: str
    AIRFLOW_JWT_SECRET: str
    AIRFLOW_API_SECRET_KEY: str
    AIRFLOW_ADMIN_PASSWORD: str

    @classmethod
    def generate(cls) -> Secrets:
        """Fresh values, from the standard library only (so any host's python3 can write a .env)."""
        values = {f.name: secrets.token_urlsafe(24) for f in fields(cls)}
        values["MINIO_ROOT_USER"] = "laion-" + secrets.token_hex(4)
        values["AIRFLOW_FERNET_KEY"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()  # Fernet's key format
        return cls(**values)


@dataclass(frozen=True)
class Ports:
    postgres: int
    redis: int
    s3: int
    spark_master: int
    spark_master_ui: int
    spark_worker_ui: int
    api: int

    @classmethod
    def free(cls) -> Ports:
        return cls(**{f.name: free_port() for f in fields(cls)})


def service_environments(ports: Ports, keys: Secrets, home: Path, repo: Path, python: str) -> dict[str, dict[str, str]]:
    """Each docker-compose service's environment, for processes on this host under ``home``."""
    db = f"airflow:{keys.POSTGRES_PASSWORD}@127.0.0.1:{ports.postgres}/airflow"
    spark_master = f"spark://127.0.0.1:{ports.spark_master}"
    airflow = {
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
        "AIRFLOW__CELERY__BROKER_URL": f"redis://:{keys.REDIS_PASSWORD}@127.0.0.1:{ports.redis}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{db}",
        "AIRFLOW__CORE__FERNET_KEY": keys.AIRFLOW_FERNET_KEY,
        "AIRFLOW__API_AUTH__JWT_SECRET": keys.AIRFLOW_JWT_SECRET,
        "AIRFLOW__API__SECRET_KEY": keys.AIRFLOW_API_SECRET_KEY,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(ports.api),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports.api}/execution/",
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(repo / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "secrets" / "passwords.json"),
        "LAION_OUTPUT_ROOT": f"s3://{BUCKET}/runs",
        "LAION_STORAGE_CONN_ID": "laion_storage",
        "LAION_CPU_QUEUE": "default",
        "LAION_GPU_QUEUE": "gpu",
        "LAION_GPU_POOL": "gpu",
        "LAION_GPU_SLOTS": "1",
        "LAION_DOWNLOAD_POOL": "download",
        "LAION_DOWNLOAD_SLOTS": "4",
        "LAION_PROCESSES_COUNT": "2",
        "LAION_THREAD_COUNT": "16",
        "PYSPARK_PYTHON": python,
        "PYSPARK_DRIVER_PYTHON": python,
        "PYTHONPATH": str(repo),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "SPARK_LOCAL_IP": "127.0.0.1",
    }

    def worker(name: str) -> dict[str, str]:
        return {
            **airflow,
            # One task at a time in the worker's own process: a prefork pool's processes are
            # daemonic and may not start the processes img2dataset and clip-retrieval need.
            # More slots: more workers.
            "AIRFLOW__CELERY__POOL": "solo",
            # The dedup driver stages files here for Spark's executors: a folder both can read.
            "TMPDIR": str(home / "scratch"),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "cluster.hostname.worker_name",
            "LAION_WORKER_NAME": name,
        }

    return {
        "postgres": {"POSTGRES_USER": "airflow", "POSTGRES_PASSWORD": keys.POSTGRES_PASSWORD, "POSTGRES_DB": "airflow"},
        "redis": {"REDIS_PASSWORD": keys.REDIS_PASSWORD},
        "minio": {"MINIO_ROOT_USER": keys.MINIO_ROOT_USER, "MINIO_ROOT_PASSWORD": keys.MINIO_ROOT_PASSWORD},
        "spark-master": {
            "SPARK_MASTER_HOST": "127.0.0.1",
            "SPARK_MASTER_PORT": str(ports.spark_master),
            "SPARK_MASTER_WEBUI_PORT": str(ports.spark_master_ui),
            # spark-submit talks to the master's RPC port; its REST server (6066) is not needed
            "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
            "SPARK_LOCAL_IP": "127.0.0.1",
        },
        "spark-worker": {
            "SPARK_MASTER_URL": spark_master,
            "SPARK_WORKER_CORES": "2",
            "SPARK_WORKER_MEMORY": "2g",
            "SPARK_WORKER_WEBUI_PORT": str(ports.spark_worker_ui),
            "SPARK_WORKER_DIR": str(home / "spark-work"),
            "PYSPARK_PYTHON": python,
            "SPARK_LOCAL_IP": "127.0.0.1",
        },
        "airflow-init": {
            **airflow,
            "AIRFLOW_ADMIN_PASSWORD": keys.AIRFLOW_ADMIN_PASSWORD,
            "LAION_S3_ENDPOINT": f"http://127.0.0.1:{ports.s3}",
            "LAION_S3_ACCESS_KEY": keys.MINIO_ROOT_USER,
            "LAION_S3_SECRET_KEY": keys.MINIO_ROOT_PASSWORD,
            "LAION_SPARK_MASTER": spark_master,
        },
        "airflow-apiserver": airflow,
        "airflow-scheduler": airflow,
        "airflow-dag-processor": airflow,
        "airflow-worker": worker(CPU_WORKER),
        "airflow-worker-gpu": worker(GPU_WORKER),
    }
