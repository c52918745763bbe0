"""RunLayout and Marker on a local folder and on a real S3 server (moto, on loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from moto_s3 import moto_bucket

from stages import storage
from stages.layout import Marker, RunLayout, shard_location


def make_run(root: str) -> RunLayout:
    """Two current parts with finished and unfinished shards, and a folder of an old part."""
    layout = RunLayout(root)
    batches = [{"batch": 0, "version": "v0", "parts": ["part-00000.parquet"]}, {"batch": 3, "version": "v3", "parts": ["part-00001.parquet"]}]
    layout.dedup_marker.mark_done({}, {"parts": ["part-00000.parquet", "part-00001.parquet"], "batches": batches})
    files = {
        "images/part-00000/0000000000.tar": "t", "images/part-00000/0000000000_stats.json": "{}",
        "images/part-00000/0000000001.tar": "t",  # no stats yet: unfinished
        "images/part-00001/0000100000_stats.json": "{}",  # stats without a tar: not a shard
        "images/part-00001/0000100001.tar": "t", "images/part-00001/0000100001_stats.json": "{}",
        "images/part-00007/0000700000.tar": "t", "images/part-00007/0000700000_stats.json": "{}",  # not current
        "index/offsets/part-00001/0000100001.parquet": "o",
    }  # fmt: skip
    for name, text in files.items():
        storage.write_text(layout.path(name), text)
    return layout


def check_run(layout: RunLayout, root: str) -> None:
    assert layout.current_parts() == ["part-00000", "part-00001"]
    assert (layout.part_version("part-00000"), layout.part_version("part-00001")) == ("v0", "v3")
    with pytest.raises(ValueError, match="part-00007 is not a part of the dataset"):
        layout.part_version("part-00007")
    assert (layout.batch_parts(), layout.batch_parts(0)) == (["part-00001"], ["part-00000"])
    assert layout.pending_parts() == ["part-00000", "part-00001"]
    layout.download_marker("part-00001", "v3").mark_done({"dedup_version": "v3"}, {})
    assert layout.pending_parts() == ["part-00000"]
    layout.download_marker("part-00001", "v3").clear()
    assert layout.current_shards() == [
        storage.join(root, "images", "part-00000", "0000000000.tar"),
        storage.join(root, "images", "part-00001", "0000100001.tar"),
    ]
    assert layout.current_shards(["part-00007"]) == [storage.join(root, "images", "part-00007", "0000700000.tar")]
    assert layout.offsets_tables() == [layout.offsets_table("part-00001", "0000100001")]
    assert [shard_location(t) for t in layout.current_shards()] == [("part-00000", "0000000000"), ("part-00001", "0000100001")]
    assert layout.part("part-00001") == storage.join(root, "dedup", "part-00001.parquet")
    assert not layout.has_index()


def test_layout_of_a_local_run(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    check_run(make_run(root), root)


def test_layout_of_a_run_on_s3(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/runs/a"
    check_run(make_run(root), root)


def test_a_run_without_dedup_says_which_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dedup/_stats.json does not exist: dedup has not finished"):
        RunLayout(str(tmp_path)).current_parts()


def test_a_marker_is_done_only_for_the_inputs_it_records(tmp_path: Path) -> None:
    marker = Marker(str(tmp_path / "embeddings" / "_SUCCESS.json"))
    assert marker.read() is None and marker.done_with({"input_fingerprint": "a"}) is None
    written = marker.mark_done({"input_fingerprint": "a", "clip_model": "m"}, {"count": 3})
    assert json.loads((tmp_path / "embeddings" / "_SUCCESS.json").read_text()) == written == {"input_fingerprint": "a", "clip_model": "m", "count": 3}
    assert marker.done_with({"input_fingerprint": "a", "clip_model": "m"}) == written
    assert marker.done_with({"input_fingerprint": "a", "clip_model": "other"}) is None
    assert marker.done_with({"input_fingerprint": "b"}) is None
    marker.clear()
    assert marker.read() is None
    marker.clear()  # clearing an absent marker is not an error


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with moto_bucket(monkeypatch, "layout-test") as bucket:
        yield bucket
