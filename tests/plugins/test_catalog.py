"""Which runs the plugin offers (plugins/laion_search/catalog.py), over output roots built here."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from laion_search.catalog import SEARCH_ROOTS_ENV, Run, find_runs

from stages.layout import RunLayout
from stages.storage import StorageSettings


def with_index(root: Path) -> str:
    """An output root whose index is published (what makes a run searchable)."""
    RunLayout(str(root)).index_marker.mark_done({"input_fingerprint": "f"}, {"image": {"ntotal": 1}})
    return str(root)


def dag_run(run_id: str, end: str, logical_date: datetime | None = None, **conf: str) -> dict:
    return {"run_id": run_id, "conf": conf, "end_date": end, "logical_date": logical_date}


def test_one_run_per_root_with_an_index_newest_first(tmp_path: Path) -> None:
    indexed, unfinished = with_index(tmp_path / "a"), str(tmp_path / "b")
    runs = find_runs(
        [
            dag_run("rerun", "2025-01-03", output_root=indexed, storage_conn_id="minio"),
            dag_run("no_index", "2025-01-02", output_root=unfinished),
            dag_run("first", "2025-01-01", output_root=indexed + "/"),  # the same root, spelled otherwise
        ],
        [],
    )
    assert runs == [Run("rerun", indexed, "airflow", "2025-01-03", "minio", ("first",))]


def test_a_conf_without_storage_settings_used_the_dags_defaults(tmp_path: Path) -> None:
    root = with_index(tmp_path / "default")
    defaults = StorageSettings(output_root=root, storage_conn_id="default_conn")
    assert find_runs([dag_run("plain", "2025-01-01")], [], defaults) == [Run("plain", root, "airflow", "2025-01-01", "default_conn")]


def test_a_run_date_root_is_rendered_with_the_runs_date(tmp_path: Path) -> None:
    with_index(tmp_path / "20250102")
    template = str(tmp_path / "{{ ds_nodash }}")
    runs = find_runs([dag_run("dated", "2025-01-03", datetime(2025, 1, 2), output_root=template), dag_run("undated", "2025-01-03", output_root=template)], [])
    assert [(r.run_id, r.output_root) for r in runs] == [("dated", str(tmp_path / "20250102"))]


def test_search_roots_are_named_by_their_reports_run(tmp_path: Path) -> None:
    reported, unreported = with_index(tmp_path / "reported"), with_index(tmp_path / "unreported")
    report = Path(RunLayout(reported).report_json)
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"run": {"run_id": "manual__2025"}}))
    also_a_dag_run = with_index(tmp_path / "known")
    defaults = StorageSettings(output_root=str(tmp_path / "unused"), storage_conn_id="roots_conn")
    runs = find_runs([dag_run("known_run", "2025-01-01", output_root=also_a_dag_run)], [reported, unreported, also_a_dag_run], defaults)
    assert [(r.run_id, r.source, r.storage_conn_id) for r in runs] == [
        ("known_run", "airflow", "roots_conn"),
        ("manual__2025", SEARCH_ROOTS_ENV, "roots_conn"),
        ("unreported", SEARCH_ROOTS_ENV, "roots_conn"),
    ]
