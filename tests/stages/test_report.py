"""The report: assembled from a run's markers and shards, rendered, written once per set of
artifacts; a run whose later stages did not finish is reported as far as it got."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.errors import NothingToDo
from stages.layout import RunLayout
from stages.report import build_report, downloads_line, render_html, summarize_stages, write_report
from shard_files import mark_embedded

INDEXED = {"index_key": "Flat", "ntotal": 7, "size_bytes": 100, "recall_at_10": 1.0, "build_seconds": 0.1}


@pytest.fixture
def run(tmp_path: Path) -> RunLayout:
    """A finished run: dedup, two shards (one of a part no longer current), embeddings, indexes."""
    layout = RunLayout(str(tmp_path / "run"))
    layout.dedup_marker.mark_done(
        {"input_fingerprint": "d", "partitions": 1, "seed": 0},
        {"parts": ["part-00000.parquet"], "rows_in": 12, "rows_invalid": 2, "rows_out": 10},
    )
    for part, shard, stats in (
        ("part-00000", "0000000000", {"count": 10, "successes": 7, "failed_to_download": 3, "status_dict": {"success": 7, "HTTP Error 404": 3}}),
        ("part-00009", "0000900000", {"count": 99, "successes": 99}),
    ):
        folder = Path(layout.part_images(part))
        folder.mkdir(parents=True)
        (folder / f"{shard}_stats.json").write_text(json.dumps(stats))
        (folder / f"{shard}.tar").write_bytes(b"t" * 1024)
    mark_embedded(layout, 7)
    layout.index_marker.mark_done({"input_fingerprint": "i"}, {"image": INDEXED, "text": INDEXED})
    return layout


def test_the_report_counts_the_current_artifacts(run: RunLayout) -> None:
    report = build_report(run, {"dedup": [{"started_at": 1.0, "ended_at": 3.0}]}, {"run_id": "r1"})
    assert [(f["step"], f["count"]) for f in report["funnel"]] == [
        ("raw rows", 12), ("valid", 10), ("unique", 10), ("downloaded", 7), ("embedded", 7), ("indexed", 7),
    ]  # fmt: skip
    assert report["download"]["success_rate"] == 0.7 and report["download"]["errors"] == {"HTTP Error 404": 3}
    assert [s["shard"] for s in report["download"]["shards"]] == ["part-00000/0000000000"]
    assert report["stages"] == [{"name": "dedup", "state": "success", "duration_s": 2.0, "tasks": 1}]
    assert report["embeddings"]["clip_model"] == "m" and report["index"]["text"] == {
        **INDEXED, "action": None, "added": None, "retrain_reason": None, "index_param": None, "rerank_k": None, "recall_at_10_without_rerank": None,
    }  # fmt: skip
    assert report["complete"] is True and report["reason"] is None
    assert report["download"]["summary"] == "7 of 10 downloaded: HTTP Error 404 3"


def test_a_run_that_stopped_after_its_downloads_is_reported_as_far_as_it_got(run: RunLayout) -> None:
    """clip_embeddings failed in this run: the embeddings and indexes on storage are an earlier run's."""
    outcomes = {
        "dedup": {"state": "success", "reason": None},
        "download_images": {"state": "success", "reason": None},
        "clip_embeddings": {"state": "failed", "reason": "OSError: CUDA out of memory"},
        "build_index": {"state": "upstream_failed", "reason": None},
    }
    report = build_report(run, {"download_images": [{"started_at": 1.0, "ended_at": 4.0}]}, {"run_id": "r2"}, outcomes)
    assert report["complete"] is False and report["reason"] == "clip_embeddings failed: OSError: CUDA out of memory"
    assert report["stages"] == [
        {"name": "dedup", "state": "success", "duration_s": None, "tasks": 0},
        {"name": "download_images", "state": "success", "duration_s": 3.0, "tasks": 1},
        {"name": "clip_embeddings", "state": "failed", "duration_s": None, "tasks": 0, "reason": "OSError: CUDA out of memory"},
        {"name": "build_index", "state": "upstream_failed", "duration_s": None, "tasks": 0},
    ]
    assert [(f["step"], f["count"]) for f in report["funnel"]] == [("raw rows", 12), ("valid", 10), ("unique", 10), ("downloaded", 7)]
    assert report["download"]["successes"] == 7 and report["index"] == {}
    assert report["embeddings"] == {"count": None, "dim": None, "device": None, "clip_model": None, "samples_per_second": None}
    page = render_html(report)
    assert "The run did not finish: clip_embeddings failed: OSError: CUDA out of memory" in page
    assert "none: clip_embeddings did not finish" in page and "upstream_failed" in page

    # The same artifacts, now with every stage finished: another report, not the partial one kept.
    write_report(run, report)
    finished = {stage: {"state": "success", "reason": None} for stage in outcomes}
    assert "skipped" not in write_report(run, build_report(run, {}, {"run_id": "r3"}, finished))


def test_no_report_before_dedup_finished(run: RunLayout) -> None:
    outcomes = {"fetch_metadata": {"state": "failed", "reason": "FileNotFoundError: metadata source 'x' matches no file"},
                "dedup": {"state": "upstream_failed", "reason": None}}  # fmt: skip
    with pytest.raises(NothingToDo, match=r"no report for .*/run: fetch_metadata failed: FileNotFoundError: metadata source 'x'"):
        build_report(run, {}, {}, outcomes)


@pytest.mark.parametrize(
    ("errors", "line"),
    [
        ({}, "3 of 3 downloaded"),
        ({"refused_private_address": 3}, "3 of 3 downloaded: refused_private_address 3"),
        (
            {f"reason_{i}": i for i in range(1, 8)},
            "3 of 3 downloaded: reason_7 7, reason_6 6, reason_5 5, reason_4 4, reason_3 3 and 2 more reasons",
        ),
    ],
)
def test_downloads_in_one_line(errors: dict[str, int], line: str) -> None:
    assert downloads_line({"successes": 3, "count": 3, "errors": errors}) == line


def test_a_report_of_the_same_artifacts_is_written_once(run: RunLayout) -> None:
    first = write_report(run, build_report(run, {}, {"run_id": "r1"}))
    assert json.loads(Path(first["report_json"]).read_text())["run"]["run_id"] == "r1"
    assert "laion_pipeline run r1" in Path(first["report_html"]).read_text()
    again = write_report(run, build_report(run, {}, {"run_id": "r2"}))
    assert again["skipped"] is True and json.loads(Path(first["report_json"]).read_text())["run"]["run_id"] == "r1"
    run.index_marker.mark_done({"input_fingerprint": "i2"}, {"image": INDEXED, "text": INDEXED})
    assert "skipped" not in write_report(run, build_report(run, {}, {"run_id": "r3"}))


def test_a_report_needs_every_stage_finished(run: RunLayout) -> None:
    run.index_marker.clear()
    with pytest.raises(FileNotFoundError, match=r"index/_SUCCESS.json does not exist: build_index has not finished"):
        build_report(run, {}, {})


def test_mapped_stage_duration_is_its_span_not_the_sum() -> None:
    numbers = {
        "dedup": [{"started_at": 100.0, "ended_at": 110.0}],
        "download_images": [{"started_at": 110.0, "ended_at": 130.0}, {"started_at": 112.0, "ended_at": 125.0}],
    }
    assert summarize_stages(numbers) == [
        {"name": "dedup", "state": "success", "duration_s": 10.0, "tasks": 1},
        {"name": "download_images", "state": "success", "duration_s": 20.0, "tasks": 2},
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
