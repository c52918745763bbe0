"""ReportOperator: every stage's XCom numbers, single or mapped, and how each stage ended
into the run's report; a run that did not finish gets its report too, and fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.base import FAILURE_KEY
from operators.report import ReportOperator, stage_outcomes
from stages.layout import RunLayout
from shard_files import mark_embedded

REPO = Path(__file__).resolve().parents[2]
INDEXED = {"index_key": "Flat", "ntotal": 3, "size_bytes": 45, "recall_at_10": 1.0, "build_seconds": 0.1}
REFUSED = "nothing to embed: 0 of 4 downloaded: refused_private_address 4"


class DagRunSeen:
    """Stands in for the report task's instance (a real one needs a scheduled DAG run):
    each task's XComs and the run's task states, as Airflow hands them to the task.
    tests/pipeline/test_failed_run.py reads the real ones."""

    dag_id, run_id = "laion_pipeline", "manual__1"

    def __init__(self, xcoms: dict[tuple[str, str], Any], states: dict[str, str]) -> None:
        self.xcoms, self.states = xcoms, states

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.xcoms.get((task_ids, key))

    def get_task_states(self, dag_id: str, run_ids: list[str], task_ids: list[str]) -> dict[str, dict[str, str]]:
        assert (dag_id, run_ids) == (self.dag_id, [self.run_id])
        return {self.run_id: {k: v for k, v in self.states.items() if k.rstrip("_0123456789") in task_ids}}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[("report", key)] = value


def shards(layout: RunLayout, stats: dict[str, Any]) -> None:
    layout.dedup_marker.mark_done(
        {"input_fingerprint": "d", "partitions": 2},
        {"parts": ["part-00000.parquet", "part-00001.parquet"], "rows_in": 5, "rows_invalid": 1, "rows_out": 4},
    )
    for index, part in enumerate(("part-00000", "part-00001")):
        folder = Path(layout.part_images(part))
        folder.mkdir(parents=True)
        (folder / f"000000000{index}_stats.json").write_text(json.dumps(stats))
        (folder / f"000000000{index}.tar").write_bytes(b"")


def report_of(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "report" / "report.json").read_text())


def test_reports_single_and_mapped_tasks(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    shards(layout, {"count": 2, "successes": 2, "status_dict": {"success": 2}})
    mark_embedded(layout, 4)
    layout.index_marker.mark_done({"input_fingerprint": "i"}, {"image": INDEXED, "text": INDEXED})
    ti = DagRunSeen(
        {
            ("dedup", "return_value"): {"started_at": 10.0, "ended_at": 12.0},
            ("download_images", "return_value"): [{"started_at": 12.0, "ended_at": 20.0}, {"started_at": 13.0, "ended_at": 15.0}, None],
        },
        {"dedup": "success", "download_images_0": "success", "download_images_1": "success", "report": "running"},
    )

    paths = ReportOperator(task_id="report", output_root=str(tmp_path)).execute(context={"ti": ti})
    report = report_of(tmp_path)
    assert paths["report_json"] == str(tmp_path / "report" / "report.json") and Path(paths["report_html"]).exists()
    assert report["run"] == {"dag_id": "laion_pipeline", "run_id": "manual__1", "output_root": str(tmp_path)}
    assert report["complete"] is True and report["reason"] is None
    assert report["stages"] == [
        {"name": "dedup", "state": "success", "duration_s": 2.0, "tasks": 1},
        {"name": "download_images", "state": "success", "duration_s": 8.0, "tasks": 2},
    ]


def test_a_run_whose_downloads_all_failed_gets_its_report_and_fails(tmp_path: Path) -> None:
    """Earlier embeddings and indexes on the same output root are not this run's: not reported."""
    layout = RunLayout(str(tmp_path))
    shards(layout, {"count": 2, "successes": 0, "failed_to_download": 2, "status_dict": {"refused_private_address": 2}})
    layout.embeddings_marker.mark_done({"input_fingerprint": "old", "clip_model": "m"}, {"count": 9, "dim": 512})
    layout.index_marker.mark_done({"input_fingerprint": "old"}, {"image": INDEXED, "text": INDEXED})
    ti = DagRunSeen(
        {
            ("download_images", "return_value"): [{"started_at": 1.0, "ended_at": 2.0}, {"started_at": 1.0, "ended_at": 3.0}],
            ("clip_embeddings", FAILURE_KEY): {"reason": REFUSED},
        },
        {
            "fetch_metadata": "success", "dedup": "success", "download_images_0": "success", "download_images_1": "success",
            "clip_embeddings": "failed", "build_index": "upstream_failed",
        },
    )  # fmt: skip

    with pytest.raises(AirflowFailException, match=rf"the run did not finish: clip_embeddings failed: {REFUSED}; its report: .*report.html"):
        ReportOperator(task_id="report", output_root=str(tmp_path)).execute(context={"ti": ti})
    report = report_of(tmp_path)
    assert report["complete"] is False and report["reason"] == f"clip_embeddings failed: {REFUSED}"
    assert [(s["name"], s["state"], s.get("reason")) for s in report["stages"]] == [
        ("fetch_metadata", "success", None),
        ("dedup", "success", None),
        ("download_images", "success", None),
        ("clip_embeddings", "failed", REFUSED),
        ("build_index", "upstream_failed", None),
    ]
    assert report["download"]["summary"] == "0 of 4 downloaded: refused_private_address 4"
    assert [f["step"] for f in report["funnel"]] == ["raw rows", "valid", "unique", "downloaded"]
    assert report["embeddings"]["count"] is None and report["index"] == {}
    assert REFUSED in (tmp_path / "report" / "report.html").read_text()


