"""The receiver (language side) machine: every transition of its table under every transport's
guarantees, every chunk check, every invalid event. Pure unit tests: events in, state and
actions out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_samples import (
    GUARANTEES,
    KINDS,
    SAMPLE_EVENTS,
    all_event_types,
    assert_refused,
    assert_timeouts_name_settings,
    invalid_pairs,
)

from emtransfer.errors import (
    AllocationTimeout,
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from emtransfer.errors import PeerLost as PeerLostError
from emtransfer.guarantees import NONE, Guarantees
from emtransfer.protocol import events as ev
from emtransfer.protocol.events import (
    AbortAckReceived,
    AbortReceived,
    Alloc,
    AllocGranted,
    ChunkReceived,
    Complete,
    DataReady,
    Deliver,
    Event,
    Fail,
    Fence,
    Fenced,
    FenceFailed,
    Free,
    InitReceived,
    LocalAbort,
    PeerLost,
    Prefetch,
    Prefetched,
    PrefetchRefused,
    Quarantine,
    ReleaseQuarantine,
    ResumeReceived,
    SendAbort,
    SendInit,
    SendResume,
    Start,
    TearDownPeer,
    Timeout,
    TotalReceived,
    WriteDone,
    WriteFailed,
)
from emtransfer.protocol.machine import GRANT_EXPIRY
from emtransfer.protocol.receiver import ReceiverMachine, ReceiverState
from emtransfer.settings import Settings

R = ReceiverState
RID = "req-r"
B = 4  # block size
DEFAULT = 8  # default_tokens: two blocks
META = {"mrope_position_delta": -2}
DIGEST = "sha256:beef"
BLOCKS0 = (5, 2)  # round 0 allocation (scrambled on purpose)
BLOCKS1 = (1, 7, 3)  # round 1 allocation
#: a write that completed on the sender is in our pool: its AbortAck (or Abort) is a proof
RC = tuple(k for k in KINDS if GUARANTEES[k].remote_completion)
NO_RC = tuple(k for k in KINDS if not GUARANTEES[k].remote_completion)
STOPPED = PeerLost("p", inbound_stopped=True)  # the transport's remove_peer stopped its writes
OPEN = PeerLost("p", inbound_stopped=False)  # it could not: writes may still land
TEAR_DOWN = TearDownPeer(f"rid={RID!r}: no AbortAck within abort_ack_timeout")

# ----------------------------------------------------------------------- action matchers


class FailWith:
    """Matches ``Fail`` whose error is exactly ``cls`` and whose message holds ``parts``.
    (``Fail.error`` is excluded from dataclass equality, so plain ``==`` would not check it.)"""

    def __init__(self, cls: type[Exception], *parts: str) -> None:
        self.cls, self.parts = cls, (f"rid={RID!r}", *parts)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Fail)
            and type(other.error) is self.cls
            and all(p in str(other.error) for p in self.parts)
        )

    def __repr__(self) -> str:
        return f"Fail({self.cls.__name__}{self.parts})"


class AbortWith:
    """Matches ``SendAbort`` whose reason holds every one of ``parts``."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SendAbort) and all(p in other.reason for p in self.parts)

    def __repr__(self) -> str:
        return f"SendAbort(...{self.parts})"


# -------------------------------------------------------------------- driving into states


def new(g: Guarantees, max_tokens: int | None = None) -> ReceiverMachine:
    return ReceiverMachine(
        RID, block_size=B, default_tokens=DEFAULT, guarantees=g, max_tokens=max_tokens
    )


def chunk(rnd: int, start: int, count: int, total: int, last: bool) -> ChunkReceived:
    return ChunkReceived(
        rnd, start, count, total, last, META if last else None, DIGEST if last else None
    )


def feed(m: ReceiverMachine, *events: Event) -> list[ev.Action]:
    acts: list[ev.Action] = []
    for e in events:
        acts = m.handle(e)
    return acts


def allocating(
    g: Guarantees,
    expected: int | None = None,
    whole: bool = False,
    max_tokens: int | None = None,
) -> ReceiverMachine:
    m = new(g, max_tokens)
    want = expected or DEFAULT
    assert feed(m, Start(expected, whole)) == [Alloc(want, want)]  # round 0: whole
    return m


def wait_chunk(
    g: Guarantees,
    expected: int | None = None,
    whole: bool = False,
    max_tokens: int | None = None,
) -> ReceiverMachine:
    """Round 0: the default allocation (8 tokens in BLOCKS0) was granted and announced."""
    m = allocating(g, expected, whole, max_tokens)
    cap = expected or DEFAULT
    (init,) = feed(m, AllocGranted(BLOCKS0, cap))
    # expected_tokens is left out here: test_start_with_expected_tokens_announces_them_in_init
    assert isinstance(init, SendInit) and (init.blocks, init.capacity_tokens) == (BLOCKS0, cap)
    return m


def allocating1(g: Guarantees, total: int = 20, max_tokens: int | None = None) -> ReceiverMachine:
    """Round 0 carried 8 of ``total`` tokens; the allocation for round 1 is requested."""
    m = wait_chunk(g, max_tokens=max_tokens)
    acts = feed(m, chunk(0, 0, DEFAULT, total, False))
    assert acts == [Deliver(0, 0, DEFAULT), Free(0), Alloc(total - DEFAULT, 1)]
    return m


def wait_chunk1(
    g: Guarantees, total: int = 20, cap: int = 12, max_tokens: int | None = None
) -> ReceiverMachine:
    m = allocating1(g, total, max_tokens)
    assert feed(m, AllocGranted(BLOCKS1, cap)) == [SendResume(1, BLOCKS1, cap, DEFAULT)]
    return m


def totalled(g: Guarantees, total: int = 20, max_tokens: int | None = None) -> ReceiverMachine:
    """Round 0 (8 tokens) on the wire; the sender said the payload has ``total`` tokens: the
    next round's blocks are asked for now (its least: a Resume round's, 1 here)."""
    m = wait_chunk(g, max_tokens=max_tokens)
    assert feed(m, TotalReceived(total)) == [Prefetch(total - DEFAULT, 1)]
    return m


def prefetched(g: Guarantees, total: int = 20, cap: int = 12) -> ReceiverMachine:
    """... and granted at once: round 1's Resume left while round 0 is still written."""
    m = totalled(g, total)
    assert feed(m, Prefetched(BLOCKS1, cap)) == [SendResume(1, BLOCKS1, cap, DEFAULT)]
    assert (m.state, m.round, m.ahead) == (R.WAIT_CHUNK, 0, cap)
    return m


def pipelined1(g: Guarantees) -> ReceiverMachine:
    """Round 0's chunk is in: round 1 (prefetched, 12 of 20 tokens) is awaited, nothing more
    is asked for (the payload ends with it)."""
    m = prefetched(g)
    assert feed(m, chunk(0, 0, DEFAULT, 20, False)) == [Deliver(0, 0, DEFAULT), Free(0)]
    assert (m.state, m.round, m.ahead) == (R.WAIT_CHUNK, 1, None)
    return m


def quarantined(g: Guarantees) -> ReceiverMachine:
    """Gave up on round 0 (chunk timeout): the allocation is quarantined, the sender told."""
    m = wait_chunk(g)
    feed(m, Timeout())
    assert m.state is R.QUARANTINED
    return m


def expiring(g: Guarantees) -> ReceiverMachine:
    """The peer was lost in round 1 and its writes could not be stopped."""
    m = wait_chunk1(g)
    assert feed(m, OPEN) == [Quarantine(), FailWith(PeerLostError, "p")]
    assert m.state is R.EXPIRING
    return m


def torn_down(g: Guarantees) -> ReceiverMachine:
    """No AbortAck within abort_ack_timeout: the peer is torn down, the blocks wait."""
    m = quarantined(g)
    assert feed(m, Timeout()) == [TEAR_DOWN]
    assert m.state is R.EXPIRING
    return m


def done(g: Guarantees) -> ReceiverMachine:
    m = wait_chunk(g)
    feed(m, chunk(0, 0, 5, 5, True))
    assert m.state is R.DONE
    return m


