"""The init service: database, pools, connections, the admin's password and the bucket.

    python -m cluster.init_airflow

Run once before the other Airflow services start (docker-compose's `airflow-init`, or the
loopback cluster); running it again changes nothing that is already right. Reads:

- ``LAION_S3_ACCESS_KEY``, ``LAION_S3_SECRET_KEY``, ``LAION_S3_ENDPOINT`` (empty for AWS)
  and optionally ``LAION_S3_REGION``: the store, saved as the connection ``LAION_STORAGE_CONN_ID``; the
  bucket of ``LAION_OUTPUT_ROOT`` is created there when missing;
- ``LAION_SPARK_MASTER`` (``spark://host:7077``): saved as ``spark_default``;
- ``AIRFLOW_ADMIN_PASSWORD``: the password of the simple auth manager's users, written to
  ``[core] simple_auth_manager_passwords_file``, so no password is generated into a log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("cluster.init_airflow")


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"{name} is not set: put it in .env (see .env.example)")
    return value


def storage_options() -> dict:
    client = {"region_name": os.environ.get("LAION_S3_REGION") or "us-east-1"}
    if endpoint := os.environ.get("LAION_S3_ENDPOINT"):  # MinIO or another S3 API; empty: AWS
        client["endpoint_url"] = endpoint
    return {"key": required("LAION_S3_ACCESS_KEY"), "secret": required("LAION_S3_SECRET_KEY"), "client_kwargs": client}


def connections() -> list:
    from airflow.models import Connection

    store = storage_options()
    master = urlsplit(required("LAION_SPARK_MASTER"))
    return [
        Connection(
            conn_id=os.environ.get("LAION_STORAGE_CONN_ID", "laion_storage"),
            conn_type="aws",
            login=store["key"],
            password=store["secret"],
            extra=json.dumps(store["client_kwargs"]),
        ),
        Connection(conn_id="spark_default", conn_type="spark", host=f"{master.scheme}://{master.hostname}", port=master.port),
    ]


def save_connections() -> None:
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        for connection in connections():
            session.query(Connection).filter(Connection.conn_id == connection.conn_id).delete()
            session.add(connection)
            log.info("connection %s: %s", connection.conn_id, connection.conn_type)


def write_passwords() -> None:
    from airflow.configuration import conf

    path = Path(conf.get("core", "simple_auth_manager_passwords_file"))
    users = [entry.split(":")[0] for entry in conf.getlist("core", "simple_auth_manager_users")]
    password = required("AIRFLOW_ADMIN_PASSWORD")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps({user: password for user in users}) + "\n")
    log.info("passwords of %s written to %s", ", ".join(users), path)


def create_bucket() -> None:
    root = os.environ.get("LAION_OUTPUT_ROOT", "")
    if not root.startswith("s3://"):
        return
    import s3fs

    bucket = root.removeprefix("s3://").split("/")[0]
    options = storage_options()
    fs = s3fs.S3FileSystem(**options)
    if fs.exists(bucket):
        return
    region = options["client_kwargs"]["region_name"]
    # S3 rejects us-east-1 as a location constraint: it is the bucket's default.
    placement = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    fs.call_s3("create_bucket", Bucket=bucket, **placement)
    log.info("bucket %s created", bucket)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the database and the pools, sized by LAION_GPU_SLOTS and LAION_DOWNLOAD_SLOTS
    subprocess.run([sys.executable, str(REPO / "scripts" / "setup_airflow.py")], check=True)
    save_connections()
    write_passwords()
    create_bucket()
    return 0


if __name__ == "__main__":
    sys.exit(main())
