"""ReportOperator: every stage's XCom numbers, single or mapped, into the run's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from operators.report import ReportOperator
from stages.layout import RunLayout


class PulledNumbers:
    """What the report task reads of a DAG run: each task's XCom return value."""

    dag_id, run_id = "laion_pipeline", "manual__1"

    def __init__(self, returned: dict[str, Any]) -> None:
        self.returned = returned

    def xcom_pull(self, task_ids: str) -> Any:
        return self.returned.get(task_ids)


def test_reports_single_and_mapped_tasks(tmp_path: Path) -> None:
    layout = RunLayout(str(tmp_path))
    layout.dedup_marker.mark_done({"input_fingerprint": "d", "partitions": 1}, {"parts": [], "rows_in": 3, "rows_invalid": 0, "rows_out": 3})
    layout.embeddings_marker.mark_done({"input_fingerprint": "e", "clip_model": "m"}, {"count": 0, "dim": 512})
    built = {"index_key": "Flat", "ntotal": 0, "size_bytes": 45, "recall_at_10": 1.0, "build_seconds": 0.1}
    layout.index_marker.mark_done({"input_fingerprint": "i"}, {"image": built, "text": built})
    ti = PulledNumbers({
        "dedup": {"started_at": 10.0, "ended_at": 12.0},
        "download_images": [{"started_at": 12.0, "ended_at": 20.0}, {"started_at": 13.0, "ended_at": 15.0}, None],
    })  # fmt: skip

    paths = ReportOperator(task_id="report", output_root=str(tmp_path)).execute(context={"ti": ti})
    report = json.loads(Path(paths["report_json"]).read_text())
    assert report["run"] == {"dag_id": "laion_pipeline", "run_id": "manual__1", "output_root": str(tmp_path)}
    assert report["stages"] == [
        {"name": "dedup", "duration_s": 2.0, "tasks": 1},
        {"name": "download_images", "duration_s": 8.0, "tasks": 2},
    ]
    assert Path(paths["report_html"]).exists()
