"""One thread that watches every posted NIXL write until it ends.

NIXL's Python API has no completion callback for the initiator: a posted transfer is polled
with ``check_xfer_state``. Polling each write in its own executor job costs a thread hand-off
per write and, with many writes in flight, a check per write per backoff step. Here one thread
keeps each peer's posted writes in posting order and checks them from the oldest: writes to a
peer end in about that order, so a pass costs one check per write that ended plus one per
peer for its first write still in progress, then a sleep until the next check is due
(:func:`next_delay`).

When that is: a write's service starts when it is posted or when the write before it to the
same peer ended, whichever is later. The poller learns each peer's rate from its writes that
ended (:class:`Rate`: one per peer, since peers on other links run at other speeds), does not check a write before three quarters of its expected service
time, and then checks it every eighth of the time it has been in service so far, always
within ``[poll_s, max_poll_s]``. A write is noticed at most an eighth of its time (or
``poll_s``) after it ended, with a handful of checks; a plain doubling backoff notices a
write up to its whole duration late (an 8 MiB write of 0.78 ms, noticed after 1.12 ms). A
stalled peer delays only its own writes. A write still in progress at its deadline fails.
Each write's future is a ``concurrent.futures.Future`` marked running, so cancelling the
waiter never detaches it.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: no check before this share of a write's expected service time, then steps of this share of
#: the time it has been in service (the lateness bound, relative to the write's duration)
FIRST_CHECK = 0.75
STEP = 1 / 8


def next_delay(elapsed: float, expect: float, poll_s: float, max_poll_s: float) -> float:
    """Seconds until the next check of a write ``elapsed`` seconds into its service and
    expected to take ``expect`` (0: unknown)."""
    step = max(FIRST_CHECK * expect - elapsed, STEP * elapsed)
    return min(max(step, poll_s), max_poll_s)


class Rate:
    """The engine's bytes per second, learnt from the service times of the writes that
    ended (a moving average; writes under ``min_bytes`` are mostly latency and teach
    nothing). Unknown until the first lesson: every write is then expected to take 0."""

    def __init__(self, *, weight: float = 0.25, min_bytes: int = 256 << 10) -> None:
        self.weight, self.min_bytes = weight, min_bytes
        self.bytes_per_s = 0.0

    def learn(self, nbytes: int, service_s: float) -> None:
        if nbytes < self.min_bytes or service_s <= 0:
            return
        rate = nbytes / service_s
        old = self.bytes_per_s
        self.bytes_per_s = rate if not old else old + self.weight * (rate - old)

    def expect(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_s if self.bytes_per_s else 0.0


@dataclass(eq=False, slots=True)
class _Posted:
    handle: Any
    future: cf.Future[None]
    deadline: float  # on the poller's clock
    where: str
    nbytes: int
    posted: float


class CompletionPoller:
    def __init__(
        self,
        check: Callable[[Any], str],
        release: Callable[[Any], None],
        fail: Callable[[str], Exception],
        *,
        poll_s: float = 20e-6,
        max_poll_s: float = 500e-6,
        name: str = "emtransfer-nixl-poll",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check, self._release, self._fail = check, release, fail
        self.poll_s, self.max_poll_s = poll_s, max_poll_s
        self._clock = clock  # for deadlines and service times (a test's own clock)
        self._posted: dict[str, deque[_Posted]] = {}  # per peer, in posting order
        self._last_end: dict[str, float] = {}  # per peer: when its last write was seen to end
        self._rates: dict[str, Rate] = {}  # per peer
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, handle: Any, timeout: float, where: str, nbytes: int = 0) -> cf.Future[None]:
        """The future of a posted write of ``nbytes`` still in progress (``PROC``) to peer
        ``where``: done when it ends."""
        fut: cf.Future[None] = cf.Future()
        fut.set_running_or_notify_cancel()  # a waiter's cancel must not detach the write
        now = self._clock()
        posted = _Posted(handle, fut, now + timeout, where, nbytes, now)
        with self._cv:
            if self._stop:
                self._end(posted, "ERR: transport closed")
                return fut
            self._posted.setdefault(where, deque()).append(posted)
            self._cv.notify()
        return fut

    def rate_of(self, where: str) -> Rate:
        """What the poller learnt of peer ``where``'s rate (nothing yet: a fresh one)."""
        with self._cv:
            return self._rates.get(where) or Rate()

    def forget(self, where: str) -> None:
        """The peer was removed: drop what was learnt of it."""
        with self._cv:
            self._rates.pop(where, None)

    def close(self) -> None:
        """Stop the thread; writes still watched fail (their handles are released)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(10)

    def _end(self, posted: _Posted, state: str) -> None:
        self._release(posted.handle)
        if state == "DONE":
            posted.future.set_result(None)
        elif state == "PROC":
            posted.future.set_exception(self._fail(f"write to {posted.where} timed out"))
        else:
            posted.future.set_exception(self._fail(f"write to {posted.where} failed ({state})"))

    def _pass(self) -> float | None:
        """Check each peer's oldest writes until one is still in progress; the seconds until
        the next check is due, None if nothing is left to watch."""
        with self._cv:
            heads = list(self._posted.items())
        delay: float | None = None
        for where, queue in heads:
            while queue:
                head = queue[0]
                try:
                    state = self._check(head.handle)
                except Exception as exc:
                    state = f"ERR: {exc}"
                now = self._clock()
                begun = max(head.posted, self._last_end.get(where, 0.0))
                rate = self._rates.get(where)
                if state == "PROC" and now < head.deadline:
                    expect = rate.expect(head.nbytes) if rate is not None else 0.0
                    wait = next_delay(now - begun, expect, self.poll_s, self.max_poll_s)
                    delay = wait if delay is None else min(delay, wait)
                    break
                with self._cv:
                    queue.popleft()
                    more = bool(queue)
                    if not more and self._posted.get(where) is queue:
                        del self._posted[where]
                    if state == "DONE":
                        if rate is None:
                            rate = self._rates[where] = Rate()
                        rate.learn(head.nbytes, now - begun)
                if more:  # the next write's service starts now
                    self._last_end[where] = now
                else:  # a write posted from now on starts its own
                    self._last_end.pop(where, None)
                self._end(head, state)
        return delay

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._posted) or self._stop)
                if self._stop:
                    left = [p for q in self._posted.values() for p in q]
                    self._posted.clear()
                    break
            delay = self._pass()
            if delay is not None:
                time.sleep(delay)
        for posted in left:
            self._end(posted, "ERR: transport closed")
