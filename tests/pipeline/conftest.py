"""A real run of laion_pipeline over a sample web served on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from demo import demo_conf  # noqa: E402
from run_dag import run_pipeline  # noqa: E402

from sampleweb.build import build_sample_web  # noqa: E402
from sampleweb.demo_model import ensure_demo_weights  # noqa: E402
from sampleweb.serve import SampleWebServer  # noqa: E402


@pytest.fixture(scope="session")
def clip_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_demo_weights(tmp_path_factory.mktemp("models") / "demo-vit-s-32.pt")


@pytest.fixture(scope="session")
def sample_web(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(web root, expected counts, server) for the whole session; the server keeps serving."""
    root = tmp_path_factory.mktemp("web")
    (root / "www").mkdir()
    with SampleWebServer(root / "www", log_path=tmp_path_factory.mktemp("weblog") / "requests.jsonl") as server:
        expected = build_sample_web(root, server.url)
        yield root, expected, server


def run_ok(conf: dict[str, Any], dag_id: str = "laion_pipeline") -> Any:
    dag_run = run_pipeline(conf, dag_id)
    assert str(dag_run.state).endswith("success"), f"run {dag_run.run_id} ended {dag_run.state}"
    return dag_run


@pytest.fixture(scope="session")
def run() -> Any:
    """Runs a DAG (laion_pipeline by default) once in-process with a conf and asserts it succeeded."""
    return run_ok


@pytest.fixture(scope="session")
def conf_for() -> Any:
    """The demo's run settings for a sample web and an output root."""
    return demo_conf