def failed(g: Guarantees) -> ReceiverMachine:
    m = new(g)
    feed(m, LocalAbort("bye"))
    assert m.state is R.FAILED
    return m


def released(g: Guarantees) -> ReceiverMachine:
    """FAILED after a quarantine that was released by a fence."""
    m = quarantined(g)
    assert feed(m, Fenced()) == [ReleaseQuarantine()]
    assert m.state is R.FAILED
    return m


Builder = Callable[[Guarantees], ReceiverMachine]

#: a fresh machine in every state, by a legal path (under any guarantees)
STATE_PATHS: dict[ReceiverState, Builder] = {
    R.NEW: new,
    R.ALLOCATING: allocating,
    R.WAIT_CHUNK: wait_chunk,
    R.QUARANTINED: quarantined,
    R.EXPIRING: expiring,
    R.DONE: done,
    R.FAILED: failed,
}

# --------------------------------------------------------------------- transition table


@dataclass(frozen=True)
class Case:
    id: str
    build: Builder
    start: ReceiverState
    event: Event
    end: ReceiverState
    #: the actions, or a function of the guarantees giving them
    actions: list[Any] | Callable[[Guarantees], list[Any]]
    #: the guarantee kinds (protocol_samples.GUARANTEES) this outcome holds for
    kinds: tuple[str, ...] = KINDS

    def expected(self, g: Guarantees) -> list[Any]:
        return self.actions(g) if callable(self.actions) else self.actions


PE = ProtocolError
TT = TransferTimeout
TA = TransferAborted


def give_up(*, abort: Any | None, fail: Any) -> Callable[[Guarantees], list[Any]]:
    """Giving up while a write may land: quarantine, fence where the engine fences, tell the
    sender (unless it aborted), fail. (test_give_up_fences_only_where_the_engine_fences checks
    the fence by kind name.)"""

    def expected(g: Guarantees) -> list[Any]:
        fence: list[Any] = [Fence()] if g.fences_tag else []
        tell: list[Any] = [abort] if abort is not None else []
        return [Quarantine(), *fence, *tell, fail]

    return expected


def chunk_error(*parts: str) -> Callable[[Guarantees], list[Any]]:
    return give_up(abort=AbortWith("protocol error: ", *parts), fail=FailWith(PE, *parts))


# In round 0: capacity 8, nothing received, total unknown. Each breaks exactly one rule.
BAD_CHUNKS_ROUND0 = [
    ("wrong-round-ahead", chunk(1, 0, 8, 20, False), "ChunkDone for round 1, expected round 0"),
    ("wrong-start-ahead", chunk(0, 4, 8, 20, False), "starts at token 4, 0 were received"),
    ("count-over-capacity", chunk(0, 0, 9, 20, False), "count 9 exceeds the allocation's 8"),
    ("past-total", chunk(0, 0, 8, 5, True), "tokens [0, 8) run past total 5"),
    ("last-but-not-flagged", chunk(0, 0, 8, 8, False), "is_last=False but 8 of 8 tokens"),
    ("flagged-but-not-last", chunk(0, 0, 8, 20, True), "is_last=True but 8 of 20 tokens"),
    ("part-filled", chunk(0, 0, 4, 20, False), "count 4 leaves the allocation part-filled"),
    ("part-filled-fits-rest", chunk(0, 0, 5, 6, False), "count 5 leaves the allocation"),
]
# In round 1: capacity 12, 8 received, total 20 known.
BAD_CHUNKS_ROUND1 = [
    ("wrong-round-behind", chunk(0, 8, 12, 20, True), "ChunkDone for round 0, expected round 1"),
    ("wrong-round-repeat", chunk(0, 0, 8, 20, False), "for round 0, expected round 1"),
    ("wrong-start-behind", chunk(1, 0, 12, 20, False), "starts at token 0, 8 were received"),
    ("count-over-capacity", chunk(1, 8, 13, 21, True), "count 13 exceeds the allocation's 12"),
    ("total-changed-up", chunk(1, 8, 12, 21, False), "total_tokens changed from 20 to 21"),
    ("total-changed-down", chunk(1, 8, 11, 19, True), "total_tokens changed from 20 to 19"),
    ("last-but-not-flagged", chunk(1, 8, 12, 20, False), "is_last=False but 20 of 20"),
    ("part-filled", chunk(1, 8, 6, 20, False), "count 6 leaves the allocation part-filled"),
]
# With max_tokens=16: a total above it is refused, whatever else the chunk says.
BAD_CHUNKS_MAX = [
    (
        "over-max-round0",
        lambda g: wait_chunk(g, max_tokens=16),
        chunk(0, 0, 8, 17, False),
        "total_tokens 17 exceeds max_tokens=16",
    ),
    (
        "far-over-max-last",
        lambda g: wait_chunk(g, max_tokens=16),
        chunk(0, 0, 8, 10**9, True),
        "total_tokens 1000000000 exceeds max_tokens=16",
    ),
    # checked before the total's consistency: a growing total says so
    (
        "over-max-round1",
        lambda g: wait_chunk1(g, total=16, cap=8, max_tokens=16),
        chunk(1, 8, 8, 17, False),
        "total_tokens 17 exceeds max_tokens=16",
    ),
]

