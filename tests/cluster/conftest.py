from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="module")
def sample_web(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(web root, expected counts) of a sample web served on 127.0.0.1 while the module runs."""
    from sampleweb.build import build_sample_web
    from sampleweb.serve import SampleWebServer

    root = tmp_path_factory.mktemp("web")
    (root / "www").mkdir()
    with SampleWebServer(root / "www") as server:
        yield root, build_sample_web(root, server.url)
