"""The `make run` tests' helpers (make_run.py) and scripts/ are imported by name, whatever
pytest's import mode; the slow web is shared by the session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]

from make_run import MakeRun, SlowWeb  # noqa: E402

from sampleweb.hostile import HostileServer  # noqa: E402


@pytest.fixture(scope="session")
def slow_web() -> Iterator[SlowWeb]:
    with HostileServer(trickle_seconds=900) as server:
        yield SlowWeb(server)


@pytest.fixture(autouse=True)
def no_run_left_behind() -> Iterator[None]:
    yield
    while MakeRun.started:
        MakeRun.started.pop().kill()
