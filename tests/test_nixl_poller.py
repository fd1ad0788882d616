"""The NIXL completion poller, over a fake engine: each peer's writes end in its own order,
a stalled peer delays only its own, a write past its deadline fails, closing fails what is
left, every handle is released once, and a waiter's cancel does not detach a write."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emtransfer.transport.nixl_poller import FIRST_CHECK, STEP, CompletionPoller, Rate, next_delay

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


POLL, MAX_POLL = 20e-6, 500e-6


def _checks(duration: float, expect: float) -> tuple[float, int]:
    """When a write of ``duration`` is noticed, and after how many checks, under the poller's
    schedule (:func:`next_delay`) with ``expect`` as its expected service time."""
    t, n = 0.0, 0
    while True:
        t += next_delay(t, expect, POLL, MAX_POLL)
        n += 1
        if t >= duration:
            return t, n


@given(
    duration=st.floats(1e-6, 0.2),
    guess=st.one_of(st.just(0.0), st.floats(0.05, 1.3)),
)
@settings(max_examples=300, deadline=None)
def test_a_write_is_noticed_soon_after_it_ends_with_few_checks(
    duration: float, guess: float
) -> None:
    """Whether the rate is unknown (0) or its guess anywhere up to a third too slow, a write
    is noticed at most an eighth of its duration (or one short poll) after it ended, and a
    well-guessed one after a handful of checks (a doubling backoff notices it up to its whole
    duration late)."""
    expect = guess * duration
    noticed, n = _checks(duration, expect)
    assert noticed - duration <= max(POLL, STEP * duration, FIRST_CHECK * expect - duration) + 1e-12
    assert noticed - duration <= MAX_POLL + 1e-12
    if 0.5 <= guess <= 1.3 and duration >= 10 * POLL:
        assert n <= 8 + duration / MAX_POLL, f"{n} checks for a write of {duration * 1e3:.3f} ms"


def test_the_rate_is_learnt_from_large_writes_and_follows_a_change() -> None:
    rate = Rate(weight=0.25, min_bytes=1 << 18)
    assert rate.expect(8 << 20) == 0.0  # nothing learnt: every write is checked from poll_s
    rate.learn(4 << 10, 1e-6)  # small writes are latency: no lesson
    rate.learn(8 << 20, 0.0)
    assert rate.bytes_per_s == 0.0
    rate.learn(8 << 20, 1e-3)
    assert rate.expect(8 << 20) == pytest.approx(1e-3)
    for _ in range(40):  # the engine got twice as fast
        rate.learn(8 << 20, 0.5e-3)
    assert rate.expect(8 << 20) == pytest.approx(0.5e-3, rel=0.01)


def test_a_write_queued_behind_another_is_timed_from_the_end_of_that_one() -> None:
    """Service time, not time since posting: the second write of a peer is expected to take
    its own time after the first ended, so the rate learnt is the engine's, not the queue's."""
    eng, now = FakeEngine(), [100.0]
    p = CompletionPoller(eng.check, eng.release, RuntimeError, clock=lambda: now[0])
    try:
        eng.state["a1"] = eng.state["a2"] = "PROC"
        f1, f2 = p.watch("a1", 20, "A", 1 << 20), p.watch("a2", 20, "A", 1 << 20)
        now[0] += 0.05  # a1 was 50 ms in service
        eng.end("a1")
        f1.result(5)
        assert p.rate_of("A").expect(1 << 20) == pytest.approx(0.05)
        now[0] += 0.001  # a2 ends 1 ms after a1, 51 ms after it was posted
        eng.end("a2")
        f2.result(5)
        # learnt from 1 ms: 0.75 x (1 MiB / 50 ms) + 0.25 x (1 MiB / 1 ms); from 51 ms it
        # would still expect about 50 ms
        assert p.rate_of("A").expect(1 << 20) == pytest.approx(1 / (0.75 / 0.05 + 0.25 / 0.001))
    finally:
        p.close()


def test_each_peer_has_its_own_rate_and_a_removed_peer_is_forgotten() -> None:
    """A peer on a slow link must not make the poller check a fast peer's writes late (or the
    other way round); what was learnt of a removed peer goes with it."""
    eng, now = FakeEngine(), [100.0]
    p = CompletionPoller(eng.check, eng.release, RuntimeError, clock=lambda: now[0])
    try:
        eng.state["fast"] = eng.state["slow"] = "PROC"
        fast, slow = p.watch("fast", 20, "A", 1 << 20), p.watch("slow", 20, "B", 1 << 20)
        now[0] += 0.001
        eng.end("fast")
        fast.result(5)
        now[0] += 0.099
        eng.end("slow")
        slow.result(5)
        assert p.rate_of("A").expect(1 << 20) == pytest.approx(0.001)
        assert p.rate_of("B").expect(1 << 20) == pytest.approx(0.1)
        p.forget("B")
        assert p.rate_of("B").expect(1 << 20) == 0.0
        assert p.rate_of("A").expect(1 << 20) == pytest.approx(0.001)
    finally:
        p.close()
