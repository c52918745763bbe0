from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession

from stages import dedup, dedup_job

REFERENCE_COLUMNS = [
    ("SAMPLE_ID", pa.int64()),
    ("URL", pa.string()),
    ("TEXT", pa.string()),
    ("HEIGHT", pa.int32()),
    ("WIDTH", pa.int32()),
    ("LICENSE", pa.string()),
    ("NSFW", pa.string()),
    ("similarity", pa.float64()),
]
CAT = "a cat | sitting\non a mat"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]], delimiter: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, quotechar='"', lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], delimiter: str = ",") -> None:
    data = csv_text(header, rows, delimiter).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def write_raw(raw: Path) -> None:
    """Four files with 16 rows: 4 without an http(s) URL, 2 without a caption, 3 duplicates, 7 to keep."""
    raw.mkdir(parents=True)
    full = ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]
    write_csv(raw / "a.csv", full, [
        [1, "http://x.org/1.jpg", CAT, 256, 256, "cc-by", "UNLIKELY", 0.31],
        [2, "https://x.org/2.jpg", "dog", "abc", 100, "?", "UNLIKELY", "not a number"],
        [3, "ftp://x.org/3.jpg", "ftp", 1, 1, "", "", 0.1],
        [4, "HTTP://X.org/4.jpg", "upper", 10, 10, "", "", 0.2],
        [5, "http://x.org/1.jpg", CAT, 256, 256, "cc-by", "UNLIKELY", 0.31],
        [6, "", "no url", 1, 1, "", "", 0.3],
    ], delimiter="|")  # fmt: skip
    write_csv(raw / "b.csv.gz", ["caption", "url", "width", "height", "sample_id", "extra"], [
        ["dog", "https://x.org/2.jpg", 5, 5, 20, "x"],
        ["a different caption", "http://x.org/1.jpg", 1, 2, 21, "x"],
        ["hello, world", "https://x.org/5.jpg", "12.0", 7, 22, "x"],
        ["data", "data:image/png;base64,AAAA", 1, 1, 23, "x"],
    ])  # fmt: skip
    write_csv(raw / "c.tsv", ["url", "TEXT", "similarity", "NSFW"], [
        ["https://x.org/6.jpg", "tab\tinside", "0.5", "NSFW"],
        ["https://x.org/7.jpg", "", "0.6", ""],
        ["https://x.org/7.jpg", "", "0.7", ""],
    ], delimiter="\t")  # fmt: skip
    pq.write_table(
        pa.table({
            "URL": ["http://x.org/8.jpg", "http://x.org/1.jpg", None],
            "TEXT": ["from parquet", CAT, "null url"],
            "SAMPLE_ID": pa.array([30, 31, 32], pa.int64()),
            "HEIGHT": pa.array([64, 65, 66], pa.int64()),
        }),
        raw / "d.parquet",
    )  # fmt: skip
    (raw / "_SUCCESS").write_bytes(b"")
    (raw / ".hidden.csv").write_text("not,data\n")


def read_parts(paths: Sequence[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in paths])


