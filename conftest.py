"""Test-session environment: the embedded default, in a throw-away AIRFLOW_HOME.

Set here, at the repository root, so it is in place before anything imports Airflow.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent

os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="laion-airflow-home-")
atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], ignore_errors=True)
os.environ.update(
    {
        "LAION_SEARCH_CACHE_DIR": os.path.join(os.environ["AIRFLOW_HOME"], "search-cache"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[*]"}',
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
)


import subprocess  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated SQLite metadata database in the session's AIRFLOW_HOME."""
    subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], check=True, capture_output=True, timeout=600)
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture(scope="session")
def demo_clip_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's untrained CLIP weights (see sampleweb/demo_model.py), written once per session."""
    from sampleweb.demo_model import ensure_demo_weights

    return ensure_demo_weights(tmp_path_factory.mktemp("models") / "demo-vit-s-32.pt")
