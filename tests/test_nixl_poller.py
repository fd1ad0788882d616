"""The NIXL completion poller, over a fake engine: each peer's writes end in its own order,
a stalled peer delays only its own, a write past its deadline fails, closing fails what is
left, every handle is released once, and a waiter's cancel does not detach a write."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest

from emtransfer.transport.nixl_poller import CompletionPoller

pytestmark = pytest.mark.timeout(30)


class FakeEngine:
    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.released: list[str] = []
        self.lock = threading.Lock()

    def check(self, handle: str) -> str:
        with self.lock:
            return self.state[handle]

    def release(self, handle: str) -> None:
        with self.lock:
            self.released.append(handle)

    def end(self, handle: str, state: str = "DONE") -> None:
        with self.lock:
            self.state[handle] = state


def _poller(engine: FakeEngine) -> CompletionPoller:
    return CompletionPoller(engine.check, engine.release, lambda why: RuntimeError(why))


def test_writes_end_per_peer_and_a_stalled_peer_delays_only_its_own() -> None:
    eng = FakeEngine()
    p = _poller(eng)
    try:
        for h in ("a1", "a2", "b1"):
            eng.state[h] = "PROC"
        fa1, fa2 = p.watch("a1", 20, "A"), p.watch("a2", 20, "A")
        fb1 = p.watch("b1", 20, "B")
        eng.end("b1")  # A's head still runs: B's write ends regardless
        assert fb1.result(5) is None
        assert not fa1.done() and not fa2.done()
        eng.end("a2")  # behind A's head: noticed once the head ends
        eng.end("a1", "ERR: NIXL_ERR_REMOTE_DISCONNECT")
        with pytest.raises(RuntimeError, match="failed"):
            fa1.result(5)
        assert fa2.result(5) is None
        assert sorted(eng.released) == ["a1", "a2", "b1"]
    finally:
        p.close()


def test_a_write_past_its_deadline_fails_and_close_fails_the_rest() -> None:
    eng = FakeEngine()
    p = _poller(eng)
    eng.state["slow"] = eng.state["left"] = "PROC"
    late = p.watch("slow", 0.05, "A")
    with pytest.raises(RuntimeError, match="timed out"):
        late.result(5)
    left = p.watch("left", 60, "B")
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        left.result(5)
    after = p.watch("after", 60, "B")  # a write posted after close fails at once
    with pytest.raises(RuntimeError, match="closed"):
        after.result(5)
    assert sorted(eng.released) == ["after", "left", "slow"]


def test_cancelling_a_waiter_does_not_detach_the_write() -> None:
    eng = FakeEngine()
    p = _poller(eng)
    try:
        eng.state["w"] = "PROC"
        fut = p.watch("w", 20, "A")
        assert not fut.cancel()  # running: the write is still the poller's
        eng.end("w")
        assert fut.result(5) is None and eng.released == ["w"]
        assert isinstance(fut, cf.Future)
    finally:
        p.close()
