"""Who may use the search plugin: exactly the users Airflow's own API lets read
laion_pipeline's runs, on every search and report route; and no other DAG's runs are offered.

SimpleAuthManager, the auth manager here, cannot keep one DAG from a role: every role from
viewer up reads every DAG. What it can express is tested: a user with no role, and, in
multi-team mode, a viewer of another team than the one that owns laion_pipeline's bundle.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# The first test of the session that uses the plugins' fixtures pays for their pipeline run.
pytestmark = [pytest.mark.heavy, pytest.mark.timeout(1200)]

DAG_RUNS = "/api/v2/dags/laion_pipeline/dagRuns"  # Airflow's own answer to "may this user read the runs?"


@pytest.fixture(scope="module")
def routes(search_run: dict, unique_image_keys: list) -> dict[tuple[str, str], dict[str, Any]]:
    """A request to every route of the plugin, each one a user who may read the runs gets a 200 for."""
    from fastapi.routing import APIRoute
    from laion_search.api import app

    run = search_run["run_id"]
    requests: dict[tuple[str, str], dict[str, Any]] = {
        ("GET", "/api/runs"): {},
        ("GET", "/api/search"): {"params": {"run": run, "text": "a photo of a cat", "k": 3}},
        ("POST", "/api/search"): {"data": {"run": run, "text": "a photo of a cat", "k": "3"}},
        ("GET", "/api/image"): {"params": {"run": run, "key": unique_image_keys[0]}},
        ("GET", "/api/report"): {"params": {"run": run}},
        ("GET", "/api/metrics"): {},
        ("GET", "/search"): {},
        ("GET", "/reports"): {},
        ("GET", "/report"): {"params": {"run": run}},
    }
    served = {(method, route.path) for route in app.routes if isinstance(route, APIRoute) for method in route.methods}
    assert served == set(requests), "every route of the plugin needs a request here"
    return requests


def statuses(client: Any, headers: dict[str, str], routes: dict[tuple[str, str], dict[str, Any]]) -> dict[str, int]:
    return {
        f"{method} {path}": client.request(method, f"/laion{path}", headers=headers, follow_redirects=False, **request).status_code
        for (method, path), request in routes.items()
    }


def every(status: int, routes: dict[tuple[str, str], dict[str, Any]]) -> dict[str, int]:
    return {f"{method} {path}": status for method, path in routes}


@pytest.mark.parametrize("user", ["viewer", "user", "op", "admin"])
def test_every_role_that_reads_the_runs_gets_every_route(airflow_client: Any, login: Any, routes: dict, user: str) -> None:
    headers = login(airflow_client, user)
    assert airflow_client.get(DAG_RUNS, headers=headers).status_code == 200
    assert statuses(airflow_client, headers, routes) == every(200, routes)


def test_a_user_without_a_role_gets_403_from_every_route(airflow_client: Any, login: Any, routes: dict) -> None:
    headers = login(airflow_client, "nobody")
    assert airflow_client.get(DAG_RUNS, headers=headers).status_code == 403
    assert statuses(airflow_client, headers, routes) == every(403, routes)
    response = airflow_client.get("/laion/api/runs", headers=headers)
    assert response.json()["detail"] == "user 'nobody' may not read the runs of laion_pipeline"


@pytest.fixture
def laion_team(monkeypatch: pytest.MonkeyPatch, team_users: dict[str, str]) -> Iterator[str]:
    """Multi-team mode, its users configured, and laion_pipeline's bundle owned by team "laion"."""
    from sqlalchemy import delete, insert, select

    from airflow.models.dag import DagModel, clear_team_name_cache
    from airflow.models.team import Team, dag_bundle_team_association_table
    from airflow.utils.session import create_session

    monkeypatch.setenv("AIRFLOW__CORE__MULTI_TEAM", "True")
    users = ",".join(f"{name}:{role_and_team}" for name, role_and_team in team_users.items())
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", f"{os.environ['AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS']},{users}")
    with create_session() as session:
        bundle = session.scalar(select(DagModel.bundle_name).where(DagModel.dag_id == "laion_pipeline"))
        assert bundle, "laion_pipeline has no bundle in the metadata database"
        session.add(Team(name="laion"))
        session.flush()
        session.execute(insert(dag_bundle_team_association_table).values(dag_bundle_name=bundle, team_name="laion"))
    clear_team_name_cache()  # Airflow keeps a DAG's team for team_name_cache_ttl (30 s)
    try:
        yield bundle
    finally:  # the session's other tests see the DAG without a team again
        with create_session() as session:
            session.execute(delete(dag_bundle_team_association_table).where(dag_bundle_team_association_table.c.team_name == "laion"))
            session.execute(delete(Team).where(Team.name == "laion"))
        clear_team_name_cache()


def test_a_viewer_of_another_team_gets_403_from_every_route(airflow_client: Any, login: Any, routes: dict, laion_team: str) -> None:
    outsider, member = login(airflow_client, "outsider"), login(airflow_client, "member")
    assert airflow_client.get(DAG_RUNS, headers=outsider).status_code == 403
    assert airflow_client.get(DAG_RUNS, headers=member).status_code == 200
    assert statuses(airflow_client, outsider, routes) == every(403, routes)
    assert statuses(airflow_client, member, routes) == every(200, routes)


def test_another_dags_runs_are_never_offered(airflow_client: Any, login: Any, search_run: dict) -> None:
    """A successful laion_retry_failed run names the same output_root, as a retry does."""
    from laion_search.api import service

    admin = login(airflow_client, "admin")
    other = "/api/v2/dags/laion_retry_failed/dagRuns"
    body = {"dag_run_id": "retry_of_the_search_run", "logical_date": None, "conf": {"output_root": search_run["output_root"]}}
    created = airflow_client.post(other, headers=admin, json=body)
    assert created.status_code == 200, created.text
    try:
        done = airflow_client.patch(f"{other}/retry_of_the_search_run", headers=admin, json={"state": "success"})
        assert done.status_code == 200 and done.json()["state"] == "success", done.text
        service.catalog.refresh()
        for user in ("viewer", "admin"):
            headers = login(airflow_client, user)
            runs = airflow_client.get("/laion/api/runs", headers=headers).json()
            offered = {run["run_id"] for run in runs} | {other_id for run in runs for other_id in run["other_run_ids"]}
            assert search_run["run_id"] in offered and "retry_of_the_search_run" not in offered
            search = airflow_client.get("/laion/api/search", params={"run": "retry_of_the_search_run", "text": "cat"}, headers=headers)
            assert search.status_code == 404
            assert airflow_client.get("/laion/report", params={"run": "retry_of_the_search_run"}, headers=headers).status_code == 404
    finally:
        airflow_client.delete(f"{other}/retry_of_the_search_run", headers=admin)
        service.catalog.refresh()
