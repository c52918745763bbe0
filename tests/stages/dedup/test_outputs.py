"""stages.dedup.outputs: exactly N parts with the schema, stale parts removed, and the marker
that makes a rerun over the same input and settings a no-op."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from dedup_builders import REFERENCE_COLUMNS, column_types, read_parts, settings, write_csv
from pyspark.sql import SparkSession

from stages import dedup
from stages.dedup.outputs import current_output
from stages.dedup.settings import DedupSettings
from stages.layout import DEDUP_MARKER, RunLayout


@pytest.mark.parametrize("urls", [["http://x.org/a.jpg", "http://x.org/b.jpg"], ["ftp://x.org/a.jpg"]])
def test_empty_parts_keep_the_schema_and_stale_parts_go(spark: SparkSession, tmp_path: Path, urls: list[str]) -> None:
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    raw.mkdir()
    write_csv(raw / "one.csv", ["URL", "TEXT"], [[url, "a"] for url in urls])
    dedup.run(spark, str(raw), str(output), settings(5))
    assert len(list(output.glob("part-*.parquet"))) == 5
    assert all(column_types(part) == REFERENCE_COLUMNS for part in output.glob("part-*.parquet"))
    stats = dedup.run(spark, str(raw), str(output), settings(2))
    assert sorted(path.name for path in output.iterdir()) == ["_rejected", DEDUP_MARKER, *stats["parts"]]
    rows = read_parts([output / name for name in stats["parts"]]).num_rows
    assert rows == stats["rows_out"] == stats["rows_in"] - stats["rows_invalid"]


def test_a_marker_of_earlier_runs_is_current_for_the_same_input_and_settings(tmp_path: Path) -> None:
    """Outputs made before DedupSettings existed record the same inputs, so they stay current."""
    layout = RunLayout(str(tmp_path))
    Path(layout.raw).mkdir()
    write_csv(Path(layout.raw) / "a.csv", ["URL", "TEXT"], [["http://x.org/a.jpg", "a"]])
    listing = [["a.csv", (Path(layout.raw) / "a.csv").stat().st_size]]
    recorded = {  # as the stage wrote it before, defaults and all
        "rows_in": 1, "rows_out": 1, "parts": ["part-00000.parquet"], "seconds": 1.5,
        "input_fingerprint": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
        "partitions": 4, "seed": 0, "policy": {"max_caption_length": 4096, "long_captions": "truncate", "bad_files": "fail"},
    }  # fmt: skip
    Path(layout.dedup).mkdir()
    Path(layout.dedup_marker.url).write_text(json.dumps(recorded))
    assert current_output(layout.raw, layout.dedup_marker, DedupSettings(), seed=0) == recorded
    assert current_output(layout.raw, layout.dedup_marker, settings(5), seed=0) is None
    assert current_output(layout.raw, layout.dedup_marker, settings(4, long_captions="reject"), seed=0) is None
    assert current_output(layout.raw, layout.dedup_marker, DedupSettings(), seed=1) is None
