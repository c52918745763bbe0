"""A polite crawler: each host's pace kept by all of a download's workers and threads
together, and backoff with jitter when a host answers 429/503 without Retry-After.

The hosts are loopback sites (conftest's ``Site``); the download runs img2dataset itself,
its worker processes forked as in a task.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sampleweb.hostile import jpeg_bytes
from stages.images import politeness
from stages.images.download import DownloadSettings, download_part
from stages.images.img2dataset_patches import _PoolContext
from stages.images.politeness import BACKOFF_FIRST_SECONDS, BusyAnswers, HostPacer, backoff_seconds
from stages.images.safe_fetch import FetchPolicy, FetchRefused, fetch_image
from stages.processes import spawn_without_main

JPEG = jpeg_bytes()  # what conftest's sites serve at /good.jpg
LOOPBACK = ("127.0.0.0/8",)
WAIT = 60.0  # generous: the machine may be loaded
RATE = 5  # requests per second per host in the download test
# Turns come exactly 1/RATE apart, so a 1-second window holds at most RATE + 1 of them.
# Each request reaches the host a little after its turn (its thread wakes and connects, the
# server's thread starts); when those delays differ by up to d seconds, a window holds at
# most RATE * (1 + d) + 1 requests. The bound allows d = 0.4 s, a loaded machine. Workers
# that each kept a pace of their own would reach 2 * RATE, above it.
MOST_IN_ONE_SECOND = RATE + 3
SLOW = 0.01  # requests per second: turns 100 s apart, which no load can blur


def reply(handler: BaseHTTPRequestHandler, status: int) -> None:
    """200: the JPEG; any other status: a short text, without Retry-After."""
    body, kind = (JPEG, "image/jpeg") if status == 200 else (b"busy", "text/plain")
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class RateKeepingHost:
    """A route that answers like a host enforcing a rate: it notes when each request arrives
    (per Host header) and answers 429, without Retry-After, to one that makes more than
    ``allowed`` in the last second."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.refused = 0
        self._lock = threading.Lock()

    def __call__(self, handler: BaseHTTPRequestHandler) -> None:
        host = handler.headers.get("Host", "").rsplit(":", 1)[0]
        with self._lock:
            now = time.monotonic()
            arrivals = self.arrivals[host]
            arrivals.append(now)
            busy = sum(1 for t in arrivals if t > now - 1.0) > self.allowed
            self.refused += int(busy)
        reply(handler, 429 if busy else 200)

    def most_in_one_second(self, host: str) -> int:
        times = sorted(self.arrivals[host])
        most, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= 1.0:
                start += 1
            most = max(most, end - start + 1)
        return most


def answers(site: Any, path: str, statuses: Callable[[int], int]) -> list[float]:
    """Route ``path`` to answer its n-th request (from 0) with ``statuses(n)`` (200: the JPEG;
    others without Retry-After); returns the list the arrival times are appended to."""
    arrivals: list[float] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        arrivals.append(time.monotonic())
        reply(handler, statuses(len(arrivals) - 1))

    site.routes[path] = answer
    return arrivals


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


# The pace, end to end


def test_a_hosts_rate_is_kept_across_worker_processes_and_threads_and_every_image_arrives(sites, tmp_path: Path) -> None:
    site = sites()
    host = RateKeepingHost(allowed=MOST_IN_ONE_SECOND)
    urls = []
    for i in range(45):
        site.routes[f"/img/{i}.jpg"] = host
        urls.append(site.url(f"/img/{i}.jpg"))
    part = tmp_path / "part-00000.parquet"
    pd.DataFrame(
        {"SAMPLE_ID": range(len(urls)), "URL": urls, "TEXT": "a photo", "NSFW": "UNLIKELY", "similarity": 0.3, "LICENSE": "?"}
    ).to_parquet(part)
    settings = DownloadSettings(
        processes_count=2, thread_count=6, number_sample_per_shard=12, image_size=64, timeout=int(WAIT),
        fetch_policy=FetchPolicy(allowed_networks=LOOPBACK, max_requests_per_second_per_host=RATE),
    )  # fmt: skip

    numbers = download_part(str(part), str(tmp_path / "images"), settings, dedup_version="test")

    assert numbers["count"] == numbers["successes"] == len(urls)
    assert host.most_in_one_second("127.0.0.1") <= MOST_IN_ONE_SECOND
    assert host.refused == 0  # the same fact, as the host saw it: nothing had to be refused
    assert len(host.arrivals["127.0.0.1"]) == len(urls)


