from __future__ import annotations

from typing import Any

from operators.base import StageOperator
from stages.report import STAGE_ORDER, build_report, write_report


class ReportOperator(StageOperator):
    """Gathers every stage's numbers into ``report/report.json`` and ``report/report.html``."""

    def run(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        stage_numbers: dict[str, list[dict[str, Any]]] = {}
        for task_id in STAGE_ORDER:
            pulled = ti.xcom_pull(task_ids=task_id)
            stage_numbers[task_id] = [p for p in _as_list(pulled) if isinstance(p, dict)]
        run = {"dag_id": ti.dag_id, "run_id": ti.run_id, "output_root": str(self.output_root)}
        report = build_report(self.layout, stage_numbers, run)
        paths = write_report(self.layout, report)
        self.log.info("Report written to %s", paths["report_html"])
        return paths


def _as_list(pulled: Any) -> list[Any]:
    if pulled is None:
        return []
    if isinstance(pulled, dict):
        return [pulled]
    return list(pulled)
