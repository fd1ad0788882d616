"""One thread that watches every posted NIXL write until it ends.

NIXL's Python API has no completion callback for the initiator: a posted transfer is polled
with ``check_xfer_state``. Polling each write in its own executor job costs a thread hand-off
per write and, with many writes in flight, a check per write per backoff step. Here one thread
keeps each peer's posted writes in posting order and checks them from the oldest: writes to a
peer end in about that order, so a pass costs one check per write that ended plus one per
peer for its first write still in progress, then a short sleep (``poll_s``, doubling up to
``max_poll_s`` while nothing ends). A stalled peer delays only its own writes. A write still
in progress at its deadline fails. Each write's future is a
``concurrent.futures.Future`` marked running, so cancelling the waiter never detaches it.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False, slots=True)
class _Posted:
    handle: Any
    future: cf.Future[None]
    deadline: float  # time.monotonic()
    where: str


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
    ) -> None:
        self._check, self._release, self._fail = check, release, fail
        self.poll_s, self.max_poll_s = poll_s, max_poll_s
        self._posted: dict[str, deque[_Posted]] = {}  # per peer, in posting order
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, handle: Any, timeout: float, where: str) -> cf.Future[None]:
        """The future of a posted write still in progress (``PROC``) to peer ``where``: done
        when it ends."""
        fut: cf.Future[None] = cf.Future()
        fut.set_running_or_notify_cancel()  # a waiter's cancel must not detach the write
        posted = _Posted(handle, fut, time.monotonic() + timeout, where)
        with self._cv:
            if self._stop:
                self._end(posted, "ERR: transport closed")
                return fut
            self._posted.setdefault(where, deque()).append(posted)
            self._cv.notify()
        return fut

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

    def _pass(self) -> bool:
        """Check each peer's oldest writes until one is still in progress; True if any ended."""
        with self._cv:
            heads = list(self._posted.items())
        ended = False
        for where, queue in heads:
            while queue:
                head = queue[0]
                try:
                    state = self._check(head.handle)
                except Exception as exc:
                    state = f"ERR: {exc}"
                if state == "PROC" and time.monotonic() < head.deadline:
                    break
                with self._cv:
                    queue.popleft()
                    if not queue and self._posted.get(where) is queue:
                        del self._posted[where]
                self._end(head, state)
                ended = True
        return ended

    def _run(self) -> None:
        delay = self.poll_s
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._posted) or self._stop)
                if self._stop:
                    left = [p for q in self._posted.values() for p in q]
                    self._posted.clear()
                    break
            if self._pass():
                delay = self.poll_s  # something ended: the next may be about to
            else:
                time.sleep(delay)
                delay = min(2 * delay, self.max_poll_s)
        for posted in left:
            self._end(posted, "ERR: transport closed")