CASES: list[Case] = [
    # -- NEW
    Case("start-default", new, R.NEW, Start(), R.ALLOCATING, [Alloc(DEFAULT, DEFAULT)]),
    Case("start-expected", new, R.NEW, Start(300), R.ALLOCATING, [Alloc(300, 300)]),
    Case("start-expected-small", new, R.NEW, Start(1), R.ALLOCATING, [Alloc(1, 1)]),
    # the lease needs the first allocation in one piece
    Case("start-whole", new, R.NEW, Start(300, whole=True), R.ALLOCATING, [Alloc(300, 300)]),
    Case(
        "start-whole-default",
        new,
        R.NEW,
        Start(whole=True),
        R.ALLOCATING,
        [Alloc(DEFAULT, DEFAULT)],
    ),
    Case("new-local-abort", new, R.NEW, LocalAbort("x"), R.FAILED, [FailWith(TA, "x")]),
    # -- ALLOCATING, round 0: nothing to tell the sender yet
    Case(
        "granted-round0",
        allocating,
        R.ALLOCATING,
        AllocGranted((6, 0, 3), 10),
        R.WAIT_CHUNK,
        [SendInit((6, 0, 3), 10, None)],
    ),
    Case(
        "granted-round0-part",
        allocating,
        R.ALLOCATING,
        AllocGranted((6,), 3),
        R.WAIT_CHUNK,
        [SendInit((6,), 3, None)],
    ),
    Case(
        "granted-round1",
        allocating1,
        R.ALLOCATING,
        AllocGranted(BLOCKS1, 12),
        R.WAIT_CHUNK,
        [SendResume(1, BLOCKS1, 12, 8)],
    ),
    Case(
        "granted-round1-part",
        allocating1,
        R.ALLOCATING,
        AllocGranted((0,), 2),
        R.WAIT_CHUNK,
        [SendResume(1, (0,), 2, 8)],
    ),
    Case(
        "alloc-timeout-round0",
        allocating,
        R.ALLOCATING,
        Timeout(),
        R.FAILED,
        # the sender may hold an Encode job's result for our Init: a retry must not find it
        [AbortWith("no allocation for round 0"), FailWith(AllocationTimeout, "round 0")],
    ),
    Case(
        "alloc-timeout-round1",
        allocating1,
        R.ALLOCATING,
        Timeout(),
        R.FAILED,
        [AbortWith("no allocation for round 1"), FailWith(AllocationTimeout, "round 1")],
    ),
    Case(
        "alloc-local-abort-round0",
        allocating,
        R.ALLOCATING,
        LocalAbort("c"),
        R.FAILED,
        [AbortWith("c"), FailWith(TA, "c")],
    ),
    Case(
        "alloc-local-abort-round1",
        allocating1,
        R.ALLOCATING,
        LocalAbort("c"),
        R.FAILED,
        [AbortWith("c"), FailWith(TA, "c")],
    ),
    # nothing is allocated while ALLOCATING: no Free, no quarantine, whatever the engine
    Case(
        "alloc-abort",
        allocating1,
        R.ALLOCATING,
        AbortReceived("s"),
        R.FAILED,
        [FailWith(TA, "aborted by sender: s")],
    ),
    Case(
        "alloc-lost",
        allocating1,
        R.ALLOCATING,
        PeerLost("p"),
        R.FAILED,
        [FailWith(PeerLostError, "p")],
    ),
    Case(
        "alloc-lost-open",
        allocating1,
        R.ALLOCATING,
        OPEN,
        R.FAILED,
        [FailWith(PeerLostError, "p")],
    ),
    # -- WAIT_CHUNK: valid chunks
    Case(
        "chunk-last-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        chunk(0, 0, 5, 5, True),
        R.DONE,
        [Deliver(0, 0, 5), Free(0), Complete(5, META, DIGEST)],
    ),
    Case(
        "chunk-last-exact-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 8, True),
        R.DONE,
        [Deliver(0, 0, 8), Free(0), Complete(8, META, DIGEST)],
    ),
    Case(
        "chunk-more-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 2000, False),
        R.ALLOCATING,
        [Deliver(0, 0, 8), Free(0), Alloc(1992, 1)],
    ),
    Case(
        "chunk-last-round1",
        wait_chunk1,
        R.WAIT_CHUNK,
        chunk(1, 8, 12, 20, True),
        R.DONE,
        [Deliver(1, 8, 12), Free(1), Complete(20, META, DIGEST)],
    ),
    Case(
        "chunk-more-round1",
        lambda g: wait_chunk1(g, 30),
        R.WAIT_CHUNK,
        chunk(1, 8, 12, 30, False),
        R.ALLOCATING,
        [Deliver(1, 8, 12), Free(1), Alloc(10, 1)],
    ),
    # a total of exactly max_tokens is accepted
    Case(
        "chunk-at-max-tokens",
        lambda g: wait_chunk(g, max_tokens=16),
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 16, False),
        R.ALLOCATING,
        [Deliver(0, 0, 8), Free(0), Alloc(8, 1)],
    ),
    Case(
        "chunk-last-at-max-tokens",
        lambda g: wait_chunk1(g, total=16, cap=8, max_tokens=16),
        R.WAIT_CHUNK,
        chunk(1, 8, 8, 16, True),
        R.DONE,
        [Deliver(1, 8, 8), Free(1), Complete(16, META, DIGEST)],
    ),
    # lease: a single round stays in place, not copied out, not freed here
    Case(
        "chunk-whole-in-place",
        lambda g: wait_chunk(g, 8, whole=True),
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 8, True),
        R.DONE,
        [Complete(8, META, DIGEST, in_place=True)],
    ),
    Case(
        "chunk-whole-short-in-place",
        lambda g: wait_chunk(g, 8, whole=True),
        R.WAIT_CHUNK,
        chunk(0, 0, 6, 6, True),
        R.DONE,
        [Complete(6, META, DIGEST, in_place=True)],
    ),
    # lease with a longer payload than announced: rounds, copied out (and not whole any more)
    Case(
        "chunk-whole-but-longer",
        lambda g: wait_chunk(g, 8, whole=True),
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 20, False),
        R.ALLOCATING,
        [Deliver(0, 0, 8), Free(0), Alloc(12, 1)],
    ),
    # -- WAIT_CHUNK, pipelined resume: the sender's Total, the prefetch's answer
    Case(
        "total-round0", wait_chunk, R.WAIT_CHUNK, TotalReceived(30), R.WAIT_CHUNK, [Prefetch(22, 1)]
    ),
    # a payload that fits round 0 needs nothing more (a sender says Total only when it does not)
    Case("total-fits", wait_chunk, R.WAIT_CHUNK, TotalReceived(8), R.WAIT_CHUNK, []),
    Case(
        "total-over-max",
        lambda g: wait_chunk(g, max_tokens=16),
        R.WAIT_CHUNK,
        TotalReceived(17),
        R.QUARANTINED,
        chunk_error("Total: total_tokens 17 exceeds max_tokens=16"),
    ),
    Case(
        "total-changed",
        wait_chunk1,
        R.WAIT_CHUNK,
        TotalReceived(21),
        R.QUARANTINED,
        chunk_error("Total: total_tokens changed from 20 to 21"),
    ),
    Case(
        "total-behind",
        wait_chunk1,
        R.WAIT_CHUNK,
        TotalReceived(8),
        R.QUARANTINED,
        chunk_error("Total: total_tokens changed from 20 to 8"),
    ),
    Case(
        "prefetched",
        totalled,
        R.WAIT_CHUNK,
        Prefetched((0, 9), 8),
        R.WAIT_CHUNK,
        [SendResume(1, (0, 9), 8, DEFAULT)],
    ),
    Case("prefetch-refused", totalled, R.WAIT_CHUNK, PrefetchRefused(), R.WAIT_CHUNK, []),
    # round 0 is in while round 1's grant is out: free round 0 only, wait for round 1
    Case(
        "chunk-pipelined",
        prefetched,
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 20, False),
        R.WAIT_CHUNK,
        [Deliver(0, 0, 8), Free(0)],
    ),
    # ... and where more follow round 1, prefetch round 2 at once
    Case(
        "chunk-pipelined-more",
        lambda g: prefetched(g, total=30),
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 30, False),
        R.WAIT_CHUNK,
        [Deliver(0, 0, 8), Free(0), Prefetch(10, 1)],
    ),
    Case(
        "chunk-pipelined-last",
        pipelined1,
        R.WAIT_CHUNK,
        chunk(1, 8, 12, 20, True),
        R.DONE,
        [Deliver(1, 8, 12), Free(1), Complete(20, META, DIGEST)],
    ),
    # giving up with two grants out: both are quarantined (one Quarantine holds all)
    Case(
        "prefetched-timeout",
        prefetched,
        R.WAIT_CHUNK,
        Timeout(),
        R.QUARANTINED,
        give_up(abort=AbortWith("receiver timeout"), fail=FailWith(TT, "no payload")),
    ),
    Case(
        "prefetched-abort-proof",
        prefetched,
        R.WAIT_CHUNK,
        AbortReceived("s"),
        R.FAILED,
        [Free(), FailWith(TA, "aborted by sender: s")],
        kinds=RC,
    ),
    Case(
        "prefetched-lost-open",
        prefetched,
        R.WAIT_CHUNK,
        OPEN,
        R.EXPIRING,
        [Quarantine(), FailWith(PeerLostError, "p")],
    ),
    # a wrong chunk of the pipelined round 1 (it says round 0 again)
    Case(
        "chunk-pipelined-repeat",
        pipelined1,
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 20, False),
        R.QUARANTINED,
        chunk_error("ChunkDone for round 0, expected round 1"),
    ),
    # -- WAIT_CHUNK: invalid chunks give up on the round: quarantine, fence, tell, fail
    *[
        Case(f"chunk0-{name}", wait_chunk, R.WAIT_CHUNK, bad, R.QUARANTINED, chunk_error(why))
        for name, bad, why in BAD_CHUNKS_ROUND0
    ],
    *[
        Case(f"chunk1-{name}", wait_chunk1, R.WAIT_CHUNK, bad, R.QUARANTINED, chunk_error(why))
        for name, bad, why in BAD_CHUNKS_ROUND1
    ],
    *[
        Case(f"chunk-{name}", build, R.WAIT_CHUNK, bad, R.QUARANTINED, chunk_error(why))
        for name, build, bad, why in BAD_CHUNKS_MAX
    ],
    # -- WAIT_CHUNK: giving up locally
    Case(
        "chunk-timeout",
        wait_chunk,
        R.WAIT_CHUNK,
        Timeout(),
        R.QUARANTINED,
        give_up(
            abort=AbortWith("receiver timeout"),
            fail=FailWith(TT, "has no payload for this rid after chunk_timeout"),
        ),
    ),
    Case(
        "chunk-timeout-round1",
        wait_chunk1,
        R.WAIT_CHUNK,
        Timeout(),
        R.QUARANTINED,
        give_up(abort=AbortWith("receiver timeout"), fail=FailWith(TT, "round 1")),
    ),
    Case(
        "chunk-local-abort",
        wait_chunk,
        R.WAIT_CHUNK,
        LocalAbort("c"),
        R.QUARANTINED,
        give_up(abort=AbortWith("c"), fail=FailWith(TA, "c")),
    ),
    # -- WAIT_CHUNK: the sender aborted (only once no write of its own is in flight). Where a
    # completed write is in our pool that proves nothing more lands: free at once...
    Case(
        "chunk-abort-proof",
        wait_chunk,
        R.WAIT_CHUNK,
        AbortReceived("s"),
        R.FAILED,
        [Free(), FailWith(TA, "aborted by sender: s")],
        kinds=RC,
    ),
    Case(
        "chunk-abort-proof-round1",
        wait_chunk1,
        R.WAIT_CHUNK,
        AbortReceived("s"),
        R.FAILED,
        [Free(), FailWith(TA, "aborted by sender: s")],
        kinds=RC,
    ),
    # ... elsewhere its bytes may still be on the way: quarantine (the sender needs no Abort)
    Case(
        "chunk-abort-no-proof",
        wait_chunk,
        R.WAIT_CHUNK,
        AbortReceived("s"),
        R.QUARANTINED,
        give_up(abort=None, fail=FailWith(TA, "aborted by sender: s")),
        kinds=NO_RC,
    ),
    Case(
        "chunk-abort-no-proof-round1",
        wait_chunk1,
        R.WAIT_CHUNK,
        AbortReceived("s"),
        R.QUARANTINED,
        give_up(abort=None, fail=FailWith(TA, "aborted by sender: s")),
        kinds=NO_RC,
    ),
    # -- WAIT_CHUNK: the peer is gone. The transport says whether its writes were stopped
    Case(
        "chunk-lost-stopped",
        wait_chunk1,
        R.WAIT_CHUNK,
        STOPPED,
        R.FAILED,
        [Free(), FailWith(PeerLostError, "p")],
    ),
    Case(
        "chunk-lost-stopped-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        PeerLost("gone"),  # inbound_stopped defaults to True
        R.FAILED,
        [Free(), FailWith(PeerLostError, "gone")],
    ),
    # no ack can come any more: quarantined until the grant's expiry; no Abort, no fence
    Case(
        "chunk-lost-open",
        wait_chunk1,
        R.WAIT_CHUNK,
        OPEN,
        R.EXPIRING,
        [Quarantine(), FailWith(PeerLostError, "p")],
    ),
    Case(
        "chunk-lost-open-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        OPEN,
        R.EXPIRING,
        [Quarantine(), FailWith(PeerLostError, "p")],
    ),
    # -- QUARANTINED: released once nothing can land any more
    Case(
        "quarantine-fenced", quarantined, R.QUARANTINED, Fenced(), R.FAILED, [ReleaseQuarantine()]
    ),
    # the fence failed: wait for another proof, or the deadline
    Case(
        "quarantine-fence-failed",
        quarantined,
        R.QUARANTINED,
        FenceFailed("busy"),
        R.QUARANTINED,
        [],
    ),
    Case(
        "quarantine-ack-proof",
        quarantined,
        R.QUARANTINED,
        AbortAckReceived(),
        R.FAILED,
        [ReleaseQuarantine()],
        kinds=RC,
    ),
    Case(
        "quarantine-ack-no-proof",
        quarantined,
        R.QUARANTINED,
        AbortAckReceived(),
        R.QUARANTINED,
        [],
        kinds=NO_RC,
    ),
    # an Abort that crossed ours comes only once the sender's write ended: like an AbortAck
    Case(
        "quarantine-abort-proof",
        quarantined,
        R.QUARANTINED,
        AbortReceived("s"),
        R.FAILED,
        [ReleaseQuarantine()],
        kinds=RC,
    ),
    Case(
        "quarantine-abort-no-proof",
        quarantined,
        R.QUARANTINED,
        AbortReceived("s"),
        R.QUARANTINED,
        [],
        kinds=NO_RC,
    ),
    Case(
        "quarantine-lost-stopped",
        quarantined,
        R.QUARANTINED,
        STOPPED,
        R.FAILED,
        [ReleaseQuarantine()],
    ),
    Case("quarantine-lost-open", quarantined, R.QUARANTINED, OPEN, R.EXPIRING, []),
    Case("quarantine-timeout", quarantined, R.QUARANTINED, Timeout(), R.EXPIRING, [TEAR_DOWN]),
    Case(
        "quarantine-late-chunk",
        quarantined,
        R.QUARANTINED,
        chunk(0, 0, 8, 20, False),
        R.QUARANTINED,
        [],
    ),
    Case("quarantine-local-abort", quarantined, R.QUARANTINED, LocalAbort("c"), R.QUARANTINED, []),
    Case(
        "quarantine-late-total",
        quarantined,
        R.QUARANTINED,
        TotalReceived(20),
        R.QUARANTINED,
        [],
    ),
    # -- EXPIRING: the same proofs still release; else the grant's expiry does
    *[
        case
        for name, build in (("expiring", expiring), ("torn-down", torn_down))
        for case in (
            Case(f"{name}-fenced", build, R.EXPIRING, Fenced(), R.FAILED, [ReleaseQuarantine()]),
            Case(f"{name}-fence-failed", build, R.EXPIRING, FenceFailed(), R.EXPIRING, []),
            Case(
                f"{name}-ack-proof",
                build,
                R.EXPIRING,
                AbortAckReceived(),
                R.FAILED,
                [ReleaseQuarantine()],
                kinds=RC,
            ),
            Case(
                f"{name}-ack-no-proof",
                build,
                R.EXPIRING,
                AbortAckReceived(),
                R.EXPIRING,
                [],
                kinds=NO_RC,
            ),
            Case(
                f"{name}-abort-proof",
                build,
                R.EXPIRING,
                AbortReceived("s"),
                R.FAILED,
                [ReleaseQuarantine()],
                kinds=RC,
            ),
            Case(
                f"{name}-abort-no-proof",
                build,
                R.EXPIRING,
                AbortReceived("s"),
                R.EXPIRING,
                [],
                kinds=NO_RC,
            ),
            Case(
                f"{name}-lost-stopped",
                build,
                R.EXPIRING,
                STOPPED,
                R.FAILED,
                [ReleaseQuarantine()],
            ),
            Case(f"{name}-lost-open", build, R.EXPIRING, OPEN, R.EXPIRING, []),
            Case(f"{name}-expiry", build, R.EXPIRING, Timeout(), R.FAILED, [ReleaseQuarantine()]),
            Case(
                f"{name}-late-chunk",
                build,
                R.EXPIRING,
                chunk(1, 8, 12, 20, True),
                R.EXPIRING,
                [],
            ),
            Case(f"{name}-local-abort", build, R.EXPIRING, LocalAbort("c"), R.EXPIRING, []),
            Case(f"{name}-late-total", build, R.EXPIRING, TotalReceived(20), R.EXPIRING, []),
        )
    ],
    # -- terminal states
    Case("done-abort", done, R.DONE, AbortReceived("late"), R.DONE, []),
    Case("done-local-abort", done, R.DONE, LocalAbort("late"), R.DONE, []),
    Case("done-peer-lost", done, R.DONE, PeerLost("late"), R.DONE, []),
    Case("done-timeout", done, R.DONE, Timeout(), R.DONE, []),
    *[
        Case(f"{name}-{type(e).__name__}", build, R.FAILED, e, R.FAILED, [])
        for name, build in (("failed", failed), ("released", released))
        for e in (
            AbortReceived("late"),
            AbortAckReceived(),
            LocalAbort("again"),
            PeerLost("p"),
            Timeout(),
            chunk(0, 0, 8, 8, True),
            TotalReceived(20),
            Fenced(),
            FenceFailed("late"),
        )
    ],
    Case("failed-lost-open", released, R.FAILED, OPEN, R.FAILED, []),
]

