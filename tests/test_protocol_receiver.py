"""The receiver (language side) machine: every transition of its table, every chunk check,
every invalid event. Pure unit tests: events in, state and actions out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from protocol_samples import SAMPLE_EVENTS, all_event_types, assert_refused, invalid_pairs

from emtransfer.errors import (
    AllocationTimeout,
    ProtocolError,
    TransferAborted,
    TransferError,
    TransferTimeout,
)
from emtransfer.errors import PeerLost as PeerLostError
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
    Free,
    InitReceived,
    LocalAbort,
    PeerLost,
    Quarantine,
    ReleaseQuarantine,
    ResumeReceived,
    SendAbort,
    SendInit,
    SendResume,
    Start,
    Timeout,
    WriteDone,
    WriteFailed,
)
from emtransfer.protocol.receiver import ReceiverMachine, ReceiverState

R = ReceiverState
RID = "req-r"
B = 4  # block size
DEFAULT = 8  # default_tokens: two blocks
META = {"mrope_position_delta": -2}
DIGEST = "sha256:beef"
BLOCKS0 = (5, 2)  # round 0 allocation (scrambled on purpose)
BLOCKS1 = (1, 7, 3)  # round 1 allocation

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


def new() -> ReceiverMachine:
    return ReceiverMachine(RID, block_size=B, default_tokens=DEFAULT)


def chunk(rnd: int, start: int, count: int, total: int, last: bool) -> ChunkReceived:
    return ChunkReceived(
        rnd, start, count, total, last, META if last else None, DIGEST if last else None
    )


def feed(m: ReceiverMachine, *events: Event) -> list[ev.Action]:
    acts: list[ev.Action] = []
    for e in events:
        acts = m.handle(e)
    return acts


def allocating(expected: int | None = None, whole: bool = False) -> ReceiverMachine:
    m = new()
    want = expected or DEFAULT
    assert feed(m, Start(expected, whole)) == [Alloc(want, want if whole else 1)]
    return m


def wait_chunk(expected: int | None = None, whole: bool = False) -> ReceiverMachine:
    """Round 0: the default allocation (8 tokens in BLOCKS0) was granted and announced."""
    m = allocating(expected, whole)
    cap = expected or DEFAULT
    (init,) = feed(m, AllocGranted(BLOCKS0, cap))
    # expected_tokens is left out here: test_start_with_expected_tokens_announces_them_in_init
    assert isinstance(init, SendInit) and (init.blocks, init.capacity_tokens) == (BLOCKS0, cap)
    return m


def allocating1(total: int = 20) -> ReceiverMachine:
    """Round 0 carried 8 of ``total`` tokens; the allocation for round 1 is requested."""
    m = wait_chunk()
    acts = feed(m, chunk(0, 0, DEFAULT, total, False))
    assert acts == [Deliver(0, 0, DEFAULT), Free(), Alloc(total - DEFAULT, 1)]
    return m


def wait_chunk1(total: int = 20, cap: int = 12) -> ReceiverMachine:
    m = allocating1(total)
    assert feed(m, AllocGranted(BLOCKS1, cap)) == [SendResume(1, BLOCKS1, cap, DEFAULT)]
    return m


def quarantined() -> ReceiverMachine:
    m = wait_chunk()
    feed(m, Timeout())
    assert m.state is R.QUARANTINED
    return m


def done() -> ReceiverMachine:
    m = wait_chunk()
    feed(m, chunk(0, 0, 5, 5, True))
    assert m.state is R.DONE
    return m


def failed() -> ReceiverMachine:
    m = new()
    feed(m, LocalAbort("bye"))
    assert m.state is R.FAILED
    return m


#: a fresh machine in every state, by a legal path
STATE_PATHS: dict[ReceiverState, Callable[[], ReceiverMachine]] = {
    R.NEW: new,
    R.ALLOCATING: allocating,
    R.WAIT_CHUNK: wait_chunk,
    R.QUARANTINED: quarantined,
    R.DONE: done,
    R.FAILED: failed,
}

# --------------------------------------------------------------------- transition table


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], ReceiverMachine]
    start: ReceiverState
    event: Event
    end: ReceiverState
    actions: list[Any]


PE = ProtocolError
TT = TransferTimeout
TA = TransferAborted


def chunk_error(*parts: str) -> list[Any]:
    return [Quarantine(), AbortWith("protocol error: ", *parts), FailWith(PE, *parts)]


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

CASES: list[Case] = [
    # -- NEW
    Case("start-default", new, R.NEW, Start(), R.ALLOCATING, [Alloc(DEFAULT, 1)]),
    Case("start-expected", new, R.NEW, Start(300), R.ALLOCATING, [Alloc(300, 1)]),
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
        [FailWith(AllocationTimeout, "no allocation for round 0")],
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
        [FailWith(TA, "c")],
    ),
    Case(
        "alloc-local-abort-round1",
        allocating1,
        R.ALLOCATING,
        LocalAbort("c"),
        R.FAILED,
        [AbortWith("c"), FailWith(TA, "c")],
    ),
    # nothing is allocated while ALLOCATING: no Free
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
    # -- WAIT_CHUNK: valid chunks
    Case(
        "chunk-last-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        chunk(0, 0, 5, 5, True),
        R.DONE,
        [Deliver(0, 0, 5), Free(), Complete(5, META, DIGEST)],
    ),
    Case(
        "chunk-last-exact-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 8, True),
        R.DONE,
        [Deliver(0, 0, 8), Free(), Complete(8, META, DIGEST)],
    ),
    Case(
        "chunk-more-round0",
        wait_chunk,
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 2000, False),
        R.ALLOCATING,
        [Deliver(0, 0, 8), Free(), Alloc(1992, 1)],
    ),
    Case(
        "chunk-last-round1",
        wait_chunk1,
        R.WAIT_CHUNK,
        chunk(1, 8, 12, 20, True),
        R.DONE,
        [Deliver(1, 8, 12), Free(), Complete(20, META, DIGEST)],
    ),
    Case(
        "chunk-more-round1",
        lambda: wait_chunk1(30),
        R.WAIT_CHUNK,
        chunk(1, 8, 12, 30, False),
        R.ALLOCATING,
        [Deliver(1, 8, 12), Free(), Alloc(10, 1)],
    ),
    # lease: a single round stays in place, not copied out, not freed here
    Case(
        "chunk-whole-in-place",
        lambda: wait_chunk(8, whole=True),
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 8, True),
        R.DONE,
        [Complete(8, META, DIGEST, in_place=True)],
    ),
    Case(
        "chunk-whole-short-in-place",
        lambda: wait_chunk(8, whole=True),
        R.WAIT_CHUNK,
        chunk(0, 0, 6, 6, True),
        R.DONE,
        [Complete(6, META, DIGEST, in_place=True)],
    ),
    # lease with a longer payload than announced: rounds, copied out (and not whole any more)
    Case(
        "chunk-whole-but-longer",
        lambda: wait_chunk(8, whole=True),
        R.WAIT_CHUNK,
        chunk(0, 0, 8, 20, False),
        R.ALLOCATING,
        [Deliver(0, 0, 8), Free(), Alloc(12, 1)],
    ),
    # -- WAIT_CHUNK: invalid chunks quarantine the allocation
    *[
        Case(f"chunk0-{name}", wait_chunk, R.WAIT_CHUNK, bad, R.QUARANTINED, chunk_error(why))
        for name, bad, why in BAD_CHUNKS_ROUND0
    ],
    *[
        Case(f"chunk1-{name}", wait_chunk1, R.WAIT_CHUNK, bad, R.QUARANTINED, chunk_error(why))
        for name, bad, why in BAD_CHUNKS_ROUND1
    ],
    Case(
        "chunk-timeout",
        wait_chunk,
        R.WAIT_CHUNK,
        Timeout(),
        R.QUARANTINED,
        [Quarantine(), SendAbort("receiver timeout"), FailWith(TT, "round 0")],
    ),
    Case(
        "chunk-timeout-round1",
        wait_chunk1,
        R.WAIT_CHUNK,
        Timeout(),
        R.QUARANTINED,
        [Quarantine(), SendAbort("receiver timeout"), FailWith(TT, "round 1")],
    ),
    Case(
        "chunk-local-abort",
        wait_chunk,
        R.WAIT_CHUNK,
        LocalAbort("c"),
        R.QUARANTINED,
        [Quarantine(), SendAbort("c"), FailWith(TA, "c")],
    ),
    # the sender aborts only with no write in flight: free at once
    Case(
        "chunk-abort",
        wait_chunk,
        R.WAIT_CHUNK,
        AbortReceived("s"),
        R.FAILED,
        [Free(), FailWith(TA, "aborted by sender: s")],
    ),
    Case(
        "chunk-lost",
        wait_chunk1,
        R.WAIT_CHUNK,
        PeerLost("p"),
        R.FAILED,
        [Free(), FailWith(PeerLostError, "p")],
    ),
    # -- QUARANTINED: released once nothing can land any more
    Case(
        "quarantine-ack",
        quarantined,
        R.QUARANTINED,
        AbortAckReceived(),
        R.FAILED,
        [ReleaseQuarantine()],
    ),
    Case(
        "quarantine-lost",
        quarantined,
        R.QUARANTINED,
        PeerLost("p"),
        R.FAILED,
        [ReleaseQuarantine()],
    ),
    Case(
        "quarantine-abort",
        quarantined,
        R.QUARANTINED,
        AbortReceived("s"),
        R.FAILED,
        [ReleaseQuarantine()],
    ),
    Case(
        "quarantine-late-chunk",
        quarantined,
        R.QUARANTINED,
        chunk(0, 0, 8, 20, False),
        R.QUARANTINED,
        [],
    ),
    Case("quarantine-local-abort", quarantined, R.QUARANTINED, LocalAbort("c"), R.QUARANTINED, []),
    Case("quarantine-timeout", quarantined, R.QUARANTINED, Timeout(), R.QUARANTINED, []),
    # -- terminal states
    Case("done-abort", done, R.DONE, AbortReceived("late"), R.DONE, []),
    Case("done-local-abort", done, R.DONE, LocalAbort("late"), R.DONE, []),
    Case("done-peer-lost", done, R.DONE, PeerLost("late"), R.DONE, []),
    Case("done-timeout", done, R.DONE, Timeout(), R.DONE, []),
    *[
        Case(f"failed-{type(e).__name__}", failed, R.FAILED, e, R.FAILED, [])
        for e in (
            AbortReceived("late"),
            AbortAckReceived(),
            LocalAbort("again"),
            PeerLost("p"),
            Timeout(),
            chunk(0, 0, 8, 8, True),
        )
    ],
]


def test_cases_cover_every_transition() -> None:
    covered = set()
    for case in CASES:
        m = case.build()
        assert m.state is case.start, case.id
        covered.add((case.start, type(case.event)))
    assert covered == set(ReceiverMachine.TRANSITIONS)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_transition(case: Case) -> None:
    m = case.build()
    assert m.state is case.start
    before = len(m.history)
    acts = m.handle(case.event)
    assert m.state is case.end
    assert acts == case.actions
    assert m.history[before:] == [(case.start, type(case.event).__name__, case.end)]
    assert m.finished == (case.end in (R.DONE, R.FAILED))


# ------------------------------------------------------------------ multi-step sequences


def test_start_with_non_positive_expected_tokens_raises() -> None:
    for bad in (0, -1):
        m = new()
        with pytest.raises(ProtocolError, match="expected_tokens"):
            m.handle(Start(bad))
        assert m.state is R.NEW
        assert m.history == []


def test_start_with_expected_tokens_announces_them_in_init() -> None:
    # BUG: ReceiverMachine never sends the expected length it was started with.
    # _start() does not store Start.expected_tokens, and _granted() sends
    # SendInit(blocks, capacity, expected_tokens=self.total), where self.total is always None
    # on round 0 (it is only set by the first ChunkDone). So Init.expected_tokens, the
    # "known length / announced early" part of the protocol (DESIGN.md, Protocol), is never
    # populated. Expected: SendInit carries the caller's expected_tokens.
    m = new()
    feed(m, Start(300))
    assert feed(m, AllocGranted((0, 1, 2), 300)) == [SendInit((0, 1, 2), 300, 300)]


def test_unknown_length_announces_none() -> None:
    m = new()
    feed(m, Start())
    assert feed(m, AllocGranted((0, 1), 8)) == [SendInit((0, 1), 8, None)]


def test_the_original_scenario_2000_tokens_in_default_1024() -> None:
    m = ReceiverMachine(RID, block_size=128, default_tokens=1024)
    assert feed(m, Start()) == [Alloc(1024, 1)]
    blocks0 = (9, 3, 4, 5, 0, 7, 1, 2)
    assert feed(m, AllocGranted(blocks0, 1024)) == [SendInit(blocks0, 1024, None)]
    acts = feed(m, ChunkReceived(0, 0, 1024, 2000, False))
    assert acts == [Deliver(0, 0, 1024), Free(), Alloc(976, 1)]
    blocks1 = (6, 11, 8, 10, 12, 13, 14, 15)
    assert feed(m, AllocGranted(blocks1, 976)) == [SendResume(1, blocks1, 976, 1024)]
    acts = feed(m, ChunkReceived(1, 1024, 976, 2000, True, META, DIGEST))
    assert acts == [Deliver(1, 1024, 976), Free(), Complete(2000, META, DIGEST)]
    assert m.state is R.DONE


def test_many_rounds_of_partial_grants() -> None:
    """23 tokens through grants of 3, 5, 1, 8, 6: rounds numbered in order, tokens in order."""
    m = new()
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
        assert acts[:2] == [Deliver(rnd, received, count), Free()]
        received += count
        if last:
            assert acts[2:] == [Complete(total, META, DIGEST)]
        else:
            assert acts[2:] == [Alloc(total - received, 1)]
    assert m.state is R.DONE
    assert received == total


def test_lease_with_longer_payload_completes_by_copy() -> None:
    m = wait_chunk(8, whole=True)
    feed(m, chunk(0, 0, 8, 12, False))
    assert feed(m, AllocGranted((3,), 4)) == [SendResume(1, (3,), 4, 8)]
    acts = feed(m, chunk(1, 8, 4, 12, True))
    assert acts == [Deliver(1, 8, 4), Free(), Complete(12, META, DIGEST)]  # not in place


def test_quarantine_released_once() -> None:
    m = quarantined()
    assert feed(m, chunk(0, 0, 8, 20, False)) == []
    assert feed(m, AbortReceived("crossed")) == [ReleaseQuarantine()]
    # the ack that follows the crossing Abort is absorbed
    assert feed(m, AbortAckReceived()) == []
    assert m.state is R.FAILED


def test_quarantine_after_bad_chunk_then_ack() -> None:
    m = wait_chunk()
    acts = feed(m, chunk(0, 0, 9, 20, False))
    assert acts == chunk_error("count 9")
    assert feed(m, AbortAckReceived()) == [ReleaseQuarantine()]
    assert m.state is R.FAILED


def test_one_outcome_per_request() -> None:
    """Complete or Fail appears exactly once, whatever follows."""
    m = wait_chunk()
    outcomes = []
    for e in (
        LocalAbort("c"),
        Timeout(),
        chunk(0, 0, 8, 8, True),
        AbortReceived("s"),
        AbortAckReceived(),
        PeerLost("p"),
        Timeout(),
        LocalAbort("c"),
    ):
        outcomes += [a for a in m.handle(e) if isinstance(a, (Fail, Complete))]
    assert len(outcomes) == 1


# ----------------------------------------------------------------------- error types


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
        (wait_chunk, chunk(3, 0, 8, 8, True), ProtocolError),
        (wait_chunk1, chunk(1, 8, 12, 99, False), ProtocolError),
    ],
)
def test_fail_error_type(build: Callable[[], ReceiverMachine], event: Event, cls: type) -> None:
    acts = build().handle(event)
    fails = [a for a in acts if isinstance(a, Fail)]
    assert len(fails) == 1
    assert type(fails[0].error) is cls
    assert isinstance(fails[0].error, TransferError)


# ------------------------------------------------------------------- invalid events


def test_sample_events_cover_every_event_class() -> None:
    assert set(SAMPLE_EVENTS) == set(all_event_types())


def test_state_paths_cover_every_state() -> None:
    assert set(STATE_PATHS) == set(ReceiverState)
    for state, build in STATE_PATHS.items():
        assert build().state is state


INVALID = invalid_pairs(ReceiverMachine, ReceiverState)


@pytest.mark.parametrize(
    ("state", "event_type"), INVALID, ids=[f"{s.name}-{e.__name__}" for s, e in INVALID]
)
def test_invalid_event_raises(state: ReceiverState, event_type: type[Event]) -> None:
    assert_refused(STATE_PATHS[state](), event_type, "receiver", RID)


def test_sender_only_events_are_invalid_everywhere() -> None:
    for state in ReceiverState:
        for et in (DataReady, InitReceived, ResumeReceived, WriteDone, WriteFailed):
            assert (state, et) in INVALID


def test_valid_events_match_the_table() -> None:
    for state in ReceiverState:
        expected = {et for (st, et) in ReceiverMachine.TRANSITIONS if st is state}
        assert ReceiverMachine.valid_events(state) == expected


# ---------------------------------------------------------------------------- misc


def test_timeouts_per_state() -> None:
    assert {R.ALLOCATING: "alloc_timeout", R.WAIT_CHUNK: "chunk_timeout"} == (
        ReceiverMachine.TIMEOUTS
    )
    assert new().timeout_name is None
    assert allocating().timeout_name == "alloc_timeout"
    assert wait_chunk().timeout_name == "chunk_timeout"
    assert quarantined().timeout_name is None
    for state in ReceiverMachine.TIMEOUTS:
        assert (state, Timeout) in ReceiverMachine.TRANSITIONS


def test_terminal_states() -> None:
    assert frozenset({R.DONE, R.FAILED}) == ReceiverMachine.TERMINAL
    assert done().finished and failed().finished
    assert not quarantined().finished  # still owes a release
