"""stages.lock: one run at a time writes an output root; a lock left by a run that ended is taken over."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from moto_s3 import moto_bucket
from stages.lock import RootBusyError, RootLock

A = {"dag_id": "laion_pipeline", "run_id": "a"}
B = {"dag_id": "laion_pipeline", "run_id": "b"}


def test_a_free_root_is_taken_and_given_back(tmp_path: Path) -> None:
    lock = RootLock(str(tmp_path), A)
    assert lock.acquire(lambda holder: True, wait_seconds=0) == "taken"
    assert {k: lock.held_by()[k] for k in A} == A and "since" in lock.held_by()
    assert lock.acquire(lambda holder: True, wait_seconds=0) == "held"  # a retry of the same run
    assert not RootLock(str(tmp_path), B).release()  # only its holder gives it back
    assert lock.release() and lock.held_by() is None


def test_a_running_holder_keeps_it_and_the_error_names_it(tmp_path: Path) -> None:
    RootLock(str(tmp_path), A).acquire(lambda holder: True, wait_seconds=0)
    asked: list[Any] = []
    with pytest.raises(RootBusyError, match=r"_lock.json is held by run a of laion_pipeline .* still running"):
        RootLock(str(tmp_path), B).acquire(lambda holder: asked.append(holder) or True, wait_seconds=0)
    assert asked and asked[0]["run_id"] == "a"


def test_a_lock_whose_run_ended_is_taken_over(tmp_path: Path) -> None:
    RootLock(str(tmp_path), A).acquire(lambda holder: True, wait_seconds=0)  # run a was killed: never gave it back
    lock = RootLock(str(tmp_path), B)
    assert lock.acquire(lambda holder: holder["run_id"] != "a", wait_seconds=0) == "taken over"
    assert lock.held_by()["run_id"] == "b"


def test_a_waiting_run_starts_once_the_holder_gives_it_back(tmp_path: Path) -> None:
    first, second = RootLock(str(tmp_path), A), RootLock(str(tmp_path), B)
    first.acquire(lambda holder: True, wait_seconds=0)
    asked = threading.Event()
    outcome: list[str] = []

    def still_running(holder: Any) -> bool:
        asked.set()  # the second run is waiting now
        return True

    waiter = threading.Thread(target=lambda: outcome.append(second.acquire(still_running, wait_seconds=120, poll_seconds=0.05)))
    waiter.start()
    assert asked.wait(60)
    assert outcome == [] and first.held_by()["run_id"] == "a"
    first.release()
    waiter.join(120)
    assert outcome == ["taken"] and second.held_by()["run_id"] == "b"


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An output root on local disk, or in a bucket of a moto S3 server (conditional puts)."""
    if request.param == "local":
        yield str(tmp_path)
        return
    with moto_bucket(monkeypatch, f"lock-{uuid.uuid4().hex[:12]}") as bucket:  # moto's buckets outlive its servers
        yield f"s3://{bucket}/dataset"


def test_two_runs_racing_for_a_free_root_get_it_one_at_a_time(root: str) -> None:
    holders = [RootLock(root, {"dag_id": "d", "run_id": str(i)}) for i in range(8)]
    start = threading.Barrier(len(holders))
    won: list[str] = []

    def race(lock: RootLock) -> None:
        start.wait()
        try:
            lock.acquire(lambda holder: True, wait_seconds=0)
            won.append(lock.holder["run_id"])
        except RootBusyError:
            pass

    threads = [threading.Thread(target=race, args=(lock,)) for lock in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 1 and RootLock(root, {"dag_id": "d", "run_id": won[0]}).held_by()["run_id"] == won[0]


def test_creating_the_lock_never_overwrites_one(root: str) -> None:
    """The step two racing runs both reach (each saw no lock): the later create fails and
    leaves the earlier holder's lock whole, on local disk and on S3 (a conditional put)."""
    assert RootLock(root, A).acquire(lambda holder: True, wait_seconds=0) == "taken"
    assert RootLock(root, B)._create() is False
    assert RootLock(root, B).held_by()["run_id"] == "a"
