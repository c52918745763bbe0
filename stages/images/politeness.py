"""How the download guard treats the hosts it downloads from: a pace per host shared by
every thread and worker process of a download task, a cap on connections per host, and
backoff when a host answers 429/503.

img2dataset has none of these: its threads ask a host as fast as they can, and LAION's URLs
crowd on a few hosts (docs/safety.md, "Requests per host").

The pace is kept by a :class:`HostPacer`: for each of a fixed number of slots, the time the
slot's next request may start, in shared memory under one lock. A host is hashed to its
slot with a stable hash (a spawned worker's ``hash()`` has a seed of its own); hosts that
share a slot share its pace, which makes both slower, never faster. The download task
makes one pacer before its workers start and hands it to each of them
(:mod:`stages.images.img2dataset_patches`); a process that was handed none (a fetch
outside a download task) paces its own threads only.
"""

from __future__ import annotations

import ctypes
import random
import threading
import time
import zlib
from email.utils import parsedate_to_datetime
from multiprocessing.context import BaseContext
from typing import Callable

SLOTS = 1 << 16  # 512 KiB of doubles; among 500 hosts busy at once, about 2 pairs share a slot
BACKOFF_FIRST_SECONDS = 0.5


class HostPacer:
    """The time each host's next request may start, kept for every process that was handed
    this pacer (made with ``context``) or, without a context, for this process's threads."""

    def __init__(self, context: BaseContext | None = None, slots: int = SLOTS) -> None:
        if slots < 1:
            raise ValueError(f"a host pacer needs at least one slot, not {slots}")
        self.slots = slots
        if context is None:
            self._next = (ctypes.c_double * slots)()
            self._lock = threading.Lock()
        else:
            # Both made by the pool's own context: a lock made for forked workers cannot be
            # handed to spawned ones.
            self._next = context.RawArray(ctypes.c_double, slots)
            self._lock = context.Lock()

    def slot(self, host: str) -> int:
        return zlib.crc32(host.encode("utf-8", "surrogatepass")) % self.slots

    def reserve(self, host: str, rate: float, deadline: float | None = None) -> float | None:
        """Reserve ``host``'s next turn at ``rate`` requests per second and return its time
        (``time.monotonic()``, the same clock in every process of the machine); None, and
        nothing reserved, when the turn would not come before ``deadline``. A rate of 0 or
        less: no pace, the turn is now."""
        if rate <= 0:
            return time.monotonic()
        slot = self.slot(host)
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._next[slot])
            if deadline is not None and turn >= deadline:
                return None
            self._next[slot] = turn + 1.0 / rate
        return turn


_pacer: HostPacer | None = None
_pacer_lock = threading.Lock()


def install(pacer: HostPacer) -> None:
    """Pace this process's requests with ``pacer`` (a download task's worker, at its start)."""
    global _pacer
    _pacer = pacer


def current_pacer() -> HostPacer:
    """The pacer this process was handed, or one of its own."""
    global _pacer
    if _pacer is None:
        with _pacer_lock:
            if _pacer is None:
                _pacer = HostPacer()
    return _pacer


def reserve_turn(host: str, rate: float, deadline: float | None = None) -> float | None:
    """:meth:`HostPacer.reserve` on this process's pacer."""
    return current_pacer().reserve(host, rate, deadline)


def wait_turn(host: str, rate: float, deadline: float | None = None) -> float | None:
    """Wait for ``host``'s next turn; the seconds waited, or None (without waiting) when the
    turn would not come before ``deadline``."""
    asked = time.monotonic()
    turn = reserve_turn(host, rate, deadline)
    if turn is None:
        return None
    delay = turn - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return time.monotonic() - asked


_connection_slots: dict[str, threading.BoundedSemaphore] = {}
_connection_slots_lock = threading.Lock()


def connection_slots(host: str, limit: int) -> threading.BoundedSemaphore | None:
    """At most ``limit`` connections to one host at a time from this process (0: no cap)."""
    if limit <= 0:
        return None
    with _connection_slots_lock:
        # Keyed by the limit too: a policy with another cap must not inherit this one's slots.
        return _connection_slots.setdefault(f"{host}/{limit}", threading.BoundedSemaphore(limit))


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header's delay (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_seconds(attempt: int, longest: float, rng: Callable[[], float] = random.random) -> float:
    """The wait after the ``attempt``-th (from 0) busy answer without Retry-After: doubling
    from :data:`BACKOFF_FIRST_SECONDS` up to ``longest``, at a random point of its upper half,
    so that requests refused together do not come back together, and each waits at least
    half its step. ``random``'s own generator is reseeded in every forked worker."""
    ceiling = min(longest, BACKOFF_FIRST_SECONDS * 2.0 ** min(attempt, 32))
    return ceiling * (0.5 + rng() / 2)


class BusyAnswers:
    """How long one image waits before asking again after a 429/503 answer.

    A Retry-After is honoured once, when it is at most ``longest``; an answer without one
    (or with one that cannot be read) is backed off from (:func:`backoff_seconds`), again
    and again, up to the image's deadline. ``longest`` 0 turns backoff off.
    """

    def __init__(self, longest: float, rng: Callable[[], float] = random.random) -> None:
        self.longest, self.rng = longest, rng
        self.backoffs = 0
        self.honoured_retry_after = False

    def wait(self, retry_after: str | None, remaining: float) -> float | None:
        """Seconds to wait before asking again, or None to give up; ``remaining``: seconds
        left before the image's deadline, which the wait must end before."""
        delay = retry_after_seconds(retry_after)
        if delay is None:
            if self.longest <= 0:
                return None
            delay = backoff_seconds(self.backoffs, self.longest, self.rng)
            self.backoffs += 1
        elif self.honoured_retry_after or delay > self.longest:
            return None  # asking sooner than the server said would not be polite
        else:
            self.honoured_retry_after = True
        return delay if delay < remaining else None