# The pace, unit by unit: turns are computed, so spacing them far apart makes them exact


def test_a_hosts_turns_are_spaced_by_its_rate_and_other_hosts_keep_their_own() -> None:
    pacer = HostPacer()
    turns = [pacer.reserve("paced.test", SLOW) for _ in range(4)]
    assert gaps(turns) == pytest.approx([1 / SLOW] * 3)
    assert pacer.slot("paced.test") != pacer.slot("other.test")
    assert pacer.reserve("other.test", SLOW) < turns[1]  # not held up by paced.test
    assert pacer.reserve("paced.test", 0) < turns[1]  # 0: no limit, and nothing reserved
    assert pacer.reserve("paced.test", SLOW) == pytest.approx(turns[-1] + 1 / SLOW)


def test_a_turn_that_would_come_after_the_deadline_is_refused_and_not_taken() -> None:
    pacer = HostPacer()
    first = pacer.reserve("paced.test", SLOW)
    assert pacer.reserve("paced.test", SLOW, deadline=first + 1 / SLOW / 2) is None
    assert pacer.reserve("paced.test", SLOW) == pytest.approx(first + 1 / SLOW)


def test_threads_take_distinct_turns() -> None:
    pacer = HostPacer()
    turns: list[float] = []
    ready = threading.Barrier(8)

    def take() -> None:
        ready.wait(WAIT)
        turns.extend(pacer.reserve("paced.test", SLOW) for _ in range(5))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert gaps(sorted(turns)) == pytest.approx([1 / SLOW] * 39)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_download_pools_workers_share_the_tasks_pace(start_method: str) -> None:
    pools = _PoolContext(start_method)
    with spawn_without_main(), pools.Pool(1) as pool:
        in_worker = [pool.apply(politeness.reserve_turn, ("shared.test", SLOW)) for _ in range(2)]
    assert gaps(in_worker) == pytest.approx([1 / SLOW])
    # The task process sees the worker's reservations: the next turn comes after them.
    assert pools.pacer.reserve("shared.test", SLOW) == pytest.approx(in_worker[-1] + 1 / SLOW)


@pytest.fixture
def pacer() -> Iterator[HostPacer]:
    """A pacer of the test's own for this process, so that turns other tests took do not count."""
    previous = politeness.current_pacer()
    politeness.install(HostPacer())
    yield politeness.current_pacer()
    politeness.install(previous)


def test_an_images_first_wait_for_its_turn_moves_its_deadline(sites, pacer: HostPacer) -> None:
    site = sites()
    rate = 1 / 4  # another image has just taken the host's turn: the next one is 4 s away
    pacer.reserve(site.address, rate)
    policy = FetchPolicy(allowed_networks=LOOPBACK, max_requests_per_second_per_host=rate, max_download_seconds=3)
    # The crawler's own pacing is not the server's doing: waited out, not a time limit.
    assert fetch_image(site.url("/good.jpg"), policy) == JPEG


def test_a_later_turn_past_the_images_deadline_is_refused_without_waiting(sites, pacer: HostPacer) -> None:
    site = sites()
    site.redirect("/hop", "/good.jpg")
    policy = FetchPolicy(allowed_networks=LOOPBACK, max_requests_per_second_per_host=SLOW, max_download_seconds=WAIT)
    asked = time.monotonic()
    with pytest.raises(FetchRefused, match="download_time_limit"):
        fetch_image(site.url("/hop"), policy)  # the first turn now, the hop's 100 s away
    answered = time.monotonic()
    assert [path for path, _ in site.requests] == ["/hop"]
    # The hop's turn was not taken: the host's next turn is the one after /hop's.
    assert asked + 1 / SLOW <= pacer.reserve(site.address, SLOW) <= answered + 1 / SLOW


