"""Tests wait on events: one way to poll for one, with a deadline that fails loudly."""

from __future__ import annotations

import subprocess
import time
from typing import Any, Callable


def wait_until(
    happened: Callable[[], Any], what: str, *, timeout: float = 600, process: subprocess.Popen | None = None
) -> Any:
    """``happened()``'s first true value; fails when ``process`` has exited first, or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (found := happened()):
        assert process is None or process.poll() is None, f"the process ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)
    return found