def column_types(path: Path) -> list[tuple[str, pa.DataType]]:
    return [(field.name, field.type) for field in pq.read_schema(path)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("laion") / "raw"
    write_raw(folder)
    return folder


@pytest.fixture(scope="module")
def deduped(spark: SparkSession, raw: Path) -> tuple[Path, dict[str, Any]]:
    output = raw.parent / "dedup"
    return output, dedup.run(spark, str(raw), str(output), partitions=3, seed=7)


def test_stats_count_every_row(raw: Path, deduped: tuple[Path, dict[str, Any]]) -> None:
    output, stats = deduped
    names = ["a.csv", "b.csv.gz", "c.tsv", "d.parquet"]
    listing = sorted([name, (raw / name).stat().st_size] for name in names)
    on_disk = json.loads((output / "_stats.json").read_text())
    assert on_disk == stats
    assert {key: stats[key] for key in ("rows_in", "rows_invalid", "rows_out", "partitions", "seed")} == {
        "rows_in": 16, "rows_invalid": 6, "rows_out": 7, "partitions": 3, "seed": 7,
    }  # fmt: skip
    assert stats["rows_invalid_by_reason"] == {"missing_caption": 2, "missing_url": 2, "non_http_url": 2}
    assert stats["parts"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert stats["files"] == [
        {"name": "a.csv", "rows": 6, "format": "csv", "delimiter": "|"},
        {"name": "b.csv.gz", "rows": 4, "format": "csv", "delimiter": ","},
        {"name": "c.tsv", "rows": 3, "format": "csv", "delimiter": "\t"},
        {"name": "d.parquet", "rows": 3, "format": "parquet", "delimiter": None},
    ]
    assert stats["input_fingerprint"] == hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    assert stats["seconds"] > 0


def test_output_is_exactly_n_parts_with_the_reference_schema(deduped: tuple[Path, dict[str, Any]]) -> None:
    output, stats = deduped
    assert sorted(path.name for path in output.iterdir()) == ["_rejected", "_stats.json", *stats["parts"]]
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
        again = dedup.run(spark, str(raw), str(output), partitions=3, seed=7)
    assert again == stats
    assert {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in output.rglob("*") if path.is_file()} == before
    assert "Skipping dedup" in caplog.text


def test_same_input_gives_the_same_parts(
    spark: SparkSession, raw: Path, deduped: tuple[Path, dict[str, Any]]
) -> None:
    output, stats = deduped
    other = raw.parent / "dedup-again"
    dedup.run(spark, f"file://{raw}", f"file://{other}", partitions=3, seed=7)
    for name in stats["parts"]:
        assert (other / name).read_bytes() == (output / name).read_bytes()


@pytest.mark.parametrize("urls", [["http://x.org/a.jpg", "http://x.org/b.jpg"], ["ftp://x.org/a.jpg"]])
def test_empty_parts_keep_the_schema_and_stale_parts_go(spark: SparkSession, tmp_path: Path, urls: list[str]) -> None:
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    write_csv(raw / "one.csv", ["URL", "TEXT"], [[url, "a"] for url in urls])
    dedup.run(spark, str(raw), str(output), partitions=5)
    assert len(list(output.glob("part-*.parquet"))) == 5
    assert all(column_types(part) == REFERENCE_COLUMNS for part in output.glob("part-*.parquet"))
    stats = dedup.run(spark, str(raw), str(output), partitions=2)
    assert sorted(path.name for path in output.iterdir()) == ["_rejected", "_stats.json", *stats["parts"]]
    rows = read_parts([output / name for name in stats["parts"]]).num_rows
    assert rows == stats["rows_out"] == stats["rows_in"] - stats["rows_invalid"]


def test_a_file_that_is_not_csv_or_parquet_fails_naming_it(spark: SparkSession, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_csv(raw / "good.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"]])
    (raw / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(dedup.DedupInputError, match=r"cat\.png is neither CSV nor parquet"):
        dedup.run(spark, str(raw), str(tmp_path / "dedup"), partitions=2)
    assert not (tmp_path / "dedup").exists()


def test_a_csv_without_url_column_fails_naming_it_and_its_columns(spark: SparkSession, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_csv(raw / "links.csv", ["link", "caption"], [["http://x.org/a.jpg", "a"]])
    with pytest.raises(dedup.DedupInputError, match=r"links\.csv has no URL column \(columns: link, caption\)"):
        dedup.run(spark, str(raw), str(tmp_path / "dedup"), partitions=2)
    assert not (tmp_path / "dedup").exists()


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [("URL|TEXT|WIDTH", "|"), ("url,caption", ","), ("URL\tTEXT", "\t"), ("URL;TEXT", ";"),
     ('"a,b";URL;TEXT', ";"), ("URL", ",")],
)  # fmt: skip
def test_sniff_delimiter(header: str, delimiter: str) -> None:
    assert dedup.sniff_delimiter(header) == delimiter


def test_job_binds_local_masters_to_loopback() -> None:
    assert dedup_job.spark_settings("local[*]", partitions=3, cores=8, local_ip="127.0.0.1") == {
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.host": "127.0.0.1",
        "spark.sql.shuffle.partitions": "8",
        "spark.ui.enabled": "true",
    }
    assert dedup_job.spark_settings("local[2]", partitions=16, cores=2, local_ip=None)["spark.ui.enabled"] == "false"
    assert dedup_job.spark_settings("yarn", partitions=3, cores=8, local_ip=None) == {}
    args = dedup_job.parse_args(["--input", "s3://b/raw", "--output", "s3://b/dedup", "--partitions", "4"])
    assert (args.input, args.output, args.partitions, args.seed) == ("s3://b/raw", "s3://b/dedup", 4, 0)
    with pytest.raises(SystemExit):
        dedup_job.parse_args(["--input", "a", "--output", "b", "--partitions", "0"])


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
    stats = dedup.run(spark, "s3://laion/raw", "s3://laion/dedup", partitions=2)
    s3.invalidate_cache()
    assert sorted(s3.ls("laion/dedup")) == [
        "laion/dedup/_rejected", "laion/dedup/_stats.json", *(f"laion/dedup/{p}" for p in stats["parts"])
    ]
    assert s3.exists("laion/dedup/_rejected/rejected.parquet")
    assert json.loads(s3.cat_file("laion/dedup/_stats.json")) == stats
    assert (stats["rows_in"], stats["rows_invalid"], stats["rows_out"]) == (16, 6, 7)
    tables = [pq.read_table(io.BytesIO(s3.cat_file(f"laion/dedup/{name}"))) for name in stats["parts"]]
    assert sum(table.num_rows for table in tables) == 7


def test_hostile_metadata_is_counted_by_reason_and_no_good_row_is_lost(spark: SparkSession, tmp_path: Path) -> None:
    """Good rows mixed into every kind of bad file all reach the output; each bad row has a reason."""
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    good = [(f"http://good.example/{i}.jpg", f"good caption {i}") for i in range(8)]
    header = "SAMPLE_ID|URL|TEXT|HEIGHT|WIDTH|similarity\n"
    (raw / "columns.csv").write_bytes((
        header
        + f"1|{good[0][0]}|{good[0][1]}|0|39580|6016\n"          # extreme but valid numbers
        + "2|http://bad.example/a.jpg|too few\n"                  # wrong column count
        + "3|http://bad.example/b.jpg|too many|1|1|0.3|x|y\n"     # wrong column count
        + f'4|{good[1][0]}|"{good[1][1]} | with ""quotes""\nand a newline"|1|1|0.3\n'
        + "5|http://bad.example/c.jpg||1|1|0.3\n"                 # missing caption
        + "garbage|not a url|x|y|z|w\n"                           # garbage fields
    ).encode())  # fmt: skip
    (raw / "utf8.csv").write_bytes(
        header.encode() + f"6|{good[2][0]}|{good[2][1]}|1|1|0.3\n".encode() + b"7|http://bad.example/d.jpg|caf\xe9 \xff|1|1|0.3\n"
    )
    huge = "x" * 2_000_000
    (raw / "long.csv").write_text(header + f"8|{good[3][0]}|{good[3][1]}|1|1|0.3\n9|http://bad.example/e.jpg|{huge}|1|1|0.3\n")
    (raw / "empty.csv").write_bytes(b"")
    (raw / "header-only.csv").write_text(header)
    write_csv(raw / "rest.csv", ["URL", "TEXT"], [list(g) for g in good[4:]])
    stats = dedup.run(spark, str(raw), str(output), partitions=2, policy=dedup.RowPolicy(max_caption_length=1000, long_captions="reject"))
    kept = read_parts([output / name for name in stats["parts"]]).to_pylist()
    urls = {row["URL"] for row in kept}
    assert {url for url, _ in good} <= urls and not any("bad.example" in u for u in urls)
    assert stats["rows_invalid_by_reason"] == {
        "wrong_column_count": 2, "missing_caption": 1, "non_http_url": 1, "invalid_utf8": 1, "caption_too_long": 1,
    }  # fmt: skip
    assert stats["rows_in"] == len(good) + 6 and stats["rows_out"] == len(good)
    rejected = pq.read_table(output / "_rejected" / "rejected.parquet").to_pylist()
    assert sorted(r["reason"] for r in rejected) == sorted(
        ["wrong_column_count"] * 2 + ["missing_caption", "non_http_url", "invalid_utf8", "caption_too_long"]
    )
    assert all(len(r["TEXT"] or "") <= 2000 for r in rejected)
    truncating = dedup.run(spark, str(raw), str(tmp_path / "dedup2"), partitions=2, policy=dedup.RowPolicy(max_caption_length=1000))
    assert truncating["captions_truncated"] == 1 and truncating["rows_out"] == len(good) + 1


def test_bad_files_can_be_moved_aside_and_reported(spark: SparkSession, tmp_path: Path) -> None:
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    write_csv(raw / "good.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"]])
    write_csv(raw / "links.csv", ["link", "caption"], [["http://x.org/b.jpg", "b"]])
    (raw / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    stats = dedup.run(spark, str(raw), str(output), partitions=1, policy=dedup.RowPolicy(bad_files="skip"))
    assert stats["rows_out"] == 1
    assert sorted(f["name"] for f in stats["files_rejected"]) == ["cat.png", "links.csv"]
    assert "link, caption" in next(f["error"] for f in stats["files_rejected"] if f["name"] == "links.csv")
    assert sorted(p.name for p in (raw / "_rejected").iterdir()) == ["cat.png", "links.csv"]
    again = dedup.run(spark, str(raw), str(output), partitions=1, policy=dedup.RowPolicy(bad_files="skip"))
    assert again == stats
