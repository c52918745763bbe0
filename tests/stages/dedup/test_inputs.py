"""stages.dedup.inputs: telling file kinds apart, and bad files failing or set aside (through a real run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dedup_builders import settings, write_csv
from pyspark.sql import SparkSession

from stages import dedup
from stages.dedup.inputs import DedupInputError, sniff_delimiter


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [("URL|TEXT|WIDTH", "|"), ("url,caption", ","), ("URL\tTEXT", "\t"), ("URL;TEXT", ";"),
     ('"a,b";URL;TEXT', ";"), ("URL", ",")],
)  # fmt: skip
def test_sniff_delimiter(header: str, delimiter: str) -> None:
    assert sniff_delimiter(header) == delimiter


def test_a_file_that_is_not_csv_or_parquet_fails_naming_it(spark: SparkSession, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    write_csv(raw / "good.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"]])
    (raw / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DedupInputError, match=r"cat\.png is neither CSV nor parquet"):
        dedup.run(spark, str(raw), str(tmp_path / "dedup"), settings(2))
    assert not (tmp_path / "dedup").exists()


def test_bad_files_can_be_moved_aside_and_reported(spark: SparkSession, tmp_path: Path) -> None:
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    write_csv(raw / "good.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"]])
    write_csv(raw / "links.csv", ["link", "caption"], [["http://x.org/b.jpg", "b"]])
    (raw / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    stats = dedup.run(spark, str(raw), str(output), settings(1, bad_files="skip"))
    assert stats["rows_out"] == 1
    assert sorted(f["name"] for f in stats["files_rejected"]) == ["cat.png", "links.csv"]
    assert "link, caption" in next(f["error"] for f in stats["files_rejected"] if f["name"] == "links.csv")
    assert sorted(p.name for p in (raw / "_rejected").iterdir()) == ["cat.png", "links.csv"]
    again = dedup.run(spark, str(raw), str(output), settings(1, bad_files="skip"))
    assert again == stats