#: every case under every kind it holds for
CASES_BY_KIND = [(case, kind) for case in CASES for kind in case.kinds]


@pytest.mark.parametrize("kind", KINDS)
def test_cases_cover_every_transition(kind: str) -> None:
    g = GUARANTEES[kind]
    covered = set()
    for case in CASES:
        if kind in case.kinds:
            m = case.build(g)
            assert m.state is case.start, case.id
            covered.add((case.start, type(case.event)))
    assert covered == set(ReceiverMachine.TRANSITIONS)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_case_kinds_are_known() -> None:
    for case in CASES:
        assert case.kinds and set(case.kinds) <= set(KINDS), case.id


@pytest.mark.parametrize(
    ("case", "kind"), CASES_BY_KIND, ids=[f"{c.id}-{k}" for c, k in CASES_BY_KIND]
)
def test_transition(case: Case, kind: str) -> None:
    g = GUARANTEES[kind]
    m = case.build(g)
    assert m.state is case.start
    before = len(m.history)
    acts = m.handle(case.event)
    assert m.state is case.end
    assert acts == case.expected(g)
    assert m.history[before:] == [(case.start, type(case.event).__name__, case.end)]
    assert m.finished == (case.end in (R.DONE, R.FAILED))


# ------------------------------------------------------------ outcomes by guarantees


