"""One run at a time on an output root.

Runs that write the same ``output_root`` (date partitions growing one dataset, a manual run
during a backfill) take ``<output_root>/_lock.json`` before they fetch anything and give it
back when their report is written. A run that finds the lock held by a run that is still
going waits; a lock left by a run that ended without giving it back (killed) is taken over.

The lock file is created exclusively: ``O_EXCL`` on a local disk, a conditional put
(``If-None-Match: *``) on S3 and MinIO, so of runs starting within the same moment one
takes it. Other object stores have no such create here: the lock is written, then read
back, and two runs starting within the same moment could both proceed; the DAG's
``max_active_runs=1`` and a backfill's ``--max-active-runs 1`` keep that from happening.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs

from stages import storage

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"


class RootBusyError(RuntimeError):
    """Another run still holds the output root's lock after the wait."""


class RootLock:
    """The lock of one output root, on behalf of ``holder`` (``{"dag_id", "run_id"}``)."""

    def __init__(self, output_root: str, holder: Mapping[str, str]) -> None:
        self.url = storage.join(output_root, LOCK_FILE)
        self.holder = {"dag_id": holder["dag_id"], "run_id": holder["run_id"]}

    def held_by(self) -> dict[str, Any] | None:
        try:
            return storage.read_json_or_none(self.url)
        except ValueError:  # created, not yet written
            return {"dag_id": None, "run_id": None, "writing": True}

    def _ours(self, found: Mapping[str, Any] | None) -> bool:
        return found is not None and {k: found.get(k) for k in self.holder} == self.holder

    def acquire(self, still_running: Callable[[Mapping[str, Any]], bool], *, wait_seconds: float, poll_seconds: float = 5.0) -> str:
        """Take the lock; returns "taken", "held" (ours already) or "taken over" (its holder
        had ended). Waits while a running holder keeps it; :class:`RootBusyError` after
        ``wait_seconds``."""
        deadline = time.monotonic() + wait_seconds
        took_over = False
        while True:
            found = self.held_by()
            if self._ours(found):
                return "held"
            if found is None:
                if self._create():
                    return "taken over" if took_over else "taken"
                continue  # another run created it in between: look at who holds it
            if found.get("writing"):
                time.sleep(0.1)
                continue
            if not still_running(found):
                log.warning("Taking over %s: its run %s/%s is no longer running", self.url, found.get("dag_id"), found.get("run_id"))
                storage.remove(self.url)
                took_over = True
                continue
            if time.monotonic() >= deadline:
                raise RootBusyError(
                    f"{self.url} is held by run {found.get('run_id')} of {found.get('dag_id')} (since {found.get('since')}), "
                    f"still running after {wait_seconds:.0f} s of waiting: two runs must not write one output root at once"
                )
            log.info("Waiting for run %s to give back %s", found.get("run_id"), self.url)
            time.sleep(poll_seconds)

    def _create(self) -> bool:
        """Write the lock if none exists; whether it is ours afterwards."""
        body = json.dumps({**self.holder, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        fs, path = url_to_fs(self.url)
        if "s3" in fs.protocol:
            try:
                fs.pipe_file(path, body.encode(), mode="create")
            except FileExistsError:
                return False
            return True
        if storage.is_remote(self.url):
            storage.write_text(self.url, body)
            return self._ours(self.held_by())
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(body)
        return True

    def release(self) -> bool:
        """Give the lock back if this run holds it; whether it did."""
        if not self._ours(self.held_by()):
            return False
        storage.remove(self.url)
        return True
