"""stages.dedup.outputs: exactly N parts with the schema, none for a batch of nothing, and
outputs made before batches started over."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dedup_builders import REFERENCE_COLUMNS, column_types, read_parts, settings, write_csv
from pyspark.sql import SparkSession

from stages import dedup
from stages.dedup.outputs import current_output
from stages.layout import RunLayout


def test_parts_keep_the_schema_even_when_empty(spark: SparkSession, tmp_path: Path) -> None:
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    write_csv(raw / "one.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"], ["http://x.org/b.jpg", "b"]])
    stats = dedup.run(spark, str(raw), str(output), settings(5))
    assert stats["parts"] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert all(column_types(output / part) == REFERENCE_COLUMNS for part in stats["parts"])
    assert read_parts([output / name for name in stats["parts"]]).num_rows == stats["rows_out"] == 2


def test_a_batch_without_valid_rows_adds_no_part(spark: SparkSession, tmp_path: Path) -> None:
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    write_csv(raw / "one.csv", ["URL", "TEXT"], [["ftp://x.org/a.jpg", "a"]])
    stats = dedup.run(spark, str(raw), str(output), settings(5))
    assert (stats["parts"], stats["rows_in"], stats["rows_invalid"], stats["next_part"]) == ([], 1, 1, 0)
    assert not list(output.glob("part-*.parquet"))


def test_an_output_made_before_batches_is_started_over(spark: SparkSession, tmp_path: Path) -> None:
    """An output whose marker records no batches is made again from every raw file, and
    parts it had beyond the new ones go."""
    layout = RunLayout(str(tmp_path))
    Path(layout.raw).mkdir()
    write_csv(Path(layout.raw) / "a.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"]])
    listing = [["a.csv", (Path(layout.raw) / "a.csv").stat().st_size]]
    recorded = {  # as the stage wrote it before batches
        "rows_in": 1, "rows_out": 1, "parts": [f"part-{i:05d}.parquet" for i in range(4)], "seconds": 1.5,
        "input_fingerprint": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
        "partitions": 4, "seed": 0, "policy": {"max_caption_length": 4096, "long_captions": "truncate", "bad_files": "fail"},
    }  # fmt: skip
    Path(layout.dedup).mkdir()
    for part in recorded["parts"]:
        (Path(layout.dedup) / part).write_bytes(b"old")
    Path(layout.dedup_marker.url).write_text(json.dumps(recorded))
    assert current_output(layout.raw, layout.dedup_marker) is None
    stats = dedup.run(spark, layout.raw, layout.dedup, settings(2))
    assert [b["batch"] for b in stats["batches"]] == [0]
    assert sorted(p.name for p in Path(layout.dedup).glob("part-*.parquet")) == stats["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert current_output(layout.raw, layout.dedup_marker) == stats