# Backoff


def test_backoff_doubles_with_jitter_and_stays_within_the_longest_wait_and_the_deadline() -> None:
    longest, limit = 8.0, 30.0
    schedules = set()
    for seed in range(20):
        busy = BusyAnswers(longest, random.Random(seed).random)
        remaining, waits = limit, []
        while (wait := busy.wait(None, remaining)) is not None:
            waits.append(wait)
            remaining -= wait
        steps = [min(longest, BACKOFF_FIRST_SECONDS * 2**n) for n in range(len(waits))]
        assert all(step / 2 <= wait <= step for wait, step in zip(waits, steps)), (waits, steps)
        assert sum(waits) <= limit and len(waits) >= 4  # the first four take 7.5 s at most
        schedules.add(tuple(waits))
    assert len(schedules) == 20  # jittered: no two seeds wait alike
    assert backoff_seconds(1000, longest) <= longest  # no overflow, however many attempts


def test_retry_after_is_honoured_once_and_backoff_only_when_allowed() -> None:
    assert BusyAnswers(0).wait(None, 30) is None  # max_retry_after_seconds 0: no backoff
    assert BusyAnswers(0).wait("0", 30) == 0  # but Retry-After: 0 is honoured
    busy = BusyAnswers(10)
    assert busy.wait("2", 30) == 2 and busy.wait("2", 30) is None  # once
    assert BusyAnswers(10).wait("11", 30) is None  # longer than we would wait: give up
    assert BusyAnswers(10).wait("5", 4) is None  # past the image's deadline
    assert 0 < BusyAnswers(10).wait("soon", 30) <= BACKOFF_FIRST_SECONDS  # unreadable: backoff


def test_a_busy_host_without_retry_after_is_asked_again_after_growing_waits(sites) -> None:
    site = sites()
    arrivals = answers(site, "/busy.jpg", lambda n: [503, 429][n] if n < 2 else 200)
    policy = FetchPolicy(allowed_networks=LOOPBACK, max_retry_after_seconds=4, max_download_seconds=WAIT)
    assert fetch_image(site.url("/busy.jpg"), policy) == JPEG
    assert len(arrivals) == 3
    first, second = gaps(arrivals)
    # Each wait at least half its step of the schedule (0.5 s, then 1 s): asked again later, not at once.
    assert first >= BACKOFF_FIRST_SECONDS / 2 and second >= BACKOFF_FIRST_SECONDS


def test_a_host_that_stays_busy_is_given_up_on_within_the_images_limit(sites) -> None:
    site = sites()
    arrivals = answers(site, "/busy.jpg", lambda n: 429)
    policy = FetchPolicy(allowed_networks=LOOPBACK, max_retry_after_seconds=1, max_download_seconds=5)
    with pytest.raises(FetchRefused) as refused:
        fetch_image(site.url("/busy.jpg"), policy)
    # http_429 when the next wait would pass the limit; download_time_limit when the last
    # request itself ran into it (a loaded machine).
    assert str(refused.value) in ("http_429", "download_time_limit")
    assert len(arrivals) >= 2 and min(gaps(arrivals)) >= BACKOFF_FIRST_SECONDS / 2


def test_without_backoff_a_busy_answer_is_the_images_status(sites) -> None:
    site = sites()
    arrivals = answers(site, "/busy.jpg", lambda n: 503)
    policy = FetchPolicy(allowed_networks=LOOPBACK, max_retry_after_seconds=0)
    with pytest.raises(FetchRefused, match="http_503"):
        fetch_image(site.url("/busy.jpg"), policy)
    assert len(arrivals) == 1


# The documentation


def test_the_safety_doc_states_the_politeness_defaults() -> None:
    policy = FetchPolicy()
    safety = (Path(__file__).parents[3] / "docs" / "safety.md").read_text()
    row = next(line for line in safety.splitlines() if line.startswith("|") and "`max_requests_per_second_per_host`" in line)
    assert f"{policy.max_requests_per_second_per_host:g} requests per second" in row
    assert re.search(r"test_politeness\.py", row)
