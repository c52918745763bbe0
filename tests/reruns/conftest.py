"""What the kill tests share: waiting for the event that says a worker is where it should die."""

from __future__ import annotations

import subprocess
import time
from typing import Callable

import pytest

Wait = Callable[..., None]


def wait_until(happened: Callable[[], bool], what: str, worker: subprocess.Popen, deadline_s: float = 600) -> None:
    """Poll ``happened`` until true; fail if ``worker`` ends first or ``deadline_s`` passes."""
    deadline = time.monotonic() + deadline_s
    while not happened():
        assert worker.poll() is None, f"the worker ended (exit {worker.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {deadline_s} s"
        time.sleep(0.05)


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Wait:
    return wait_until
