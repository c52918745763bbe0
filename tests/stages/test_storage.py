from __future__ import annotations

from pathlib import Path

import pytest
from airflow.models.connection import Connection

from stages import storage


def test_s3_options_come_from_an_aws_connection() -> None:
    conn = Connection(conn_id="s", conn_type="aws", login="AK", password="SK", extra='{"endpoint_url": "http://127.0.0.1:9000"}')
    assert storage.s3_options_from_connection(conn) == {
        "key": "AK", "secret": "SK", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
    }


def test_atomic_open_leaves_nothing_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.json"
    with pytest.raises(RuntimeError):
        with storage.atomic_open(str(target), "w") as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    storage.write_json(str(target), {"a": 1})
    assert storage.read_json(str(target)) == {"a": 1}


def test_join_keeps_urls_and_paths_apart() -> None:
    assert storage.join("s3://b/run/", "dedup", "_stats.json") == "s3://b/run/dedup/_stats.json"
    assert storage.join("/data/run", "raw") == "/data/run/raw"
