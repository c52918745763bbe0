from __future__ import annotations

from typing import Any, Iterable, Mapping

from airflow.sdk.exceptions import AirflowFailException

from operators.base import FAILURE_KEY, StageOperator
from stages.lock import RootLock
from stages.report import STAGE_ORDER, SUCCESS, build_report, write_report

# How a stage ended, from the states of its tasks: the first of these any task is in.
ENDINGS = ("failed", "upstream_failed", "skipped", "removed")


class ReportOperator(StageOperator):
    """Gathers every stage's numbers into ``report/report.json`` and ``report/report.html``.

    It runs once every stage is done, successful or not (``trigger_rule="all_done"``), and
    reports what is on storage: a run that got past dedup gets its report whatever
    happened later, each stage's state in it and the reason a stage failed. When a stage
    did not finish, the task fails after writing the report (without retries): the run is
    failed, and clearing its failed tasks makes the report again. It gives back the output
    root's lock that fetch_metadata took.
    """

    def run(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        stage_numbers = {t: [p for p in _as_list(ti.xcom_pull(task_ids=t)) if isinstance(p, dict)] for t in STAGE_ORDER}
        failures = {t: _as_list(ti.xcom_pull(task_ids=t, key=FAILURE_KEY)) for t in STAGE_ORDER}
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id], task_ids=STAGE_ORDER).get(ti.run_id, {})
        run = {"dag_id": ti.dag_id, "run_id": ti.run_id, "output_root": str(self.output_root)}
        outcomes = stage_outcomes(states, failures)
        if ti.xcom_pull(task_ids="list_dedup_parts") == []:  # no part left to download or embed: done
            for stage in ("download_images", "clip_embeddings"):
                if outcomes.get(stage, {}).get("state") == "skipped":
                    outcomes[stage] = {"state": SUCCESS, "reason": None}
        try:
            report = build_report(self.layout, stage_numbers, run, outcomes)
            paths = write_report(self.layout, report)
        finally:  # the run is over: the next run on this root may start
            if RootLock(str(self.output_root), run).release():
                self.log.info("Gave back the lock of %s", self.output_root)
        self.log.info("Report written to %s", paths["report_html"])
        if not report["complete"]:
            raise AirflowFailException(f"the run did not finish: {report['reason']}; its report: {paths['report_html']}")
        return paths


def stage_outcomes(states: Mapping[str, Any], failures: Mapping[str, Iterable[Any]]) -> dict[str, dict[str, Any]]:
    """How each stage ended in this run: ``{"state": ..., "reason": ...}`` by stage.

    ``states`` are the run's task states as Airflow gives them (``download_images_3`` for
    a mapped task's instance 3); ``failures`` each stage's ``failure`` XComs. A stage
    succeeded when all its tasks did; a stage with no task state is left out.
    """
    outcomes = {}
    for stage in STAGE_ORDER:
        found = [str(getattr(state, "value", state)) for key, state in states.items() if _task_of(key) == stage]
        if not found:
            continue
        state = SUCCESS if all(s == SUCCESS for s in found) else next((e for e in ENDINGS if e in found), found[0])
        reasons = sorted({f["reason"] for f in failures.get(stage, []) if isinstance(f, dict) and f.get("reason")})
        outcomes[stage] = {"state": state, "reason": "; ".join(reasons) or None}
    return outcomes


def _task_of(key: str) -> str:
    """``download_images_3`` -> ``download_images``: the task id of a task state's key."""
    task_id, _, index = key.rpartition("_")
    return task_id if index.isdigit() and task_id in STAGE_ORDER else key


def _as_list(pulled: Any) -> list[Any]:
    if pulled is None:
        return []
    if isinstance(pulled, dict):
        return [pulled]
    return list(pulled)
