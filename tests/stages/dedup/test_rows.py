"""stages.dedup.rows: column alignment and the row rules, through real runs on Spark."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dedup_builders import read_parts, settings, write_csv
from pyspark.sql import SparkSession

from stages import dedup
from stages.dedup.inputs import DedupInputError


def test_a_csv_without_url_column_fails_naming_it_and_its_columns(spark: SparkSession, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_csv(raw / "links.csv", ["link", "caption"], [["http://x.org/a.jpg", "a"]])
    with pytest.raises(DedupInputError, match=r"links\.csv has no URL column \(columns: link, caption\)"):
        dedup.run(spark, str(raw), str(tmp_path / "dedup"), settings(2))
    assert not (tmp_path / "dedup").exists()


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
    stats = dedup.run(spark, str(raw), str(output), settings(2, max_caption_length=1000, long_captions="reject"))
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
    truncating = dedup.run(spark, str(raw), str(tmp_path / "dedup2"), settings(2, max_caption_length=1000))
    assert truncating["captions_truncated"] == 1 and truncating["rows_out"] == len(good) + 1
