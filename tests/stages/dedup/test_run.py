"""stages.dedup.run end to end on real Spark: local folders and a moto S3 server."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
from dedup_builders import CAT, REFERENCE_COLUMNS, column_types, read_parts, settings, write_raw
from pyspark.sql import SparkSession

from stages import dedup
from stages.layout import DEDUP_MARKER


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("laion") / "raw"
    write_raw(folder)
    return folder


@pytest.fixture(scope="module")
def deduped(spark: SparkSession, raw: Path) -> tuple[Path, dict[str, Any]]:
    output = raw.parent / "dedup"
    return output, dedup.run(spark, str(raw), str(output), settings(3), seed=7)


def test_stats_count_every_row(raw: Path, deduped: tuple[Path, dict[str, Any]]) -> None:
    output, stats = deduped
    names = ["a.csv", "b.csv.gz", "c.tsv", "d.parquet"]
    listing = sorted([name, (raw / name).stat().st_size] for name in names)
    on_disk = json.loads((output / DEDUP_MARKER).read_text())
    assert on_disk == stats
    assert {key: stats[key] for key in ("rows_in", "rows_invalid", "rows_out", "partitions", "seed")} == {
        "rows_in": 16, "rows_invalid": 6, "rows_out": 7, "partitions": 3, "seed": 7,
    }  # fmt: skip
    assert stats["rows_invalid_by_reason"] == {"missing_caption": 2, "missing_url": 2, "non_http_url": 2}
    assert stats["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    files = [{k: f[k] for k in ("name", "rows", "format", "delimiter", "size", "batch")} for f in stats["files"]]
    assert files == [
        {"name": "a.csv", "rows": 6, "format": "csv", "delimiter": "|", "size": listing[0][1], "batch": 0},
        {"name": "b.csv.gz", "rows": 4, "format": "csv", "delimiter": ",", "size": listing[1][1], "batch": 0},
        {"name": "c.tsv", "rows": 3, "format": "csv", "delimiter": "\t", "size": listing[2][1], "batch": 0},
        {"name": "d.parquet", "rows": 3, "format": "parquet", "delimiter": None, "size": listing[3][1], "batch": 0},
    ]
    assert all(f["sha256"] == hashlib.sha256((raw / f["name"]).read_bytes()).hexdigest() for f in stats["files"])
    assert stats["input_fingerprint"] == hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    [batch] = stats["batches"]
    assert {k: batch[k] for k in ("batch", "rows_in", "rows_invalid", "rows_out", "duplicates_of_earlier_batches")} == {
        "batch": 0, "rows_in": 16, "rows_invalid": 6, "rows_out": 7, "duplicates_of_earlier_batches": 0,
    }  # fmt: skip
    assert isinstance(batch["seconds"], float)  # recorded; its value is for make bench


def test_output_is_exactly_n_parts_with_the_reference_schema(deduped: tuple[Path, dict[str, Any]]) -> None:
    output, stats = deduped
    assert sorted(path.name for path in output.iterdir()) == ["_rejected", DEDUP_MARKER, "keys", *stats["parts"]]
    for name in stats["parts"]:
        assert column_types(output / name) == REFERENCE_COLUMNS


def test_rows_are_aligned_deduplicated_and_cast(deduped: tuple[Path, dict[str, Any]]) -> None:
    output, stats = deduped
    rows = read_parts([output / name for name in stats["parts"]]).to_pylist()
    by_key = {(row["URL"], row["TEXT"]): row for row in rows}
    assert len(by_key) == len(rows) == 7
    assert set(by_key) == {
        ("http://x.org/1.jpg", CAT),
        ("http://x.org/1.jpg", "a different caption"),
        ("https://x.org/2.jpg", "dog"),
        ("HTTP://X.org/4.jpg", "upper"),
        ("https://x.org/5.jpg", "hello, world"),
        ("https://x.org/6.jpg", "tab\tinside"),
        ("http://x.org/8.jpg", "from parquet"),
    }
    # duplicates keep the row of the first file by name; unparseable numbers became null
    assert by_key[("https://x.org/2.jpg", "dog")] == {
        "SAMPLE_ID": 2, "URL": "https://x.org/2.jpg", "TEXT": "dog", "HEIGHT": None, "WIDTH": 100,
        "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": None,
    }  # fmt: skip
    assert by_key[("http://x.org/1.jpg", CAT)]["SAMPLE_ID"] == 1
    five = by_key[("https://x.org/5.jpg", "hello, world")]
    assert (five["WIDTH"], five["HEIGHT"], five["LICENSE"], five["NSFW"]) == (12, 7, None, None)
    assert by_key[("http://x.org/8.jpg", "from parquet")]["HEIGHT"] == 64


def test_rerun_with_unchanged_input_is_skipped(
    spark: SparkSession, raw: Path, deduped: tuple[Path, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    output, stats = deduped
    before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in output.rglob("*") if path.is_file()}
    with caplog.at_level(logging.INFO, logger="stages.dedup"):
        again = dedup.run(spark, str(raw), str(output), settings(3), seed=7)
    assert again == stats
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in output.rglob("*") if path.is_file()} == before
    assert "Skipping dedup" in caplog.text


def test_same_input_gives_the_same_parts(
    spark: SparkSession, raw: Path, deduped: tuple[Path, dict[str, Any]]
) -> None:
    output, stats = deduped
    other = raw.parent / "dedup-again"
    dedup.run(spark, f"file://{raw}", f"file://{other}", settings(3), seed=7)
    for name in stats["parts"]:
        assert (other / name).read_bytes() == (output / name).read_bytes()


# --- S3, through a real moto server on loopback ---------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[fsspec.AbstractFileSystem]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    config = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # s3fs sends no LocationConstraint then
    monkeypatch.setenv("FSSPEC_S3", json.dumps(config))
    monkeypatch.setitem(fsspec.config.conf, "s3", config)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("laion")
    try:
        yield fs
    finally:
        server.stop()


def test_s3_input_and_output(spark: SparkSession, s3: fsspec.AbstractFileSystem, tmp_path: Path) -> None:
    write_raw(tmp_path / "raw")
    for path in sorted((tmp_path / "raw").iterdir()):
        s3.put_file(str(path), f"laion/raw/{path.name}")
    stats = dedup.run(spark, "s3://laion/raw", "s3://laion/dedup", settings(2))
    s3.invalidate_cache()
    assert sorted(s3.ls("laion/dedup")) == [
        "laion/dedup/_rejected", f"laion/dedup/{DEDUP_MARKER}", "laion/dedup/keys", *(f"laion/dedup/{p}" for p in stats["parts"])
    ]
    assert s3.exists("laion/dedup/_rejected/rejected.parquet")
    assert json.loads(s3.cat_file(f"laion/dedup/{DEDUP_MARKER}")) == stats
    assert (stats["rows_in"], stats["rows_invalid"], stats["rows_out"]) == (16, 6, 7)
    tables = [pq.read_table(io.BytesIO(s3.cat_file(f"laion/dedup/{name}"))) for name in stats["parts"]]
    assert sum(table.num_rows for table in tables) == 7