def test_no_report_when_dedup_did_not_finish(tmp_path: Path) -> None:
    """An earlier run's dedup output is there, but this run's dedup failed: nothing to report on."""
    layout = RunLayout(str(tmp_path))
    shards(layout, {"count": 2, "successes": 2})
    ti = DagRunSeen(
        {("dedup", FAILURE_KEY): {"reason": "dedup rejected its input raw: input file raw/x.csv is gzip-compressed"}},
        {"fetch_metadata": "success", "dedup": "failed", "list_dedup_parts": "upstream_failed", "download_images": "upstream_failed"},
    )
    with pytest.raises(AirflowFailException, match=r"no report for .*: dedup failed: dedup rejected its input raw: input file raw/x.csv is gzip"):
        ReportOperator(task_id="report", output_root=str(tmp_path)).execute(context={"ti": ti})
    assert not (tmp_path / "report").exists()


def test_a_stage_ends_as_its_worst_task() -> None:
    from airflow.utils.state import TaskInstanceState

    states = {
        "dedup": TaskInstanceState.SUCCESS,
        "download_images_0": "success", "download_images_1": "failed", "download_images_10": "success",
        "clip_embeddings": "upstream_failed", "report": "running",
    }  # fmt: skip
    failures = {"download_images": [{"reason": "OSError: disk full"}, None, {"reason": "OSError: disk full"}]}
    assert stage_outcomes(states, failures) == {
        "dedup": {"state": "success", "reason": None},
        "download_images": {"state": "failed", "reason": "OSError: disk full"},
        "clip_embeddings": {"state": "upstream_failed", "reason": None},
    }


def test_the_report_waits_for_every_task_of_the_run() -> None:
    """all_done, and downstream of every part's embeddings (each downstream of its part's
    download): a part that failed early fails curate and build_index at once, while other
    parts may still be downloading or embedding, and the report waits for them."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["laion_pipeline"]
    report = dag.get_task("report")
    assert report.trigger_rule == "all_done"
    assert report.upstream_task_ids == {"build_index", "clip_embeddings", "export_subset"}
    assert dag.get_task("clip_embeddings").upstream_task_ids == {"download_images", "list_dedup_parts"}  # the part it maps over
    assert dag.get_task("curate").upstream_task_ids == {"clip_embeddings"}
    assert dag.get_task("build_index").upstream_task_ids == {"curate"}


def test_a_run_whose_curation_failed_reports_its_blocklists_and_not_an_earlier_curation(tmp_path: Path) -> None:
    """The curation marker on the root is an earlier run's: its numbers are not this run's."""
    layout = RunLayout(str(tmp_path))
    shards(layout, {"count": 2, "successes": 1, "failed_to_download": 1, "status_dict": {"success": 1, "blocked_image": 1}})
    mark_embedded(layout, 2)
    layout.curation_marker.mark_done({"input_fingerprint": "old"}, {"embedded": 9, "kept": 9, "below_clip_score": 0})
    reason = "InputError: min_clip_score 2 is out of range"
    ti = DagRunSeen(
        {("curate", FAILURE_KEY): {"reason": reason}},
        {"dedup": "success", "download_images_0": "success", "download_images_1": "success", "clip_embeddings_0": "success",
         "clip_embeddings_1": "success", "curate": "failed", "build_index": "upstream_failed"},
    )  # fmt: skip
    with pytest.raises(AirflowFailException, match=rf"the run did not finish: curate failed: {reason}"):
        ReportOperator(task_id="report", output_root=str(tmp_path)).execute(context={"ti": ti})
    report = report_of(tmp_path)
    assert [(s["name"], s["state"]) for s in report["stages"]][-2:] == [("curate", "failed"), ("build_index", "upstream_failed")]
    assert {k: report["curate"][k] for k in ("state", "blocked_url", "blocked_image", "embedded", "kept")} == {
        "state": "failed", "blocked_url": 0, "blocked_image": 2, "embedded": None, "kept": None,
    }
    assert [(f["step"], f["count"], f.get("removed")) for f in report["funnel"]][3:] == [("blocked", 2, 2), ("downloaded", 2, None), ("embedded", 2, None)]
