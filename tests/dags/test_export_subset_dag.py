"""laion_export_subset: its wiring and params, and real runs (``dag.test()``) over a small
dataset built by hand: the curated subset, an allowlist's, and a bad allowlist that fails
the run at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from curated_dataset import build_dataset, read_subset, write_decisions

REPO = Path(__file__).resolve().parents[2]
REMOVED = {"000000000002": "below_clip_score", "000010000000": "near_duplicate"}


@pytest.fixture(scope="module")
def dag(airflow_db: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors
    return bag.get_dag("laion_export_subset")


def run(dag: Any, conf: dict[str, Any]) -> Any:
    return dag.test(run_conf=conf)


def states(dag_run: Any) -> dict[str, str]:
    return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dag_run.get_task_instances()}


def test_one_retried_task_with_the_storage_and_export_params(dag: Any) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    assert dag.task_ids == ["export_subset"] and dag.get_task("export_subset").retries >= 1
    assert {"output_root", "storage_conn_id", "subset_keys", "export_workers"} <= set(dag.params.keys())
    assert dag.params.get_param("subset_keys").resolve(None) is None
    with pytest.raises(ParamValidationError):
        dag.params.get_param("export_workers").resolve(0)


def test_a_run_exports_the_curations_kept_samples(dag: Any, tmp_path: Path) -> None:
    samples = build_dataset(tmp_path)
    write_decisions(tmp_path, {key: REMOVED.get(key) for key in samples})

    dag_run = run(dag, {"output_root": str(tmp_path), "export_workers": 2})
    assert states(dag_run) == {"export_subset": "success"}
    assert read_subset(tmp_path) == {key: files for key, files in samples.items() if key not in REMOVED}
    marker = json.loads((tmp_path / "subset" / "_SUCCESS.json").read_text())
    assert (marker["selected_by"], marker["shards"], marker["source_shards"]) == ("curation", 3, 3)
    assert not (tmp_path / "_lock.json").exists()  # the run took the root's lock and gave it back


def test_a_run_exports_an_allowlists_samples(dag: Any, tmp_path: Path) -> None:
    samples = build_dataset(tmp_path)
    allowlist = tmp_path / "keys.txt"
    allowlist.write_text("000000000100\n000010000002\nnot-a-sample\n")

    dag_run = run(dag, {"output_root": str(tmp_path), "subset_keys": str(allowlist)})
    assert states(dag_run) == {"export_subset": "success"}
    assert read_subset(tmp_path) == {key: samples[key] for key in ("000000000100", "000010000002")}
    marker = json.loads((tmp_path / "subset" / "_SUCCESS.json").read_text())
    assert (marker["selected_by"], marker["samples"], marker["keys_not_found"]) == ("allowlist", 2, 1)


def test_an_unreadable_allowlist_fails_the_run_before_any_work(dag: Any, tmp_path: Path) -> None:
    build_dataset(tmp_path)
    dag_run = run(dag, {"output_root": str(tmp_path), "subset_keys": str(tmp_path / "missing.txt")})
    assert states(dag_run) == {"export_subset": "failed"}
    assert not (tmp_path / "subset").exists() and not (tmp_path / "_lock.json").exists()