def test_guarantee_kinds_are_the_transports_declared_ones() -> None:
    from emtransfer.transport.local import LocalTransport
    from emtransfer.transport.mooncake import MooncakeTransport
    from emtransfer.transport.nixl import NixlTransport
    from emtransfer.transport.tcp import TcpTransport
    from emtransfer.transport.torch import TorchTransport

    assert GUARANTEES["nixl"] == NixlTransport.GUARANTEES == MooncakeTransport.GUARANTEES
    assert GUARANTEES["tcp"] == TcpTransport.GUARANTEES == TorchTransport.GUARANTEES
    assert GUARANTEES["local"] == LocalTransport.GUARANTEES
    assert GUARANTEES["none"] == NONE
    assert RC == ("nixl", "local") and NO_RC == ("tcp", "none")


GIVE_UPS: list[tuple[str, Builder, Event]] = [
    ("timeout", wait_chunk, Timeout()),
    ("local-abort", wait_chunk1, LocalAbort("c")),
    ("bad-chunk", wait_chunk, chunk(1, 0, 8, 20, False)),
    ("over-max", lambda g: wait_chunk(g, max_tokens=10), chunk(0, 0, 8, 11, False)),
    ("sender-abort", wait_chunk1, AbortReceived("s")),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("why", "build", "event"), GIVE_UPS, ids=[w for w, _, _ in GIVE_UPS])
def test_give_up_fences_only_where_the_engine_fences(
    why: str, build: Builder, event: Event, kind: str
) -> None:
    m = build(GUARANTEES[kind])
    acts = m.handle(event)
    if why == "sender-abort" and kind in ("nixl", "local"):
        # the sender's Abort proves its last write is in our pool: nothing to wait for
        assert m.state is R.FAILED
        assert [type(a) for a in acts] == [Free, Fail]
        return
    assert m.state is R.QUARANTINED
    kinds = [type(a) for a in acts]
    assert kinds[0] is Quarantine and kinds[-1] is Fail
    assert (Fence in kinds) == (kind in ("tcp", "local"))
    # the sender is told, unless it is the one that aborted
    assert (SendAbort in kinds) == (why != "sender-abort")
    assert Free not in kinds and ReleaseQuarantine not in kinds


#: per kind, the first event of PROOFS that releases a quarantine after a chunk timeout
PROOFS: list[Event] = [
    chunk(0, 0, 8, 20, False),
    FenceFailed("no"),
    AbortReceived("crossed"),
    AbortAckReceived(),
    Fenced(),
    OPEN,
    STOPPED,
    Timeout(),
    Timeout(),
]
FIRST_PROOF = {"nixl": AbortReceived, "local": AbortReceived, "tcp": Fenced, "none": Fenced}


@pytest.mark.parametrize("kind", KINDS)
def test_quarantine_released_exactly_once(kind: str) -> None:
    m = quarantined(GUARANTEES[kind])
    releases = []
    for e in PROOFS:
        acts = m.handle(e)
        assert Free not in acts and Quarantine not in acts
        releases += [(type(e), a) for a in acts if isinstance(a, ReleaseQuarantine)]
    assert releases == [(FIRST_PROOF[kind], ReleaseQuarantine())]
    assert m.state is R.FAILED


@pytest.mark.parametrize("kind", KINDS)
def test_ack_and_abort_prove_nothing_without_remote_completion(kind: str) -> None:
    """On an engine without remote completion a write the sender saw complete may still be
    on the way: neither its Abort nor its AbortAck releases anything; the fence does."""
    m = quarantined(GUARANTEES[kind])
    acts = feed(m, AbortReceived("crossed"))
    if kind in ("nixl", "local"):
        assert acts == [ReleaseQuarantine()] and m.state is R.FAILED
        return
    assert acts == [] and m.state is R.QUARANTINED
    assert feed(m, AbortAckReceived()) == [] and m.state is R.QUARANTINED
    assert feed(m, Fenced()) == [ReleaseQuarantine()] and m.state is R.FAILED


@pytest.mark.parametrize("kind", KINDS)
def test_quarantine_after_bad_chunk_then_ack(kind: str) -> None:
    m = wait_chunk(GUARANTEES[kind])
    acts = feed(m, chunk(0, 0, 9, 20, False))
    assert acts == chunk_error("count 9")(GUARANTEES[kind])
    acts = feed(m, AbortAckReceived())
    if kind in RC:
        assert acts == [ReleaseQuarantine()] and m.state is R.FAILED
    else:
        assert acts == [] and m.state is R.QUARANTINED


