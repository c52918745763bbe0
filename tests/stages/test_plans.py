"""Shard planning, partition planning and report assembly, without Airflow or the tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.download import DownloadSettings, SHARDS_PER_PART, img2dataset_arguments, part_index, summarize_shards
from stages.embeddings import extend_plan, plan_partitions
from stages.report import render_html, stage_durations


def test_part_index_and_shard_ranges_do_not_overlap() -> None:
    assert part_index("/x/dedup/part-00000.parquet") == 0
    assert part_index("s3://b/dedup/part-00042.parquet") == 42
    with pytest.raises(ValueError, match="notapart"):
        part_index("/x/notapart.parquet")
    assert SHARDS_PER_PART * 1 > 10**9 // 10**5  # a part holds up to 1e9 samples at 10k per shard


def test_img2dataset_arguments_follow_laion_400m() -> None:
    args = img2dataset_arguments("/r/dedup/part-00001.parquet", "/r/images/part-00001", DownloadSettings())
    assert args["image_size"] == 256 and args["resize_mode"] == "border"
    assert (args["url_col"], args["caption_col"]) == ("URL", "TEXT")
    assert {"NSFW", "similarity", "LICENSE"} <= set(args["save_additional_columns"])
    assert args["output_format"] == "webdataset" and args["input_format"] == "parquet"
    assert args["incremental_mode"] == "incremental" and args["enable_wandb"] is False


def test_summarize_shards_adds_up_stats(tmp_path: Path) -> None:
    for part, shard, stats in [
        ("part-00000", "0000000000", {"count": 10, "successes": 8, "failed_to_download": 1, "failed_to_resize": 1,
                                      "status_dict": {"success": 8, "HTTP Error 404": 1, "Image decoding failed": 1}}),
        ("part-00001", "0000100000", {"count": 5, "successes": 5, "failed_to_download": 0, "failed_to_resize": 0,
                                      "status_dict": {"success": 5}}),
    ]:
        folder = tmp_path / part
        folder.mkdir()
        (folder / f"{shard}_stats.json").write_text(json.dumps(stats))
        (folder / f"{shard}.tar").write_bytes(b"x" * 1024)
    totals = summarize_shards(str(tmp_path))
    assert (totals["count"], totals["successes"], totals["failed_to_download"], totals["failed_to_resize"]) == (15, 13, 1, 1)
    assert totals["errors"] == {"HTTP Error 404": 1, "Image decoding failed": 1}
    assert totals["bytes"] == 2048 and len(totals["shards"]) == 2


@pytest.mark.parametrize(
    "shards,workers,samples,expected",
    [(1, 4, 10, (1, 1)), (3, 2, 30_000, (1, 2)), (8, 2, 80_000, (4, 2)), (9, 4, 90_000, (2, 4)), (8, 2, 400, (1, 2))],
)
def test_every_partition_gets_a_tar_per_worker(shards: int, workers: int, samples: int, expected: tuple[int, int]) -> None:
    partitions, used = plan_partitions(shards, workers, samples, samples_per_partition=10_000)
    assert (partitions, used) == expected
    assert all(len(range(i, shards, partitions)) >= used for i in range(partitions))


def test_mapped_stage_duration_is_its_span_not_the_sum() -> None:
    numbers = {
        "dedup": [{"started_at": 100.0, "ended_at": 110.0}],
        "download_images": [{"started_at": 110.0, "ended_at": 130.0}, {"started_at": 112.0, "ended_at": 125.0}],
    }
    assert stage_durations(numbers) == [
        {"name": "dedup", "duration_s": 10.0, "tasks": 1},
        {"name": "download_images", "duration_s": 20.0, "tasks": 2},
    ]


def test_report_html_escapes_what_it_shows() -> None:
    report = {
        "run": {"run_id": "<script>"},
        "stages": [{"name": "dedup", "duration_s": 1.0}],
        "funnel": [{"step": "raw rows", "count": 3}],
        "dedup": {"rows_invalid_by_reason": {"<i>": 2}},
        "download": {"errors": {"<b>bad</b>": 1}, "shards": [], "success_rate": 0.5, "bytes": 0},
        "embeddings": {"count": 1, "dim": 2, "clip_model": "m", "device": "cpu"},
        "index": {},
    }
    page = render_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;bad&lt;/b&gt;" in page and "&lt;i&gt;" in page


def test_an_embedding_plan_grows_with_new_shards_and_keeps_its_partitions(tmp_path: Path) -> None:
    def tars(*names: str) -> list[str]:
        for name in names:
            if not (tmp_path / name).exists():
                (tmp_path / name).write_bytes(b"t" * 100)
        return [str(tmp_path / n) for n in names]

    first, kept = extend_plan(None, tars("a.tar", "b.tar", "c.tar", "d.tar"), "m", samples=40, samples_per_partition=20, workers=2)
    assert not kept and [len(p["tars"]) for p in first["partitions"]] == [2, 2]
    grown, kept = extend_plan(first, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "m", samples=45, samples_per_partition=20, workers=2)
    assert kept and grown["partitions"][:2] == first["partitions"]
    assert grown["partitions"][2]["tars"] == tars("r.tar")
    assert extend_plan(grown, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "m", samples=45, samples_per_partition=20, workers=2) == (grown, True)

    _, kept = extend_plan(grown, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "other-model", samples=45, samples_per_partition=20, workers=2)
    assert not kept
    (tmp_path / "b.tar").write_bytes(b"changed")
    redone, kept = extend_plan(grown, tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar"), "m", samples=45, samples_per_partition=20, workers=2)
    assert not kept and sorted(t for p in redone["partitions"] for t in p["tars"]) == tars("a.tar", "b.tar", "c.tar", "d.tar", "r.tar")
