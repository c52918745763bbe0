"""The same run with output_root on S3: a moto server on 127.0.0.1 stands in for S3/MinIO.

Credentials come only from an Airflow connection given as AIRFLOW_CONN_*; the test
checks that every artifact lands in the bucket and that the secret shows in no output.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.heavy

KEY = "AKIALAIONTESTKEY0001"
SECRET = "laion-test-secret-3f9c2e"
BUCKET = "laion-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Any:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@contextmanager
def captured_output(path: Path) -> Iterator[None]:
    """Everything written to this process's stdout and stderr (the run's task logs) into ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    with open(path, "wb") as sink, open(sink.fileno(), "w", closefd=False, buffering=1) as text:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = sys.stderr = text  # Python-level writers (pytest swaps these for its capture)
        try:
            yield
        finally:
            text.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@pytest.fixture(scope="module")
def s3_run(airflow_db: str, sample_web: Any, clip_model: str, run: Any, conf_for: Any, s3_endpoint: str,
           tmp_path_factory: pytest.TempPathFactory) -> Any:
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1"
    ).create_bucket(Bucket=BUCKET)
    connection = {
        "conn_type": "aws",
        "login": KEY,
        "password": SECRET,
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_LAION_TEST_S3", json.dumps(connection))
        web, expected, _ = sample_web
        conf = {**conf_for(web, "unused", clip_model), "output_root": f"s3://{BUCKET}/run", "storage_conn_id": "laion_test_s3"}
        log = tmp_path_factory.mktemp("s3-run") / "run.log"
        with captured_output(log):
            run(conf)
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint, "region_name": "us-east-1"})
    return fs, expected, log


def test_report_on_s3_matches_the_sample_web(s3_run: Any) -> None:
    fs, expected, _ = s3_run
    report = json.loads(fs.cat(f"{BUCKET}/run/report/report.json"))
    assert report["dedup"]["rows_out"] == expected["rows_out"]
    assert report["download"]["successes"] == expected["successes"]
    assert report["embeddings"]["count"] == expected["successes"]
    assert report["index"]["image"]["ntotal"] == expected["successes"]


def test_every_artifact_is_in_the_bucket(s3_run: Any) -> None:
    fs, _, _ = s3_run
    root = f"{BUCKET}/run"
    assert fs.glob(f"{root}/raw/*")
    assert len(fs.glob(f"{root}/dedup/part-*.parquet")) == 2 and fs.exists(f"{root}/dedup/_stats.json")
    assert fs.glob(f"{root}/images/part-*/*.tar") and fs.glob(f"{root}/images/part-*/*_stats.json")
    for sub in ("img_emb", "text_emb", "metadata"):
        assert fs.glob(f"{root}/embeddings/{sub}/*"), sub
    for name in ("image.index", "text.index", "image_infos.json", "text_infos.json", "_SUCCESS.json"):
        assert fs.exists(f"{root}/index/{name}"), name
    assert fs.exists(f"{root}/report/report.html")


def test_the_secret_appears_in_no_artifact(s3_run: Any) -> None:
    fs, _, _ = s3_run
    for path in fs.find(f"{BUCKET}/run"):
        if path.endswith((".json", ".html", ".parquet")):
            assert SECRET.encode() not in fs.cat(path), path


def test_the_secret_appears_in_no_log_xcom_or_rendered_field(s3_run: Any, airflow_db: str) -> None:
    _, _, log = s3_run
    text = log.read_text(errors="replace")
    assert "laion_pipeline" in text and "spark-submit" in text  # the task logs were captured
    assert SECRET not in text
    with sqlite3.connect(Path(airflow_db) / "airflow.db") as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                assert SECRET not in repr(row), f"secret found in table {table}"
    assert "xcom" in tables and "rendered_task_instance_fields" in tables
