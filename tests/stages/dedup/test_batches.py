"""A dataset that grows by batches, on real Spark: each run deduplicates only the raw files
no earlier run read, against every earlier pair, and writes new parts only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from dedup_builders import read_parts, settings, write_csv
from pyspark.sql import SparkSession
from shard_files import snapshot

from stages import dedup
from stages.dedup.batches import without_batch
from stages.dedup.inputs import DedupInputError
from stages.dedup.settings import DedupSettings
from stages.layout import DEDUP_MARKER

HEADER = ["URL", "TEXT", "SAMPLE_ID"]
FIRST = {
    "a.csv": [[f"http://x.org/{i}.jpg", f"photo {i}", i] for i in range(12)],
    "b.csv": [[f"http://x.org/{i}.jpg", f"photo {i}", 100 + i] for i in range(8, 16)]  # 8..11 repeat a.csv
    + [["ftp://x.org/bad.jpg", "not http", 99]],
}
# The second batch: 6 pairs of the first batch, 5 new ones, one of them twice, and a new caption of an old URL.
SECOND = {
    "c.csv": [[f"http://x.org/{i}.jpg", f"photo {i}", 200 + i] for i in range(10, 21)]
    + [["http://x.org/20.jpg", "photo 20", 300], ["http://x.org/1.jpg", "another caption", 301]],
}


def write_batch(raw: Path, files: dict[str, list[list[Any]]]) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_csv(raw / name, HEADER, rows)


def pairs(output: Path, stats: dict[str, Any]) -> list[tuple[str, str]]:
    table = read_parts([output / part for part in stats["parts"]])
    return sorted(zip(table.column("URL").to_pylist(), table.column("TEXT").to_pylist()))


@pytest.fixture
def grown(spark: SparkSession, tmp_path: Path) -> dict[str, Any]:
    """Batch one (a.csv, b.csv), then batch two (c.csv) into the same output."""
    raw, output = tmp_path / "raw", tmp_path / "dedup"
    write_batch(raw, FIRST)
    first = dedup.run(spark, str(raw), str(output), settings(2))
    parts_before = {p: snapshot(output)[p] for p in first["parts"]}
    write_batch(raw, SECOND)
    second = dedup.run(spark, str(raw), str(output), settings(3))
    return {"raw": raw, "output": output, "first": first, "second": second, "parts_before": parts_before}


def test_a_second_batch_adds_only_its_new_pairs_as_new_parts(grown: dict[str, Any]) -> None:
    output, first, second = grown["output"], grown["first"], grown["second"]
    assert first["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert second["parts"] == [*first["parts"], "part-00002.parquet", "part-00003.parquet", "part-00004.parquet"]
    # Earlier parts are never rewritten: same bytes, same modification time.
    assert {p: snapshot(output)[p] for p in first["parts"]} == grown["parts_before"]

    batch = second["batches"][-1]
    assert {k: batch[k] for k in ("batch", "files", "rows_in", "rows_invalid", "duplicates_of_earlier_batches", "rows_out")} == {
        "batch": 1, "files": ["c.csv"], "rows_in": 13, "rows_invalid": 0, "duplicates_of_earlier_batches": 6, "rows_out": 6,
    }  # fmt: skip
    new = read_parts([output / p for p in batch["parts"]])
    assert sorted(zip(new.column("URL").to_pylist(), new.column("TEXT").to_pylist())) == sorted(
        [(f"http://x.org/{i}.jpg", f"photo {i}") for i in range(16, 21)] + [("http://x.org/1.jpg", "another caption")]
    )
    assert {k: second[k] for k in ("rows_in", "rows_invalid", "duplicates_of_earlier_batches", "rows_out")} == {
        "rows_in": 34, "rows_invalid": 1, "duplicates_of_earlier_batches": 6, "rows_out": 22,
    }  # fmt: skip
    assert json.loads((output / DEDUP_MARKER).read_text()) == second


def test_the_grown_dataset_equals_one_run_over_every_batch(spark: SparkSession, grown: dict[str, Any], tmp_path: Path) -> None:
    once = tmp_path / "once"
    stats = dedup.run(spark, str(grown["raw"]), str(once), settings(3))
    assert pairs(grown["output"], grown["second"]) == pairs(once, stats)
    assert len(set(pairs(once, stats))) == len(pairs(once, stats)) == grown["second"]["rows_out"] == stats["rows_out"]


def test_a_rerun_without_new_raw_files_changes_nothing(spark: SparkSession, grown: dict[str, Any]) -> None:
    before = snapshot(grown["output"])
    os.utime(grown["raw"] / "a.csv")  # touched, not changed: still the same batch
    assert dedup.run(spark, str(grown["raw"]), str(grown["output"]), settings(5)) == grown["second"]
    assert snapshot(grown["output"]) == before


def test_a_changed_raw_file_is_an_error_naming_it_unless_asked_to_take_it_as_a_batch(
    spark: SparkSession, grown: dict[str, Any]
) -> None:
    raw, output = grown["raw"], grown["output"]
    before = snapshot(output)
    write_csv(raw / "b.csv", HEADER, [["http://x.org/99.jpg", "photo 99", 99], ["http://x.org/9.jpg", "photo 9", 9]])
    with pytest.raises(DedupInputError, match=r"raw file .*/raw/b.csv changed since batch 0"):
        dedup.run(spark, str(raw), str(output), settings(2))
    assert snapshot(output) == before
    stats = dedup.run(spark, str(raw), str(output), DedupSettings(dedup_partitions=1, changed_raw_files="new_batch"))
    batch = stats["batches"][-1]
    assert (batch["files"], batch["rows_out"], batch["duplicates_of_earlier_batches"]) == (["b.csv"], 1, 1)
    assert stats["rows_out"] == grown["second"]["rows_out"] + 1


def test_a_batch_written_but_not_recorded_is_written_again_under_the_same_names(
    spark: SparkSession, grown: dict[str, Any], tmp_path: Path
) -> None:
    """A run killed after its parts were published and before its marker: the rerun writes
    the same parts again, and no pair is in the dataset twice."""
    output = grown["output"]
    published = snapshot(output)
    (output / DEDUP_MARKER).write_text(json.dumps(grown["first"]))  # the marker as before batch two
    again = dedup.run(spark, str(grown["raw"]), str(output), settings(3))
    assert again["parts"] == grown["second"]["parts"]
    for part in again["parts"]:
        assert (output / part).read_bytes() == published[part][0]
    assert len(set(pairs(output, again))) == len(pairs(output, again)) == again["rows_out"]


def test_the_raw_files_of_a_removed_batch_are_left_out(spark: SparkSession, grown: dict[str, Any]) -> None:
    output = grown["output"]
    removed = without_batch(grown["second"], 1)
    (output / DEDUP_MARKER).write_text(json.dumps(removed))
    assert (removed["rows_out"], removed["parts"], removed["removed_files"][0]["name"]) == (16, grown["first"]["parts"], "c.csv")
    assert dedup.run(spark, str(grown["raw"]), str(output), settings(3)) == removed
    shutil.copy(grown["raw"] / "c.csv", grown["raw"] / "c-again.csv")  # the same rows under a new name: a new batch
    stats = dedup.run(spark, str(grown["raw"]), str(output), settings(3))
    assert (stats["batches"][-1]["batch"], stats["batches"][-1]["rows_out"]) == (2, 6)
    assert stats["batches"][-1]["parts"][0] == "part-00005.parquet"  # part numbers are never reused
