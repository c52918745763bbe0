"""Which finished runs can be searched: laion_pipeline's successful runs, plus LAION_SEARCH_ROOTS.

A run is offered when its ``output_root`` holds a published index (``RunLayout.has_index``).
Reruns continue the dataset under the same root, so one root is offered once, under its
newest successful run; older runs that wrote the same root resolve to it too.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from stages import storage
from stages.layout import RunLayout
from stages.storage import StorageSettings

log = logging.getLogger(__name__)

DAG_ID = "laion_pipeline"
SEARCH_ROOTS_ENV = "LAION_SEARCH_ROOTS"


@dataclass(frozen=True)
class Run:
    run_id: str
    output_root: str
    source: str  # "airflow": a DagRun of this Airflow; "LAION_SEARCH_ROOTS": a root named by the env
    end_date: str | None = None
    storage_conn_id: str | None = None
    other_run_ids: tuple[str, ...] = field(default=())  # older successful runs that wrote the same root


class UnknownRun(LookupError):
    """No finished run with an index goes by this id."""


def successful_dag_runs() -> list[dict[str, Any]]:
    """laion_pipeline's successful runs from the metadata database, newest first."""
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState

    query = (
        select(DagRun.run_id, DagRun.conf, DagRun.end_date, DagRun.logical_date)
        .where(DagRun.dag_id == DAG_ID, DagRun.state == DagRunState.SUCCESS)
        .order_by(DagRun.end_date.desc())
    )
    with create_session() as session:
        rows = session.execute(query).all()
    return [
        {"run_id": run_id, "conf": conf or {}, "end_date": end.isoformat() if end else None, "logical_date": logical}
        for run_id, conf, end, logical in rows
    ]


def rendered_root(root: str, logical_date: Any) -> str | None:
    """A run's ``output_root`` with its run-date templates (``{{ ds }}``...) filled in, as the
    DAG's tasks render it; None when it needs a date the run does not have."""
    if "{{" not in root:
        return root
    if logical_date is None:
        return None
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    try:
        return env.from_string(root).render(ds=logical_date.strftime("%Y-%m-%d"), ds_nodash=logical_date.strftime("%Y%m%d"), logical_date=logical_date)
    except jinja2.TemplateError:
        log.warning("Cannot render output_root %r for a run of %s; not offering it", root, logical_date)
        return None


def _same_root(root: str) -> str:
    return root.rstrip("/") if storage.is_remote(root) else os.path.realpath(root)


def _has_index(root: str, conn_id: str | None) -> bool:
    try:
        storage.configure_storage(root, conn_id)
        return RunLayout(root).has_index()
    except Exception:  # an unreachable store hides that run, the others stay listed
        log.warning("Cannot check %s for an index; not offering it", root, exc_info=True)
        return False


def find_runs(dag_runs: list[dict[str, Any]], search_roots: list[str], defaults: StorageSettings | None = None) -> list[Run]:
    """The searchable runs: one per output root, the newest successful run first.

    A run whose conf leaves ``output_root`` or ``storage_conn_id`` out used the DAG's
    defaults, ``defaults`` (the params' defaults: ``StorageSettings()``).
    """
    defaults = defaults or StorageSettings()
    runs: dict[str, Run] = {}
    for dag_run in dag_runs:
        root = rendered_root(str(dag_run["conf"].get("output_root") or defaults.output_root), dag_run.get("logical_date"))
        if root is None:
            continue
        conn_id = dag_run["conf"].get("storage_conn_id") or defaults.storage_conn_id
        same = _same_root(root)
        if same in runs:
            known = runs[same]
            runs[same] = replace(known, other_run_ids=(*known.other_run_ids, dag_run["run_id"]))
        elif _has_index(root, conn_id):
            runs[same] = Run(dag_run["run_id"], root, "airflow", dag_run["end_date"], conn_id)
    for root in search_roots:
        same = _same_root(root)
        if same in runs or not _has_index(root, defaults.storage_conn_id):
            continue
        report = storage.read_json_or_none(RunLayout(root).report_json) or {}
        run_id = report.get("run", {}).get("run_id") or os.path.basename(root.rstrip("/"))
        runs[same] = Run(run_id, root, SEARCH_ROOTS_ENV, None, defaults.storage_conn_id)
    return list(runs.values())


def search_roots_from_env() -> list[str]:
    return [r.strip() for r in os.environ.get(SEARCH_ROOTS_ENV, "").split(",") if r.strip()]


class RunCatalog:
    """The searchable runs, looked up again at most every ``ttl`` seconds or when told to."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._runs: list[Run] = []
        self._listed_at = float("-inf")

    def refresh(self) -> None:
        self._listed_at = float("-inf")

    def runs(self) -> list[Run]:
        if time.monotonic() - self._listed_at > self.ttl:
            self._runs = find_runs(successful_dag_runs(), search_roots_from_env())
            self._listed_at = time.monotonic()
        return self._runs

    def get(self, run_id: str) -> Run:
        for attempt in range(2):  # a run that finished a moment ago is not in the cached list yet
            for run in self.runs():
                if run_id == run.run_id or run_id in run.other_run_ids:
                    return run
            if attempt == 0:
                self.refresh()
        known = ", ".join(r.run_id for r in self._runs) or "none"
        raise UnknownRun(f"no finished {DAG_ID} run {run_id!r} with an index (runs with an index: {known})")
