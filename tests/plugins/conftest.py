"""One finished run of laion_pipeline on the sample web, served by the search plugin.

The run is made once per session in the session's AIRFLOW_HOME (its DagRun and its
``laion_index`` Asset event are in the metadata database the API server reads). Users come
from the SimpleAuthManager with a passwords file written here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(REPO / "scripts"))

from demo import demo_conf  # noqa: E402
from run_dag import run_pipeline  # noqa: E402

from sampleweb.build import build_sample_web  # noqa: E402
from sampleweb.demo_model import ensure_demo_weights  # noqa: E402
from sampleweb.serve import SampleWebServer  # noqa: E402

# Every SimpleAuthManager role; "nobody" has none, so may read no DAG at all.
ROLES = {"admin": "admin", "viewer": "viewer", "user": "user", "op": "op", "nobody": ""}
# Users of teams (role:team), configured only by the test that turns multi-team mode on:
# Airflow refuses a user with a team outside it.
TEAM_USERS = {"member": "viewer:laion", "outsider": "viewer:other"}
USERS = {name: f"{name}-pw-laion" for name in (*ROLES, *TEAM_USERS)}
USERS_CONFIG = ",".join(f"{name}:{role}" for name, role in ROLES.items())
PASSWORDS_FILE = Path(os.environ["AIRFLOW_HOME"]) / "test_passwords.json"
PASSWORDS_FILE.write_text(json.dumps(USERS))
os.environ.update(
    {
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": USERS_CONFIG,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(PASSWORDS_FILE),
        # Only an Asset event (or a restart) makes the service look at an index again.
        "LAION_SEARCH_RECHECK_SECONDS": "3600",
    }
)
TEST_OUTPUT = REPO / "test-output"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def search_run(airflow_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished run with the demo's settings: output root, run id, CLIP model, the web's truth."""
    base = tmp_path_factory.mktemp("search-run")
    web = base / "web"
    (web / "www").mkdir(parents=True)
    clip_model = ensure_demo_weights(base / "models" / "demo-vit-s-32.pt")
    with SampleWebServer(web / "www") as server:
        expected = build_sample_web(web, server.url)
        dag_run = run_pipeline(demo_conf(web, base / "output", clip_model))
    assert str(dag_run.state).endswith("success"), f"run {dag_run.run_id} ended {dag_run.state}"
    return {"output_root": str(base / "output"), "run_id": dag_run.run_id, "clip_model": clip_model, "expected": expected}


@pytest.fixture(scope="session")
def airflow_client(search_run: dict[str, Any]) -> Any:
    """Airflow's whole API app in-process (the plugin mounted by the plugins manager)."""
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.app import create_app

    return TestClient(create_app())


@pytest.fixture(scope="session")
def passwords() -> dict[str, str]:
    return dict(USERS)


@pytest.fixture(scope="session")
def team_users() -> dict[str, str]:
    """Users of teams, ``{name: "role:team"}``, for a test that turns multi-team mode on."""
    return dict(TEAM_USERS)


@pytest.fixture(scope="session")
def login() -> Any:
    """``login(client, user)``: an Authorization header with a SimpleAuthManager JWT for ``user``."""

    def headers(client: Any, user: str) -> dict[str, str]:
        response = client.post("/auth/token", json={"username": user, "password": USERS[user]})
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    return headers


@pytest.fixture(scope="session")
def api_server(search_run: dict[str, Any]) -> Iterator[str]:
    """``airflow api-server`` on a free 127.0.0.1 port over the session's metadata database."""
    port = free_port()
    TEST_OUTPUT.mkdir(exist_ok=True)
    log = open(TEST_OUTPUT / "api-server.log", "w")  # noqa: SIM115 - open while the server runs
    env = {**os.environ, "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__WORKERS": "1"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"api-server did not start: see {TEST_OUTPUT / 'api-server.log'}") from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def tar_samples(search_run: dict[str, Any]) -> dict[str, dict[str, bytes]]:
    """The truth to compare with: every sample's files, unpacked here with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(Path(search_run["output_root"]).glob("images/part-*/*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


@pytest.fixture(scope="session")
def unique_image_keys(tar_samples: dict[str, dict[str, bytes]]) -> list[str]:
    """Keys whose image no other sample shares (the sample web serves a few images under two URLs)."""
    owners: dict[bytes, list[str]] = {}
    for key, files in tar_samples.items():
        owners.setdefault(files["jpg"], []).append(key)
    return sorted(keys[0] for keys in owners.values() if len(keys) == 1)


@pytest.fixture(scope="session")
def without_search_files() -> Callable[[Path], None]:
    """``without_search_files(root)``: removes what build_index publishes for search from a run."""
    from stages.layout import RunLayout

    def remove(root: Path) -> None:
        layout = RunLayout(str(root))
        shutil.rmtree(Path(layout.index) / "offsets")
        shutil.rmtree(Path(layout.index) / "metadata")
        layout.search_marker.clear()

    return remove
