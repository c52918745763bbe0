"""Start long-running processes, wait for them to listen, stop exactly those (by pid)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartupError(RuntimeError):
    """A process exited or did not become ready; the message ends with its log's tail."""


@dataclass
class ProcessGroup:
    """Processes started by this group, each in its own session, logs under ``log_dir``."""

    log_dir: Path
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    stop_signals: dict[str, int] = field(default_factory=dict)

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], *, user: str | None = None, stop_signal: int = signal.SIGTERM
    ) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            process = subprocess.Popen(
                list(argv), env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, user=user, group=user, extra_groups=[] if user else None,
            )  # fmt: skip
        finally:
            log.close()
        self.started[name] = process
        self.stop_signals[name] = stop_signal
        return process

    def run(self, name: str, argv: Sequence[str], env: Mapping[str, str], *, timeout: float, user: str | None = None) -> None:
        """Run a one-shot command to completion; raise with its log's tail when it fails."""
        process = self.start(name, argv, env, user=user)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(name)
            raise StartupError(f"{name} did not finish in {timeout:.0f} s\n{self.tail(name)}") from None
        del self.started[name]
        if code != 0:
            raise StartupError(f"{name} exited with {code}\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def wait_until(self, name: str, ready: Callable[[], bool], *, timeout: float) -> None:
        """Poll ``ready`` until it holds; fail early, with the log, if the process exits."""
        deadline = time.monotonic() + timeout
        while not ready():
            code = self.started[name].poll()
            if code is not None:
                raise StartupError(f"{name} exited with {code} before it was ready\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise StartupError(f"{name} not ready after {timeout:.0f} s\n{self.tail(name)}")
            time.sleep(0.5)

    def stop(self, name: str, grace: float = 20) -> None:
        """Signal the process's own session (it and its children), SIGKILL what is left after ``grace``."""
        process = self.started.pop(name)
        _signal_session(process.pid, self.stop_signals.pop(name))
        deadline = time.monotonic() + grace
        # Wait without reaping: while the leader is a zombie its pid cannot be reused, so the
        # SIGKILL below reaches only this session's leftovers.
        while process.returncode is None and _running(process.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        _signal_session(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        """Stop every process, the last started first; one that fails to stop does not spare the rest."""
        errors = []
        for name in reversed(list(self.started)):
            try:
                self.stop(name)
            except Exception as error:  # noqa: BLE001 - re-raised below, after the others are stopped
                errors.append(error)
        if errors:
            raise errors[0]


def _running(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def _signal_session(pid: int, signum: int) -> None:
    # start_new_session made the pid its own process group: this reaches only what it started.
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def port_open(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    return ready


def http_ok(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status < 500
        except (urllib.error.URLError, OSError):
            return False

    return ready