@pytest.mark.parametrize("kind", KINDS)
def test_no_ack_tears_down_then_expiry_releases(kind: str) -> None:
    """Quarantine always ends: no proof at all, and two deadlines (abort_ack_timeout, then the
    grant's expiry) release the blocks; the peer is torn down once."""
    m = quarantined(GUARANTEES[kind])
    assert m.timeout_name == "abort_ack_timeout"
    acts = m.handle(Timeout())
    assert acts == [TEAR_DOWN]
    assert m.state is R.EXPIRING and m.timeout_name == GRANT_EXPIRY
    # the teardown could not stop the writes: still only the expiry
    for e in (OPEN, LocalAbort("again"), FenceFailed(), chunk(0, 0, 8, 8, True)):
        assert m.handle(e) == [] and m.state is R.EXPIRING
    assert m.handle(Timeout()) == [ReleaseQuarantine()]
    assert m.state is R.FAILED
    assert m.handle(Timeout()) == []  # a stray deadline after the end: nothing
    assert [h[1] for h in m.history[-7:]] == [
        "Timeout",
        "PeerLost",
        "LocalAbort",
        "FenceFailed",
        "ChunkReceived",
        "Timeout",
        "Timeout",
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_teardown_that_stops_inbound_releases_at_once(kind: str) -> None:
    m = torn_down(GUARANTEES[kind])
    assert feed(m, STOPPED) == [ReleaseQuarantine()]
    assert m.state is R.FAILED


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("build", [quarantined, expiring, torn_down])
def test_every_lingering_state_ends_within_two_deadlines(build: Builder, kind: str) -> None:
    m = build(GUARANTEES[kind])
    releases = 0
    for _ in range(2):
        if m.finished:
            break
        releases += feed(m, Timeout()).count(ReleaseQuarantine())
    assert m.state is R.FAILED and releases == 1


# ------------------------------------------------------------------ multi-step sequences


def test_start_with_non_positive_expected_tokens_raises() -> None:
    for bad in (0, -1):
        m = new(NONE)
        with pytest.raises(ProtocolError, match="expected_tokens"):
            m.handle(Start(bad))
        assert m.state is R.NEW
        assert m.history == []


def test_start_with_expected_tokens_announces_them_in_init() -> None:
    m = new(NONE)
    feed(m, Start(300))
    assert feed(m, AllocGranted((0, 1, 2), 300)) == [SendInit((0, 1, 2), 300, 300)]


def test_unknown_length_announces_none() -> None:
    m = new(NONE)
    feed(m, Start())
    assert feed(m, AllocGranted((0, 1), 8)) == [SendInit((0, 1), 8, None)]


@pytest.mark.parametrize("kind", KINDS)
def test_the_original_scenario_2000_tokens_in_default_1024(kind: str) -> None:
    m = ReceiverMachine(RID, block_size=128, default_tokens=1024, guarantees=GUARANTEES[kind])
    assert feed(m, Start()) == [Alloc(1024, 1024)]
    blocks0 = (9, 3, 4, 5, 0, 7, 1, 2)
    assert feed(m, AllocGranted(blocks0, 1024)) == [SendInit(blocks0, 1024, None)]
    acts = feed(m, ChunkReceived(0, 0, 1024, 2000, False))
    assert acts == [Deliver(0, 0, 1024), Free(0), Alloc(976, 1)]
    blocks1 = (6, 11, 8, 10, 12, 13, 14, 15)
    assert feed(m, AllocGranted(blocks1, 976)) == [SendResume(1, blocks1, 976, 1024)]
    acts = feed(m, ChunkReceived(1, 1024, 976, 2000, True, META, DIGEST))
    assert acts == [Deliver(1, 1024, 976), Free(1), Complete(2000, META, DIGEST)]
    assert m.state is R.DONE


def test_many_rounds_of_partial_grants() -> None:
    """23 tokens through grants of 3, 5, 1, 8, 6: rounds numbered in order, tokens in order."""
    m = new(NONE)
    feed(m, Start())
    received = 0
    total = 23
    for rnd, cap in enumerate([3, 5, 1, 8, 6]):
        blocks = tuple(range(10 + 2 * rnd, 10 + 2 * rnd + (cap + B - 1) // B))
        expect = SendInit(blocks, cap, None) if rnd == 0 else SendResume(rnd, blocks, cap, received)
        assert feed(m, AllocGranted(blocks, cap)) == [expect]
        count = min(cap, total - received)
        last = received + count == total
        acts = feed(m, chunk(rnd, received, count, total, last))
        assert acts[:2] == [Deliver(rnd, received, count), Free(rnd)]
        received += count
        if last:
            assert acts[2:] == [Complete(total, META, DIGEST)]
        else:
            assert acts[2:] == [Alloc(total - received, 1)]
    assert m.state is R.DONE
    assert received == total


def test_the_grant_policy_keeps_rounds_few() -> None:
    """Round 0 waits for its allocation whole (a known length capped at the pool, or the
    default allocation); a Resume round accepts a partial grant of at least min_grant_tokens,
    or the rest when less is left. A request of known length that fits the pool: one round."""

    def machine() -> ReceiverMachine:
        return ReceiverMachine(
            RID, block_size=B, default_tokens=DEFAULT, guarantees=NONE,
            pool_tokens=100, min_grant_tokens=40,
        )  # fmt: skip

    m = machine()
    assert feed(m, Start(60)) == [Alloc(60, 60)]  # fits: whole, one round
    m = machine()
    assert feed(m, Start(300)) == [Alloc(300, 100)]  # past the pool: the whole pool
    m = machine()
    assert feed(m, Start()) == [Alloc(DEFAULT, DEFAULT)]
    feed(m, AllocGranted(BLOCKS0, DEFAULT))
    acts = feed(m, chunk(0, 0, DEFAULT, 300, False))
    assert acts[2:] == [Alloc(300 - DEFAULT, 40)]  # partial, but not below the minimum
    feed(m, AllocGranted(tuple(range(10, 10 + 288 // B)), 288))
    acts = feed(m, chunk(1, DEFAULT, 288, 300, False))
    assert acts[2:] == [Alloc(4, 4)]  # less than the minimum is left: all of it


@given(
    st.integers(1, 5000), st.integers(1, 2000), st.integers(1, 2000), st.booleans(),
    st.integers(1, 3),
)  # fmt: skip
def test_the_grant_policy_bounds(
    want: int, pool: int, min_grant: int, known: bool, rnd: int
) -> None:
    m = ReceiverMachine(
        RID, block_size=B, default_tokens=DEFAULT, guarantees=NONE,
        pool_tokens=pool, min_grant_tokens=min_grant,
    )  # fmt: skip
    m.round = 0 if known else rnd
    least = m.least(want)
    assert 1 <= least <= min(want, pool)
    if m.round == 0:
        assert least == min(want, pool)
    else:
        assert least == min(want, pool, min_grant)


def test_lease_with_longer_payload_completes_by_copy() -> None:
    m = wait_chunk(NONE, 8, whole=True)
    feed(m, chunk(0, 0, 8, 12, False))
    assert feed(m, AllocGranted((3,), 4)) == [SendResume(1, (3,), 4, 8)]
    acts = feed(m, chunk(1, 8, 4, 12, True))
    assert acts == [Deliver(1, 8, 4), Free(1), Complete(12, META, DIGEST)]  # not in place


def test_settings_max_tokens_bounds_the_total() -> None:
    limit = Settings().max_tokens
    for total, refused in ((limit, False), (limit + 1, True)):
        m = wait_chunk(GUARANTEES["nixl"], max_tokens=limit)
        acts = feed(m, chunk(0, 0, DEFAULT, total, False))
        assert (m.state is R.QUARANTINED) == refused
        assert any(isinstance(a, Deliver) for a in acts) != refused


def test_max_tokens_none_accepts_any_total() -> None:
    m = wait_chunk(NONE)
    assert feed(m, chunk(0, 0, 8, 10**9, False))[:2] == [Deliver(0, 0, 8), Free(0)]


def test_over_max_tokens_refused_before_any_copy() -> None:
    m = wait_chunk(GUARANTEES["tcp"], max_tokens=8)
    acts = feed(m, chunk(0, 0, 8, 9, False))
    assert not any(isinstance(a, (Deliver, Free, Alloc)) for a in acts)
    assert m.state is R.QUARANTINED
    assert m.received == 0 and m.total is None


@pytest.mark.parametrize("kind", KINDS)
def test_one_outcome_per_request(kind: str) -> None:
    """Complete or Fail appears exactly once, whatever follows."""
    m = wait_chunk(GUARANTEES[kind])
    outcomes = []
    for e in (
        LocalAbort("c"),
        Timeout(),
        chunk(0, 0, 8, 8, True),
        AbortReceived("s"),
        AbortAckReceived(),
        FenceFailed(),
        OPEN,
        Fenced(),
        PeerLost("p"),
        Timeout(),
        LocalAbort("c"),
    ):
        outcomes += [a for a in m.handle(e) if isinstance(a, (Fail, Complete))]
    assert len(outcomes) == 1
    assert m.state is R.FAILED


# --------------------------------------------------------------- allocation ledger walk


def _events_for(m: ReceiverMachine, pick: int) -> Event:
    """One event valid in the machine's state: peer messages both well-formed and not."""
    expected_chunk = (
        chunk(
            m.round,
            m.received,
            min(m.capacity, (m.total or 40) - m.received),
            m.total or 40,
            m.received + min(m.capacity, (m.total or 40) - m.received) == (m.total or 40),
        )
        if m.capacity
        else chunk(0, 0, 1, 1, True)
    )
    options: dict[type[Event], list[Event]] = {
        Start: [Start(), Start(12), Start(8, whole=True)],
        AllocGranted: [AllocGranted((1, 2), 8), AllocGranted((3,), 3), AllocGranted((4,), 1)],
        ChunkReceived: [expected_chunk, expected_chunk, chunk(m.round + 1, 0, 1, 1, True)],
        Timeout: [Timeout()],
        LocalAbort: [LocalAbort("c")],
        AbortReceived: [AbortReceived("s")],
        AbortAckReceived: [AbortAckReceived()],
        PeerLost: [STOPPED, OPEN],
        Fenced: [Fenced()],
        FenceFailed: [FenceFailed()],
        TotalReceived: [TotalReceived(m.total or 40), TotalReceived(40), TotalReceived(3)],
    }
    valid = sorted(ReceiverMachine.valid_events(m.state), key=lambda t: t.__name__)
    # a prefetch's answer comes only from the runtime, at once: the walk gives it below
    flat = [e for t in valid if t not in (Prefetched, PrefetchRefused) for e in options[t]]
    return flat[pick % len(flat)]


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), picks=st.lists(st.integers(0, 2**16), max_size=40))
def test_property_allocation_ledger(kind: str, picks: list[int]) -> None:
    """Any walk of valid events (a Prefetch answered at once, granted or refused as the walk
    picks): the receiver holds at most two allocations (the current round's and a prefetched
    next one), allocates (waiting) only with nothing held, never frees what it quarantined (it
    releases it, once), owns nothing once FAILED, and reports exactly one outcome once
    finished."""
    g = GUARANTEES[kind]
    m = new(g)
    held, quarantined_ = 0, False
    outcomes = 0
    for pick in picks:
        state = m.state
        todo = list(m.handle(_events_for(m, pick)))
        while todo:
            a = todo.pop(0)
            if isinstance(a, Alloc):
                assert not held and not quarantined_
            elif isinstance(a, Prefetch):
                assert m.state is R.WAIT_CHUNK and held == 1 and a.min_tokens <= a.num_tokens
                answer = Prefetched((9,), min(a.num_tokens, 4)) if pick % 3 else PrefetchRefused()
                held += isinstance(answer, Prefetched)
                todo = [*m.handle(answer), *todo]
            elif isinstance(a, SendInit):
                assert state is R.ALLOCATING
                held += 1
            elif isinstance(a, SendResume):
                # granted after waiting (nothing held before), or prefetched (held: 2 now)
                assert (state, held) in ((R.ALLOCATING, 0), (R.WAIT_CHUNK, 2))
                held = max(held, 1)
            elif isinstance(a, Free):
                assert held
                held = 0 if a.round is None else held - 1
            elif isinstance(a, Quarantine):
                assert held and not quarantined_
                held, quarantined_ = 0, True
            elif isinstance(a, Fence):
                assert g.fences_tag and quarantined_
            elif isinstance(a, ReleaseQuarantine):
                assert quarantined_ and state in (R.QUARANTINED, R.EXPIRING)
                quarantined_ = False
            elif isinstance(a, Complete):
                held -= a.in_place  # the lease frees it when it closes
                outcomes += 1
            elif isinstance(a, Fail):
                outcomes += 1
        assert 0 <= held <= 2
        assert (m.state in (R.QUARANTINED, R.EXPIRING)) == quarantined_
        assert outcomes <= 1
        if m.finished:
            assert not held and not quarantined_ and outcomes == 1
        if m.state is R.WAIT_CHUNK:
            assert held == 1 + (m.ahead is not None)


# ----------------------------------------------------------------------- error types


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("build", "event", "cls"),
    [
        (allocating, Timeout(), AllocationTimeout),
        (allocating1, Timeout(), AllocationTimeout),
        (wait_chunk, Timeout(), TransferTimeout),
        (new, LocalAbort(), TransferAborted),
        (allocating, LocalAbort(), TransferAborted),
        (wait_chunk, LocalAbort(), TransferAborted),
        (allocating1, AbortReceived(), TransferAborted),
        (wait_chunk, AbortReceived(), TransferAborted),
        (allocating1, PeerLost(), PeerLostError),
        (wait_chunk, PeerLost(), PeerLostError),
        (wait_chunk, OPEN, PeerLostError),
        (wait_chunk, chunk(3, 0, 8, 8, True), ProtocolError),
        (wait_chunk1, chunk(1, 8, 12, 99, False), ProtocolError),
        (lambda g: wait_chunk(g, max_tokens=8), chunk(0, 0, 8, 9, False), ProtocolError),
    ],
)
def test_fail_error_type(build: Builder, event: Event, cls: type, kind: str) -> None:
    acts = build(GUARANTEES[kind]).handle(event)
    fails = [a for a in acts if isinstance(a, Fail)]
    assert len(fails) == 1
    assert type(fails[0].error) is cls
    assert isinstance(fails[0].error, TransferError)


@pytest.mark.parametrize("build", [quarantined, expiring, torn_down, released])
def test_no_second_fail_after_giving_up(build: Builder) -> None:
    for kind in KINDS:
        m = build(GUARANTEES[kind])
        for e in (Timeout(), AbortReceived(), AbortAckReceived(), Fenced(), STOPPED, Timeout()):
            assert not any(isinstance(a, (Fail, Complete)) for a in m.handle(e))


def test_bad_chunk_abort_says_protocol_error() -> None:
    acts = wait_chunk(NONE).handle(chunk(0, 0, 9, 20, False))
    (abort,) = [a for a in acts if isinstance(a, SendAbort)]
    assert abort.reason.startswith("protocol error: ")


# ------------------------------------------------------------------- invalid events


def test_sample_events_cover_every_event_class() -> None:
    assert set(SAMPLE_EVENTS) == set(all_event_types())


@pytest.mark.parametrize("kind", KINDS)
def test_state_paths_cover_every_state(kind: str) -> None:
    assert set(STATE_PATHS) == set(ReceiverState)
    for state, build in STATE_PATHS.items():
        assert build(GUARANTEES[kind]).state is state


INVALID = invalid_pairs(ReceiverMachine, ReceiverState)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("state", "event_type"), INVALID, ids=[f"{s.name}-{e.__name__}" for s, e in INVALID]
)
def test_invalid_event_raises(state: ReceiverState, event_type: type[Event], kind: str) -> None:
    assert_refused(STATE_PATHS[state](GUARANTEES[kind]), event_type, "receiver", RID)


def test_invalid_events_cover_the_lingering_states() -> None:
    for state in (R.QUARANTINED, R.EXPIRING):
        assert {et for st, et in INVALID if st is state} == {
            AllocGranted,
            DataReady,
            InitReceived,
            Prefetched,  # answers only a Prefetch, which comes only in WAIT_CHUNK
            PrefetchRefused,
            ResumeReceived,
            Start,
            WriteDone,
            WriteFailed,
        }


def test_fence_outcomes_are_invalid_before_giving_up() -> None:
    for state in (R.NEW, R.ALLOCATING, R.WAIT_CHUNK, R.DONE):
        assert (state, Fenced) in INVALID
        assert (state, FenceFailed) in INVALID


def test_sender_only_events_are_invalid_everywhere() -> None:
    for state in ReceiverState:
        for et in (DataReady, InitReceived, ResumeReceived, WriteDone, WriteFailed):
            assert (state, et) in INVALID


def test_valid_events_match_the_table() -> None:
    for state in ReceiverState:
        expected = {et for (st, et) in ReceiverMachine.TRANSITIONS if st is state}
        assert ReceiverMachine.valid_events(state) == expected
        assert expected | {et for st, et in INVALID if st is state} == set(all_event_types())


# ---------------------------------------------------------------------------- misc


def test_timeouts_per_state() -> None:
    assert {
        R.ALLOCATING: "alloc_timeout",
        R.WAIT_CHUNK: "chunk_timeout",
        R.QUARANTINED: "abort_ack_timeout",
        R.EXPIRING: GRANT_EXPIRY,
    } == ReceiverMachine.TIMEOUTS
    assert_timeouts_name_settings(ReceiverMachine, ReceiverState)
    g = GUARANTEES["nixl"]
    assert new(g).timeout_name is None
    assert allocating(g).timeout_name == "alloc_timeout"
    assert wait_chunk(g).timeout_name == "chunk_timeout"
    assert quarantined(g).timeout_name == "abort_ack_timeout"
    assert expiring(g).timeout_name == GRANT_EXPIRY
    assert torn_down(g).timeout_name == GRANT_EXPIRY
    assert done(g).timeout_name is None and failed(g).timeout_name is None


def test_terminal_states() -> None:
    assert frozenset({R.DONE, R.FAILED}) == ReceiverMachine.TERMINAL
    g = GUARANTEES["tcp"]
    assert done(g).finished and failed(g).finished and released(g).finished
    assert not quarantined(g).finished  # still owes a release
    assert not expiring(g).finished and not torn_down(g).finished


def test_machine_keeps_its_guarantees() -> None:
    for kind, g in GUARANTEES.items():
        m = new(g, max_tokens=99)
        assert m.g is g and m.max_tokens == 99, kind


# ------------------------------------------- messages for a request with no session here


@pytest.mark.parametrize("event_type", [AbortReceived, AbortAckReceived], ids=lambda t: t.__name__)
def test_unknown_rid_abort_or_ack_needs_no_answer(event_type: type[Event]) -> None:
    assert ReceiverMachine.answer_unknown(RID, SAMPLE_EVENTS[event_type]) == []


def test_unknown_rid_chunk_is_a_protocol_error() -> None:
    (act,) = ReceiverMachine.answer_unknown(RID, SAMPLE_EVENTS[ChunkReceived])
    assert isinstance(act, ev.Fail) and isinstance(act.error, ProtocolError)
    assert RID in str(act.error)


@pytest.mark.parametrize(
    "event_type",
    sorted(set(all_event_types()) - set(ReceiverMachine.UNKNOWN), key=lambda t: t.__name__),
    ids=lambda t: t.__name__,
)
def test_other_events_for_an_unknown_rid_are_refused(event_type: type[Event]) -> None:
    with pytest.raises(ProtocolError, match=f"receiver: event {event_type.__name__} for unknown"):
        ReceiverMachine.answer_unknown(RID, SAMPLE_EVENTS[event_type])


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("", "TransferAborted"),
        ("unavailable", "Unavailable"),
        ("refused", "JobRefused"),
        ("encoder_failed", "EncoderFailed"),
        ("not-a-kind", "TransferAborted"),
    ],
)
def test_an_abort_s_kind_picks_the_caller_s_error(kind: str, cls: str) -> None:
    """The sender's Abort says why; the receiver fails with that type, in every state an
    Abort can reach (allocating, or waiting for a chunk), and tells its own kind on."""
    for build in (allocating, wait_chunk):
        m = build(NONE)
        acts = feed(m, AbortReceived("s", kind))
        (fail,) = [a for a in acts if isinstance(a, ev.Fail)]
        assert type(fail.error).__name__ == cls, (build.__name__, acts)
    m = allocating(NONE)
    acts = feed(m, ev.LocalAbort("node closing", kind="unavailable"))
    (tell,) = [a for a in acts if isinstance(a, ev.SendAbort)]
    assert tell.kind == "unavailable"
    (fail,) = [a for a in acts if isinstance(a, ev.Fail)]
    assert type(fail.error).__name__ == "Unavailable"


@pytest.mark.parametrize("job", [False, True], ids=["receive", "encode-job"])
def test_round_0_of_an_encode_job_also_waits_for_the_encoder(job: bool) -> None:
    """The sender may hold an Encode job's Init for its data_timeout while the encoder runs:
    round 0 of a job waits encode_timeout (data_timeout + chunk_timeout), every later round
    and every plain receive waits chunk_timeout; each timeout says what did not come, in
    words, with its seconds and its setting."""
    waits = {"chunk_timeout": 30.0, "encode_timeout": 90.0}
    m = ReceiverMachine(
        RID, block_size=B, default_tokens=DEFAULT, guarantees=NONE, waits=waits,
        peer="encode node e-1",
    )  # fmt: skip
    assert feed(m, Start(None, False, job)) == [Alloc(DEFAULT, DEFAULT)]
    assert m.timeout_name == "alloc_timeout"
    feed(m, AllocGranted(BLOCKS0, DEFAULT))
    assert m.timeout_name == ("encode_timeout" if job else "chunk_timeout")
    t = Settings()
    assert t.encode_timeout == t.data_timeout + t.chunk_timeout
    gave_up = ReceiverMachine(
        RID, block_size=B, default_tokens=DEFAULT, guarantees=NONE, waits=waits,
        peer="encode node e-1",
    )  # fmt: skip
    feed(gave_up, Start(None, False, job), AllocGranted(BLOCKS0, DEFAULT))
    (fail,) = [a for a in feed(gave_up, Timeout()) if isinstance(a, ev.Fail)]
    if job:
        assert "encode node e-1 computed and sent nothing within 90s (encode_timeout)" in str(
            fail.error
        )
    else:
        assert "encode node e-1 has no payload for this rid after 30s (chunk_timeout)" in str(
            fail.error
        )
    # round 1 waits chunk_timeout, job or not
    feed(m, chunk(0, 0, DEFAULT, 20, False), AllocGranted(BLOCKS1, 12))
    assert m.round == 1 and m.state is R.WAIT_CHUNK
    assert m.timeout_name == "chunk_timeout"
    (fail,) = [a for a in feed(m, Timeout()) if isinstance(a, ev.Fail)]
    assert "encode node e-1 sent no data for round 1 within 30s (chunk_timeout)" in str(fail.error)


# ------------------------------------------------------------------- pipelined resume


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_off_takes_total_but_prefetches_nothing(kind: str) -> None:
    m = ReceiverMachine(
        RID, block_size=B, default_tokens=DEFAULT, guarantees=GUARANTEES[kind], pipeline=False
    )
    feed(m, Start(), AllocGranted(BLOCKS0, DEFAULT))
    assert feed(m, TotalReceived(20)) == []
    assert m.total == 20
    acts = feed(m, chunk(0, 0, DEFAULT, 20, False))
    assert acts == [Deliver(0, 0, DEFAULT), Free(0), Alloc(12, 1)]  # the sequential path


def test_a_refused_prefetch_falls_back_to_the_sequential_path() -> None:
    m = totalled(GUARANTEES["tcp"])
    assert feed(m, PrefetchRefused()) == []
    acts = feed(m, chunk(0, 0, DEFAULT, 20, False))
    assert acts == [Deliver(0, 0, DEFAULT), Free(0), Alloc(12, 1)]
    assert m.state is R.ALLOCATING  # holding nothing while it waits


def test_a_prefetch_asks_for_the_rest_with_a_resume_rounds_least() -> None:
    m = ReceiverMachine(
        RID,
        block_size=B,
        default_tokens=DEFAULT,
        guarantees=GUARANTEES["nixl"],
        pool_tokens=40,
        min_grant_tokens=16,
    )
    feed(m, Start(), AllocGranted(BLOCKS0, DEFAULT))
    assert feed(m, TotalReceived(100)) == [Prefetch(92, 16)]  # least: min_grant_tokens
    m = wait_chunk(GUARANTEES["nixl"])
    assert feed(m, TotalReceived(10)) == [Prefetch(2, 1)]  # least: the rest, when smaller


def test_a_prefetch_answer_without_a_prefetch_is_refused() -> None:
    m = wait_chunk(GUARANTEES["nixl"])
    with pytest.raises(ProtocolError, match="without a Prefetch"):
        m.handle(Prefetched(BLOCKS1, 4))
    with pytest.raises(ProtocolError, match="without a Prefetch"):
        m.handle(PrefetchRefused())


def test_a_pipelined_round_starts_a_new_phase() -> None:
    """The runtime arms one deadline per phase: a pipelined round waits chunk_timeout afresh."""
    m = prefetched(GUARANTEES["nixl"])
    before = m.phase
    feed(m, chunk(0, 0, DEFAULT, 20, False))
    assert m.state is R.WAIT_CHUNK and m.phase != before
    assert m.timeout_name == "chunk_timeout"
