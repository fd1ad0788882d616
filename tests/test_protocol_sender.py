"""The sender (encode side) machine: every transition of its table, every guard, every invalid
event. Pure unit tests: events in, state and actions out."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from protocol_samples import (
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
from emtransfer.protocol import events as ev
from emtransfer.protocol.events import (
    AbortAckReceived,
    AbortReceived,
    Alloc,
    AllocGranted,
    ChunkReceived,
    Complete,
    DataReady,
    Event,
    Fail,
    FreeStaging,
    FreeStagingAfterWrite,
    InitReceived,
    LocalAbort,
    PeerLost,
    ResumeReceived,
    SendAbort,
    SendAbortAck,
    SendChunkDone,
    SendTotal,
    Start,
    Timeout,
    Write,
    WriteDone,
    WriteFailed,
)
from emtransfer.protocol.sender import SenderMachine, SenderState

S = SenderState
RID = "req-s"
B = 4  # block size
REMOTE = 16  # blocks in the receiver's pool
META = {"mrope_position_delta": 3}
DIGEST = "sha256:feed"
D0, D1, D2 = 1_000.0, 1_030.0, 1_060.0  # the grants' write deadlines of rounds 0, 1, 2

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
    """Matches ``SendAbort`` whose reason starts with ``prefix`` and holds ``parts``."""

    def __init__(self, prefix: str, *parts: str) -> None:
        self.prefix, self.parts = prefix, parts

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SendAbort)
            and other.reason.startswith(self.prefix)
            and all(p in other.reason for p in self.parts)
        )

    def __repr__(self) -> str:
        return f"SendAbort({self.prefix!r}...{self.parts})"


# -------------------------------------------------------------------- driving into states


def new() -> SenderMachine:
    return SenderMachine(RID, block_size=B, remote_num_blocks=REMOTE)


def data(total: int) -> DataReady:
    return DataReady(total, META, DIGEST)


def init(cap: int = 12, blocks: tuple[int, ...] = (9, 3, 4), deadline: float = D0) -> InitReceived:
    return InitReceived(blocks, cap, deadline=deadline)


def feed(m: SenderMachine, *events: Event) -> list[ev.Action]:
    """Feed events, returning the actions of the last one."""
    acts: list[ev.Action] = []
    for e in events:
        acts = m.handle(e)
    return acts


def wait_init(total: int = 10) -> SenderMachine:
    m = new()
    assert feed(m, data(total)) == []
    return m


def wait_data(cap: int = 12) -> SenderMachine:
    m = new()
    assert feed(m, init(cap)) == []
    return m


def staging(total: int = 10, cap: int = 12) -> SenderMachine:
    """Round 0 staging: data first, then Init."""
    m = wait_init(total)
    told = [SendTotal(total)] if total > cap else []  # round 1 can be prepared meanwhile
    assert feed(m, init(cap)) == [*told, Alloc(min(total, cap), min_tokens=1)]
    return m


def writing(total: int = 10, cap: int = 12, grant: int | None = None) -> SenderMachine:
    m = staging(total, cap)
    n = min(total, cap) if grant is None else grant
    assert feed(m, AllocGranted((0, 1, 2), n)) == [Write(0, 0, 0, min(n, total, cap), D0)]
    return m


def feed_on(m: SenderMachine, *events: Event) -> SenderMachine:
    feed(m, *events)
    return m


def wait_resume(total: int = 20, cap: int = 12) -> SenderMachine:
    """Round 0 written in one piece; more tokens left."""
    m = writing(total, cap)
    acts = feed(m, WriteDone())
    assert acts == [FreeStaging(), SendChunkDone(0, 0, cap, total, False)]
    return m


def resumed_staging() -> SenderMachine:
    """Round 1 staging: 20 tokens, round 0 carried 12, Resume offers 8 in blocks (5, 6)."""
    m = wait_resume(20, 12)
    assert feed(m, ResumeReceived(1, (5, 6), 8, 12, D1)) == [Alloc(8, min_tokens=1)]
    return m


def resumed_writing() -> SenderMachine:
    m = resumed_staging()
    assert feed(m, AllocGranted((3,), 4)) == [Write(1, 12, 0, 4, D1)]
    return m


EARLY = ResumeReceived(1, (5, 6), 8, 12, D1)  # round 1's grant, while round 0 is written


def writing_ahead() -> SenderMachine:
    """Pipelined: round 0 (12 of 20 tokens) is on the wire and round 1's grant is here."""
    m = writing(20, 12)
    assert feed(m, EARLY) == []
    return m


#: what stops a write in flight, by name
DRAIN_CAUSES: dict[str, Event] = {
    "abort": AbortReceived("rcv gave up"),
    "local": LocalAbort("cancel"),
    "lost": PeerLost("conn reset"),
    "timeout": Timeout(),  # write_timeout: the engine did not end the write in time
}
#: the error each cause fails the request with
DRAIN_ERRORS: dict[str, Any] = {
    "abort": FailWith(TransferAborted, "aborted by receiver: rcv gave up"),
    "local": FailWith(TransferAborted, "cancel"),
    "lost": FailWith(PeerLostError, "conn reset"),
    "timeout": FailWith(TransferTimeout, "write of round 0 did not end within write_timeout"),
}
#: what each cause tells the peer once the write ended
DRAIN_REPLIES: dict[str, list[Any]] = {
    "abort": [SendAbortAck()],
    "local": [SendAbort("cancel")],
    "lost": [],
    "timeout": [SendAbort("sender write timed out")],
}


def draining(cause: str) -> SenderMachine:
    m = writing()
    assert feed(m, DRAIN_CAUSES[cause]) == []
    assert m.state is S.DRAINING
    return m


def abandoned(cause: str) -> SenderMachine:
    """DRAINING's own deadline passed: FAILED, with the write still running in the engine."""
    m = draining(cause)
    assert feed(m, Timeout()) == [FreeStagingAfterWrite(), DRAIN_ERRORS[cause]]
    assert m.state is S.FAILED
    return m


def done() -> SenderMachine:
    m = writing(10, 12)
    feed(m, WriteDone())
    assert m.state is S.DONE
    return m


def failed() -> SenderMachine:
    m = new()
    feed(m, LocalAbort("bye"))
    assert m.state is S.FAILED
    return m


#: a fresh machine in every state, by a legal path
STATE_PATHS: dict[SenderState, Callable[[], SenderMachine]] = {
    S.NEW: new,
    S.WAIT_INIT: wait_init,
    S.WAIT_DATA: wait_data,
    S.STAGING: staging,
    S.WRITING: writing,
    S.WAIT_RESUME: wait_resume,
    S.DRAINING: lambda: draining("local"),
    S.DONE: done,
    S.FAILED: failed,
}

# --------------------------------------------------------------------- transition table


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], SenderMachine]
    start: SenderState
    event: Event
    end: SenderState
    actions: list[Any]


PE = ProtocolError
TT = TransferTimeout
TA = TransferAborted


def peer_error(*parts: str) -> list[Any]:
    return [AbortWith("protocol error: ", *parts), FailWith(PE, *parts)]


BAD_ALLOCATIONS = [
    ("duplicate-blocks", (3, 5, 3), 12, "duplicate blocks"),
    ("block-outside-pool", (3, REMOTE), 8, f"blocks [{REMOTE}] outside"),
    ("block-far-outside-pool", (REMOTE + 100,), 4, "outside the receiver's pool"),
    ("capacity-over-blocks", (3, 5), 2 * B + 1, f"capacity {2 * B + 1} exceeds 2 blocks"),
]

CASES: list[Case] = [
    # -- NEW
    Case("new-data", new, S.NEW, data(10), S.WAIT_INIT, []),
    Case("new-init", new, S.NEW, init(), S.WAIT_DATA, []),
    *[
        Case(
            f"new-init-{name}",
            new,
            S.NEW,
            InitReceived(blocks, cap),
            S.FAILED,
            peer_error("Init", why),
        )
        for name, blocks, cap, why in BAD_ALLOCATIONS
    ],
    Case(
        "new-abort",
        new,
        S.NEW,
        AbortReceived("x"),
        S.FAILED,
        [SendAbortAck(), FailWith(TA, "aborted by receiver: x")],
    ),
    Case("new-local-abort", new, S.NEW, LocalAbort("stop"), S.FAILED, [FailWith(TA, "stop")]),
    Case("new-lost", new, S.NEW, PeerLost("gone"), S.FAILED, [FailWith(PeerLostError, "gone")]),
    # -- WAIT_INIT
    Case("wait-init-init", wait_init, S.WAIT_INIT, init(12), S.STAGING, [Alloc(10, 1)]),
    Case(
        "wait-init-init-small",
        lambda: wait_init(30),
        S.WAIT_INIT,
        init(12),
        S.STAGING,
        [SendTotal(30), Alloc(12, 1)],
    ),
    *[
        Case(
            f"wait-init-init-{name}",
            wait_init,
            S.WAIT_INIT,
            InitReceived(blocks, cap),
            S.FAILED,
            peer_error("Init", why),
        )
        for name, blocks, cap, why in BAD_ALLOCATIONS
    ],
    # before Init the receiver holds nothing of ours: no Abort
    Case(
        "wait-init-timeout",
        wait_init,
        S.WAIT_INIT,
        Timeout(),
        S.FAILED,
        [FailWith(TT, "WAIT_INIT")],
    ),
    Case(
        "wait-init-abort",
        wait_init,
        S.WAIT_INIT,
        AbortReceived("r"),
        S.FAILED,
        [SendAbortAck(), FailWith(TA)],
    ),
    Case(
        "wait-init-local-abort",
        wait_init,
        S.WAIT_INIT,
        LocalAbort("c"),
        S.FAILED,
        [FailWith(TA, "c")],
    ),
    Case(
        "wait-init-lost",
        wait_init,
        S.WAIT_INIT,
        PeerLost("p"),
        S.FAILED,
        [FailWith(PeerLostError, "p")],
    ),
    # -- WAIT_DATA
    Case("wait-data-data", wait_data, S.WAIT_DATA, data(10), S.STAGING, [Alloc(10, 1)]),
    Case(
        "wait-data-data-long",
        wait_data,
        S.WAIT_DATA,
        data(100),
        S.STAGING,
        [SendTotal(100), Alloc(12, 1)],
    ),
    Case(
        "wait-data-timeout",
        wait_data,
        S.WAIT_DATA,
        Timeout(),
        S.FAILED,
        [
            SendAbort("sender timeout: the payload was not ready in time (data_timeout)"),
            FailWith(TT, "WAIT_DATA"),
        ],
    ),
    Case(
        "wait-data-abort",
        wait_data,
        S.WAIT_DATA,
        AbortReceived("r"),
        S.FAILED,
        [SendAbortAck(), FailWith(TA)],
    ),
    Case(
        "wait-data-local-abort",
        wait_data,
        S.WAIT_DATA,
        LocalAbort("c"),
        S.FAILED,
        [SendAbort("c"), FailWith(TA, "c")],
    ),
    Case(
        "wait-data-lost",
        wait_data,
        S.WAIT_DATA,
        PeerLost("p"),
        S.FAILED,
        [FailWith(PeerLostError, "p")],
    ),
    # -- STAGING
    Case(
        "staging-granted-all",
        staging,
        S.STAGING,
        AllocGranted((7, 1, 2), 10),
        S.WRITING,
        [Write(0, 0, 0, 10, D0)],
    ),
    Case(
        "staging-granted-more",
        staging,
        S.STAGING,
        AllocGranted((7, 1, 2, 4), 16),
        S.WRITING,
        [Write(0, 0, 0, 10, D0)],
    ),
    Case(
        "staging-granted-part",
        staging,
        S.STAGING,
        AllocGranted((7,), 3),
        S.WRITING,
        [Write(0, 0, 0, 3, D0)],
    ),
    Case(
        "staging-granted-round1",
        resumed_staging,
        S.STAGING,
        AllocGranted((0, 1), 8),
        S.WRITING,
        [Write(1, 12, 0, 8, D1)],
    ),
    Case(
        "staging-timeout",
        staging,
        S.STAGING,
        Timeout(),
        S.FAILED,
        [
            SendAbort("sender timeout: no blocks to stage the payload in time (alloc_timeout)"),
            FailWith(AllocationTimeout, "STAGING"),
        ],
    ),
    Case(
        "staging-abort",
        staging,
        S.STAGING,
        AbortReceived("r"),
        S.FAILED,
        [SendAbortAck(), FailWith(TA)],
    ),
    Case(
        "staging-local-abort",
        staging,
        S.STAGING,
        LocalAbort("c"),
        S.FAILED,
        [SendAbort("c"), FailWith(TA)],
    ),
    Case("staging-lost", staging, S.STAGING, PeerLost("p"), S.FAILED, [FailWith(PeerLostError)]),
    # -- WRITING: WriteDone guards
    Case(
        "writing-done-more-of-round",
        lambda: writing(10, 12, grant=4),
        S.WRITING,
        WriteDone(),
        S.STAGING,
        [FreeStaging(), Alloc(6, 1)],
    ),
    Case(
        "writing-done-end-of-round",
        lambda: writing(20, 12),
        S.WRITING,
        WriteDone(),
        S.WAIT_RESUME,
        [FreeStaging(), SendChunkDone(0, 0, 12, 20, False)],
    ),
    Case(
        "writing-done-last-round",
        lambda: writing(10, 12),
        S.WRITING,
        WriteDone(),
        S.DONE,
        [FreeStaging(), SendChunkDone(0, 0, 10, 10, True), Complete(10, META, DIGEST)],
    ),
    Case(
        "writing-done-exact-fit",
        lambda: writing(12, 12),
        S.WRITING,
        WriteDone(),
        S.DONE,
        [FreeStaging(), SendChunkDone(0, 0, 12, 12, True), Complete(12, META, DIGEST)],
    ),
    Case(
        "writing-done-round1-more",
        resumed_writing,
        S.WRITING,
        WriteDone(),
        S.STAGING,
        [FreeStaging(), Alloc(4, 1)],
    ),
    Case(
        "writing-failed",
        writing,
        S.WRITING,
        WriteFailed("nic down"),
        S.FAILED,
        [
            FreeStaging(),
            SendAbort("write failed: nic down"),
            FailWith(TransferError, "round 0", "nic down"),
        ],
    ),
    Case("writing-abort", writing, S.WRITING, AbortReceived("r"), S.DRAINING, []),
    Case("writing-local-abort", writing, S.WRITING, LocalAbort("c"), S.DRAINING, []),
    Case("writing-lost", writing, S.WRITING, PeerLost("p"), S.DRAINING, []),
    # write_timeout: the write is never abandoned while the engine may still read staging
    Case("writing-timeout", writing, S.WRITING, Timeout(), S.DRAINING, []),
    Case("writing-timeout-round1", resumed_writing, S.WRITING, Timeout(), S.DRAINING, []),
    # -- pipelined resume: the next round's grant while this round is staged or written
    Case("staging-early-resume", lambda: staging(20, 12), S.STAGING, EARLY, S.STAGING, []),
    Case("writing-early-resume", lambda: writing(20, 12), S.WRITING, EARLY, S.WRITING, []),
    # ... the next round starts straight after this one's ChunkDone, with its own deadline
    Case(
        "writing-done-pipelined",
        writing_ahead,
        S.WRITING,
        WriteDone(),
        S.STAGING,
        [FreeStaging(), SendChunkDone(0, 0, 12, 20, False), Alloc(8, 1)],
    ),
    Case(
        "staging-early-resume-twice",
        lambda: feed_on(staging(30, 12), EARLY),
        S.STAGING,
        ResumeReceived(2, (7,), 4, 20, D2),
        S.FAILED,
        peer_error("Resume for round 2 while round 1 is granted"),
    ),
    Case(
        "staging-early-resume-round-skipped",
        lambda: staging(30, 12),
        S.STAGING,
        ResumeReceived(2, (7,), 4, 12, D2),
        S.FAILED,
        peer_error("Resume for round 2, expected 1"),
    ),
    *[
        Case(
            f"staging-early-resume-{name}",
            lambda: staging(30, 12),
            S.STAGING,
            ResumeReceived(1, blocks, cap, 12, D1),
            S.FAILED,
            peer_error("Resume", why),
        )
        for name, blocks, cap, why in BAD_ALLOCATIONS
    ],
    # a write is in flight: the Abort waits for its end (DRAINING), as for any other give-up
    Case(
        "writing-early-resume-wrong-start",
        lambda: writing(20, 12),
        S.WRITING,
        ResumeReceived(1, (5, 6), 8, 11, D1),
        S.DRAINING,
        [],
    ),
    Case(
        "writing-early-resume-after-last",
        lambda: writing(10, 12),
        S.WRITING,
        ResumeReceived(1, (5, 6), 8, 10, D1),
        S.DRAINING,
        [],
    ),
    Case("draining-resume", lambda: draining("local"), S.DRAINING, EARLY, S.DRAINING, []),
    # -- WAIT_RESUME: Resume guards
    Case(
        "resume-ok",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(1, (5, 6), 8, 12),
        S.STAGING,
        [Alloc(8, 1)],
    ),
    Case(
        "resume-ok-roomy",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(1, (5, 6, 7), 12, 12),
        S.STAGING,
        [Alloc(8, 1)],
    ),
    Case(
        "resume-ok-small",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(1, (15,), 3, 12),
        S.STAGING,
        [Alloc(3, 1)],
    ),
    Case(
        "resume-round-same",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(0, (5, 6), 8, 12),
        S.FAILED,
        peer_error("Resume for round 0, expected 1"),
    ),
    Case(
        "resume-round-skipped",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(2, (5, 6), 8, 12),
        S.FAILED,
        peer_error("Resume for round 2, expected 1"),
    ),
    Case(
        "resume-received-short",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(1, (5, 6), 8, 11),
        S.FAILED,
        peer_error("Resume starts at token 11, round 1 starts at 12"),
    ),
    Case(
        "resume-received-long",
        wait_resume,
        S.WAIT_RESUME,
        ResumeReceived(1, (5, 6), 8, 13),
        S.FAILED,
        peer_error("Resume starts at token 13, round 1 starts at 12"),
    ),
    *[
        Case(
            f"resume-{name}",
            wait_resume,
            S.WAIT_RESUME,
            ResumeReceived(1, blocks, cap, 12),
            S.FAILED,
            peer_error("Resume", why),
        )
        for name, blocks, cap, why in BAD_ALLOCATIONS
    ],
    Case(
        "wait-resume-timeout",
        wait_resume,
        S.WAIT_RESUME,
        Timeout(),
        S.FAILED,
        [
            SendAbort("sender timeout: no Resume for the next round in time (resume_timeout)"),
            FailWith(TT, "WAIT_RESUME"),
        ],
    ),
    Case(
        "wait-resume-abort",
        wait_resume,
        S.WAIT_RESUME,
        AbortReceived("r"),
        S.FAILED,
        [SendAbortAck(), FailWith(TA)],
    ),
    Case(
        "wait-resume-local-abort",
        wait_resume,
        S.WAIT_RESUME,
        LocalAbort("c"),
        S.FAILED,
        [SendAbort("c"), FailWith(TA)],
    ),
    Case(
        "wait-resume-lost",
        wait_resume,
        S.WAIT_RESUME,
        PeerLost("p"),
        S.FAILED,
        [FailWith(PeerLostError)],
    ),
    # -- DRAINING: the write in flight ends; the owed reply goes out with the right error
    Case(
        "drain-abort-done",
        lambda: draining("abort"),
        S.DRAINING,
        WriteDone(),
        S.FAILED,
        [FreeStaging(), SendAbortAck(), FailWith(TA, "aborted by receiver: rcv gave up")],
    ),
    Case(
        "drain-abort-failed",
        lambda: draining("abort"),
        S.DRAINING,
        WriteFailed("x"),
        S.FAILED,
        [FreeStaging(), SendAbortAck(), FailWith(TA, "rcv gave up")],
    ),
    Case(
        "drain-local-done",
        lambda: draining("local"),
        S.DRAINING,
        WriteDone(),
        S.FAILED,
        [FreeStaging(), SendAbort("cancel"), FailWith(TA, "cancel")],
    ),
    Case(
        "drain-local-failed",
        lambda: draining("local"),
        S.DRAINING,
        WriteFailed("x"),
        S.FAILED,
        [FreeStaging(), SendAbort("cancel"), FailWith(TA, "cancel")],
    ),
    Case(
        "drain-lost-done",
        lambda: draining("lost"),
        S.DRAINING,
        WriteDone(),
        S.FAILED,
        [FreeStaging(), FailWith(PeerLostError, "conn reset")],
    ),
    Case(
        "drain-lost-failed",
        lambda: draining("lost"),
        S.DRAINING,
        WriteFailed("x"),
        S.FAILED,
        [FreeStaging(), FailWith(PeerLostError, "conn reset")],
    ),
    Case(
        "drain-timeout-done",
        lambda: draining("timeout"),
        S.DRAINING,
        WriteDone(),
        S.FAILED,
        [FreeStaging(), SendAbort("sender write timed out"), DRAIN_ERRORS["timeout"]],
    ),
    Case(
        "drain-timeout-failed",
        lambda: draining("timeout"),
        S.DRAINING,
        WriteFailed("cancelled"),
        S.FAILED,
        [FreeStaging(), SendAbort("sender write timed out"), DRAIN_ERRORS["timeout"]],
    ),
    # DRAINING's own deadline (abort_ack_timeout): give up on the write; its staging goes back
    # whenever it ends, and no Abort or AbortAck is sent (nothing proves it will not land)
    *[
        Case(
            f"drain-{cause}-timeout",
            functools.partial(draining, cause),
            S.DRAINING,
            Timeout(),
            S.FAILED,
            [FreeStagingAfterWrite(), DRAIN_ERRORS[cause]],
        )
        for cause in DRAIN_CAUSES
    ],
    Case(
        "drain-timeout-then-abort",
        lambda: draining("timeout"),
        S.DRAINING,
        AbortReceived("r"),
        S.DRAINING,
        [],
    ),
    Case(
        "drain-timeout-then-local",
        lambda: draining("timeout"),
        S.DRAINING,
        LocalAbort("c"),
        S.DRAINING,
        [],
    ),
    Case(
        "drain-timeout-then-lost",
        lambda: draining("timeout"),
        S.DRAINING,
        PeerLost("p"),
        S.DRAINING,
        [],
    ),
    Case(
        "drain-local-then-abort",
        lambda: draining("local"),
        S.DRAINING,
        AbortReceived("r"),
        S.DRAINING,
        [],
    ),
    Case(
        "drain-abort-then-local",
        lambda: draining("abort"),
        S.DRAINING,
        LocalAbort("c"),
        S.DRAINING,
        [],
    ),
    Case(
        "drain-abort-then-lost",
        lambda: draining("abort"),
        S.DRAINING,
        PeerLost("p"),
        S.DRAINING,
        [],
    ),
    # -- terminal states
    Case("done-abort", done, S.DONE, AbortReceived("late"), S.DONE, [SendAbortAck()]),
    Case("done-local-abort", done, S.DONE, LocalAbort("late"), S.DONE, []),
    Case("done-lost", done, S.DONE, PeerLost("late"), S.DONE, []),
    Case("failed-abort", failed, S.FAILED, AbortReceived("late"), S.FAILED, [SendAbortAck()]),
    Case("failed-local-abort", failed, S.FAILED, LocalAbort("again"), S.FAILED, []),
    Case("failed-lost", failed, S.FAILED, PeerLost("p"), S.FAILED, []),
    Case("failed-timeout", failed, S.FAILED, Timeout(), S.FAILED, []),
    # the receiver allocated after we gave up: tell it, so it frees at once
    Case(
        "failed-late-init",
        failed,
        S.FAILED,
        init(),
        S.FAILED,
        [SendAbort("request already ended on the sender")],
    ),
    # our Abort already tells the receiver to free the Resume's allocation
    Case(
        "failed-late-resume",
        failed,
        S.FAILED,
        ResumeReceived(1, (5, 6), 8, 12, D1),
        S.FAILED,
        [],
    ),
    # the write abandoned by DRAINING's deadline ends after the request did
    *[
        Case(f"{name}-{type(e).__name__}", build, S.FAILED, e, S.FAILED, [])
        for name, build in (
            ("abandoned", lambda: abandoned("local")),
            ("abandoned-lost", lambda: abandoned("lost")),
            ("failed", failed),
        )
        for e in (WriteDone(), WriteFailed("late"))
    ],
    Case("abandoned-timeout", lambda: abandoned("timeout"), S.FAILED, Timeout(), S.FAILED, []),
]


def test_cases_cover_every_transition() -> None:
    covered = set()
    for case in CASES:
        m = case.build()
        assert m.state is case.start, case.id
        covered.add((case.start, type(case.event)))
    assert covered == set(SenderMachine.TRANSITIONS)


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
    assert m.finished == (case.end in (S.DONE, S.FAILED))


# ------------------------------------------------------------------ multi-step sequences


def test_data_first_and_init_first_begin_the_same_round() -> None:
    a = wait_init(10)
    b = wait_data(12)
    assert a.handle(init(12)) == b.handle(data(10)) == [Alloc(10, 1)]
    assert a.state is b.state is S.STAGING
    assert a.dest_blocks == b.dest_blocks == (9, 3, 4)
    assert a.round == b.round == 0


def test_round_in_several_staged_writes() -> None:
    m = staging(10, 12)
    assert feed(m, AllocGranted((0,), 4)) == [Write(0, 0, 0, 4, D0)]
    assert feed(m, WriteDone()) == [FreeStaging(), Alloc(6, 1)]
    assert feed(m, AllocGranted((1,), 4)) == [Write(0, 4, 4, 4, D0)]
    assert feed(m, WriteDone()) == [FreeStaging(), Alloc(2, 1)]
    assert feed(m, AllocGranted((2,), 4)) == [Write(0, 8, 8, 2, D0)]  # capped at the rest
    assert feed(m, WriteDone()) == [
        FreeStaging(),
        SendChunkDone(0, 0, 10, 10, True),
        Complete(10, META, DIGEST),
    ]
    assert m.state is S.DONE


def test_three_rounds_with_offsets() -> None:
    """30 tokens: round 0 takes 12, round 1 takes 8 (staged 4+4), round 2 the last 10."""
    m = wait_resume(30, 12)
    assert feed(m, ResumeReceived(1, (5, 6), 8, 12, D1)) == [Alloc(8, 1)]
    assert m.dest_blocks == (5, 6)
    assert feed(m, AllocGranted((2,), 4)) == [Write(1, 12, 0, 4, D1)]
    assert feed(m, WriteDone()) == [FreeStaging(), Alloc(4, 1)]
    assert feed(m, AllocGranted((0,), 4)) == [Write(1, 16, 4, 4, D1)]
    assert feed(m, WriteDone()) == [FreeStaging(), SendChunkDone(1, 12, 8, 30, False)]
    assert m.state is S.WAIT_RESUME
    assert feed(m, ResumeReceived(2, (15, 0, 1), 12, 20, D2)) == [Alloc(10, 1)]
    assert m.dest_blocks == (15, 0, 1)
    assert feed(m, AllocGranted((0, 1, 2), 10)) == [Write(2, 20, 0, 10, D2)]
    assert feed(m, WriteDone()) == [
        FreeStaging(),
        SendChunkDone(2, 20, 10, 30, True),
        Complete(30, META, DIGEST),
    ]
    assert m.state is S.DONE
    assert m.sent == 30


def test_resume_repeating_a_finished_round_fails() -> None:
    m = wait_resume(30, 12)
    feed(m, ResumeReceived(1, (5, 6), 8, 12), AllocGranted((2, 3), 8), WriteDone())
    assert m.state is S.WAIT_RESUME
    assert feed(m, ResumeReceived(1, (5, 6), 8, 12)) == peer_error("round 1, expected 2")
    assert m.state is S.FAILED


def test_resume_may_reuse_the_previous_rounds_blocks() -> None:
    # a round is named by its number, never by comparing block lists
    m = wait_resume(20, 12)
    assert feed(m, ResumeReceived(1, (9, 3, 4), 8, 12)) == [Alloc(8, 1)]


def test_resume_block_at_pool_edge_is_accepted() -> None:
    m = wait_resume(20, 12)
    assert feed(m, ResumeReceived(1, (REMOTE - 1, 0), 8, 12)) == [Alloc(8, 1)]


def test_init_capacity_exactly_fills_blocks() -> None:
    m = wait_init(100)
    assert feed(m, InitReceived((0, 1, 2), 3 * B)) == [SendTotal(100), Alloc(3 * B, 1)]


def test_init_capacity_below_blocks_is_accepted() -> None:
    m = wait_init(100)
    acts = feed(m, InitReceived((0, 1, 2), 3 * B - 3))
    assert acts == [SendTotal(100), Alloc(3 * B - 3, 1)]


def test_drain_local_then_peer_abort_replies_with_ack() -> None:
    m = draining("local")
    assert feed(m, AbortReceived("r")) == []
    assert feed(m, WriteDone()) == [FreeStaging(), SendAbortAck(), FailWith(TA, "cancel")]


def test_drain_abort_then_peer_lost_drops_the_reply() -> None:
    m = draining("abort")
    assert feed(m, PeerLost("p")) == []
    # the reply is dropped; the error stays the first cause
    assert feed(m, WriteDone()) == [FreeStaging(), FailWith(TA, "rcv gave up")]


def test_drain_local_then_peer_lost_drops_the_reply() -> None:
    m = draining("local")
    assert feed(m, PeerLost("p")) == []
    assert feed(m, WriteFailed("torn down")) == [FreeStaging(), FailWith(TA, "cancel")]


def test_drain_abort_then_local_keeps_the_ack() -> None:
    m = draining("abort")
    assert feed(m, LocalAbort("c")) == []
    assert feed(m, WriteDone()) == [FreeStaging(), SendAbortAck(), FailWith(TA, "rcv gave up")]


def test_drain_lost_then_local_sends_nothing() -> None:
    m = draining("lost")
    assert feed(m, LocalAbort("c")) == []
    assert feed(m, WriteDone()) == [FreeStaging(), FailWith(PeerLostError, "conn reset")]


def test_draining_in_a_later_round() -> None:
    m = resumed_writing()
    assert feed(m, LocalAbort("c")) == []
    assert feed(m, WriteDone()) == [FreeStaging(), SendAbort("c"), FailWith(TA)]


def test_write_done_while_draining_sends_no_chunk_done() -> None:
    # even when the drained write was the last one, the peer is told about the abort only
    m = writing(10, 12)
    feed(m, LocalAbort("c"))
    acts = feed(m, WriteDone())
    assert not any(isinstance(a, (SendChunkDone, Complete)) for a in acts)


def test_done_and_failed_ack_repeated_aborts() -> None:
    m = done()
    for _ in range(3):
        assert feed(m, AbortReceived("late")) == [SendAbortAck()]
    m = failed()
    for _ in range(3):
        assert feed(m, AbortReceived("late")) == [SendAbortAck()]
    assert m.state is S.FAILED


def test_one_outcome_per_request() -> None:
    """Complete or Fail appears exactly once, whatever follows in a terminal state."""
    m = draining("abort")
    outcomes = []
    for e in (
        PeerLost("p"),
        LocalAbort("c"),
        WriteDone(),
        AbortReceived("r"),
        LocalAbort("c"),
        PeerLost("p"),
        Timeout(),
    ):
        outcomes += [a for a in m.handle(e) if isinstance(a, (Fail, Complete))]
    assert len(outcomes) == 1


# ----------------------------------------------------------------------- error types


@pytest.mark.parametrize(
    ("build", "event", "cls"),
    [
        (wait_init, Timeout(), TransferTimeout),
        (wait_data, Timeout(), TransferTimeout),
        (staging, Timeout(), AllocationTimeout),
        (wait_resume, Timeout(), TransferTimeout),
        (new, AbortReceived(), TransferAborted),
        (wait_resume, AbortReceived(), TransferAborted),
        (wait_data, LocalAbort(), TransferAborted),
        (staging, PeerLost(), PeerLostError),
        (wait_resume, PeerLost(), PeerLostError),
        (wait_init, InitReceived((1, 1), 4), ProtocolError),
        (wait_resume, ResumeReceived(5, (1,), 4, 12), ProtocolError),
        (writing, WriteFailed("x"), TransferError),
        (lambda: draining("timeout"), WriteDone(), TransferTimeout),
        (lambda: draining("timeout"), WriteFailed("x"), TransferTimeout),
        (lambda: draining("timeout"), Timeout(), TransferTimeout),
        (lambda: draining("local"), Timeout(), TransferAborted),
        (lambda: draining("abort"), Timeout(), TransferAborted),
        (lambda: draining("lost"), Timeout(), PeerLostError),
    ],
)
def test_fail_error_type(build: Callable[[], SenderMachine], event: Event, cls: type) -> None:
    acts = build().handle(event)
    fails = [a for a in acts if isinstance(a, Fail)]
    assert len(fails) == 1
    assert type(fails[0].error) is cls
    assert isinstance(fails[0].error, TransferError)


def test_peer_lost_error_is_a_transfer_error_and_connection_error() -> None:
    (fail,) = new().handle(PeerLost("x"))
    assert isinstance(fail, Fail)
    assert isinstance(fail.error, PeerLostError)
    assert isinstance(fail.error, ConnectionError)


# ------------------------------------------------------------------- invalid events


def test_sample_events_cover_every_event_class() -> None:
    assert set(SAMPLE_EVENTS) == set(all_event_types())


def test_state_paths_cover_every_state() -> None:
    assert set(STATE_PATHS) == set(SenderState)
    for state, build in STATE_PATHS.items():
        assert build().state is state


INVALID = invalid_pairs(SenderMachine, SenderState)


@pytest.mark.parametrize(
    ("state", "event_type"), INVALID, ids=[f"{s.name}-{e.__name__}" for s, e in INVALID]
)
def test_invalid_event_raises(state: SenderState, event_type: type[Event]) -> None:
    assert_refused(STATE_PATHS[state](), event_type, "sender", RID)


def test_invalid_table_is_not_empty() -> None:
    # sanity: both machine-specific events of the receiver are invalid everywhere here
    for state in SenderState:
        assert (state, Start) in INVALID
        assert (state, ChunkReceived) in INVALID
        assert (state, AbortAckReceived) in INVALID


def test_valid_events_match_the_table() -> None:
    for state in SenderState:
        expected = {et for (st, et) in SenderMachine.TRANSITIONS if st is state}
        assert SenderMachine.valid_events(state) == expected
        assert expected | {et for st, et in INVALID if st is state} == set(all_event_types())


# ------------------------------------------------------------------ late messages after failure


def test_late_init_after_wait_init_timeout_is_answered_with_abort() -> None:
    # Race: the sender times out in WAIT_INIT and fails without an Abort ("the receiver holds
    # nothing of ours") while the receiver's Init is already in flight. The late Init is no
    # protocol error; it is answered with an Abort so the receiver frees that allocation at
    # once (no write can ever land in it).
    m = wait_init(10)
    feed(m, Timeout())
    assert m.state is S.FAILED
    assert m.handle(init()) == [SendAbort("request already ended on the sender")]
    assert m.state is S.FAILED


@pytest.mark.parametrize("build", [new, wait_init], ids=["new", "wait-init"])
def test_late_init_after_local_abort_before_init_is_answered_with_abort(
    build: Callable[[], SenderMachine],
) -> None:
    # the same race through a LocalAbort in NEW or WAIT_INIT, which sends no Abort either
    m = build()
    assert not any(isinstance(a, SendAbort) for a in feed(m, LocalAbort("cancel")))
    assert m.handle(init()) == [SendAbort("request already ended on the sender")]
    assert m.state is S.FAILED


@pytest.mark.parametrize("cause", [Timeout(), LocalAbort("c")], ids=["timeout", "local"])
def test_late_resume_after_abort_in_wait_resume_is_ignored(cause: Event) -> None:
    # Race: the sender gives up in WAIT_RESUME (resume_timeout or a LocalAbort) and sends
    # Abort while the receiver's Resume is already in flight. The Abort already tells the
    # receiver to give that allocation up, so the late Resume is simply ignored.
    m = wait_resume(20, 12)
    want = "sender timeout: no Resume for the next round in time (resume_timeout)"
    assert feed(m, cause)[0] == SendAbort(getattr(cause, "reason", want))
    assert m.state is S.FAILED
    assert m.handle(ResumeReceived(1, (5, 6), 8, 12, D1)) == []
    assert m.state is S.FAILED


# ------------------------------------------------------------------- write deadlines


def test_write_carries_the_init_deadline_data_first() -> None:
    m = wait_init(10)
    feed(m, init(12, deadline=123.5))
    assert feed(m, AllocGranted((0, 1, 2), 10)) == [Write(0, 0, 0, 10, 123.5)]


def test_write_carries_the_init_deadline_init_first() -> None:
    # the Init waits in WAIT_DATA; its deadline is the one the round's writes carry
    m = new()
    feed(m, init(12, deadline=77.0), data(10))
    assert m.state is S.STAGING
    assert feed(m, AllocGranted((0, 1, 2), 10)) == [Write(0, 0, 0, 10, 77.0)]


def test_every_staged_write_of_a_round_carries_its_deadline() -> None:
    m = wait_init(10)
    feed(m, init(12, deadline=55.0))
    deadlines = []
    while m.state is S.STAGING:
        (w,) = feed(m, AllocGranted((0,), 3))
        assert isinstance(w, Write)
        deadlines.append(w.deadline)
        feed(m, WriteDone())
    assert m.state is S.DONE
    assert deadlines == [55.0] * 4  # 3 + 3 + 3 + 1 tokens


def test_each_round_carries_the_deadline_of_the_resume_that_granted_it() -> None:
    m = wait_init(30)
    feed(m, init(12, deadline=10.0))
    writes: list[Write] = []

    def run_round() -> None:
        while m.state is S.STAGING:
            acts = feed(m, AllocGranted((0,), 8))
            writes.extend(a for a in acts if isinstance(a, Write))
            feed(m, WriteDone())

    run_round()
    # a later deadline for round 1, an earlier one for round 2: each round keeps its own
    feed(m, ResumeReceived(1, (5, 6), 8, 12, deadline=20.0))
    run_round()
    feed(m, ResumeReceived(2, (7, 8, 9), 12, 20, deadline=15.0))
    run_round()
    assert m.state is S.DONE
    assert [(w.round, w.deadline) for w in writes] == [
        (0, 10.0),
        (0, 10.0),
        (1, 20.0),
        (2, 15.0),
        (2, 15.0),
    ]


def test_deadline_defaults_to_never() -> None:
    m = wait_init(10)
    feed(m, InitReceived((0, 1, 2), 12))
    (w,) = feed(m, AllocGranted((0, 1, 2), 10))
    assert isinstance(w, Write) and w.deadline == float("inf")
    assert InitReceived((0,), 4).deadline == ResumeReceived(1, (0,), 4, 4).deadline == w.deadline


def test_refused_resume_keeps_the_old_deadline_out_of_any_write() -> None:
    # a Resume that breaks the rules begins no round: no Write, whatever its deadline
    m = wait_resume(20, 12)
    acts = feed(m, ResumeReceived(1, (5, 5), 8, 12, deadline=1.0))
    assert not any(isinstance(a, Write) for a in acts) and m.state is S.FAILED


# ------------------------------------------------------------------- write timeouts


@pytest.mark.parametrize("end", [WriteDone(), WriteFailed("cancelled")], ids=["done", "failed"])
def test_write_timeout_waits_for_the_write_then_aborts(end: Event) -> None:
    m = writing(20, 12)
    assert m.timeout_name == "write_timeout"
    assert feed(m, Timeout()) == []  # the engine may still read the staging blocks
    assert m.state is S.DRAINING and m.timeout_name == "abort_ack_timeout"
    acts = feed(m, end)
    assert acts == [FreeStaging(), SendAbort("sender write timed out"), DRAIN_ERRORS["timeout"]]
    assert not any(isinstance(a, SendChunkDone) for a in acts)  # even after a WriteDone


def test_write_timeout_in_a_later_round_names_it() -> None:
    m = resumed_writing()
    feed(m, Timeout())
    acts = feed(m, WriteDone())
    assert acts == [
        FreeStaging(),
        SendAbort("sender write timed out"),
        FailWith(TT, "write of round 1 did not end within write_timeout"),
    ]


def test_write_timeout_then_peer_abort_replies_with_ack() -> None:
    m = draining("timeout")
    assert feed(m, AbortReceived("r")) == []
    assert feed(m, WriteDone()) == [FreeStaging(), SendAbortAck(), DRAIN_ERRORS["timeout"]]


def test_write_timeout_then_peer_lost_sends_nothing() -> None:
    m = draining("timeout")
    assert feed(m, PeerLost("p"), AbortReceived("r")) == []
    assert feed(m, WriteFailed("torn")) == [FreeStaging(), DRAIN_ERRORS["timeout"]]


@pytest.mark.parametrize("cause", list(DRAIN_CAUSES))
def test_drain_timeout_sends_neither_abort_nor_ack(cause: str) -> None:
    m = draining(cause)
    if cause != "lost":
        feed(m, AbortReceived("r"))  # an ack is owed now ...
    acts = feed(m, Timeout())
    # ... but nothing proves the write will not land: nothing is said
    assert acts == [FreeStagingAfterWrite(), DRAIN_ERRORS[cause]]
    assert m.finished
    # the abandoned write ends later: no second outcome, no message
    assert feed(m, WriteDone()) == [] and feed(m, WriteFailed("x")) == []


@pytest.mark.parametrize("cause", ["local", "timeout"])
def test_no_ack_while_an_abandoned_write_may_still_land(cause: str) -> None:
    # the sender gave up on its write without telling the receiver (DRAINING timed out);
    # the receiver's chunk timeout comes next, and its Abort reaches the sender while the
    # engine still runs the write: no AbortAck (nothing proves the write ended).
    m = abandoned(cause)
    assert SendAbortAck() not in m.handle(AbortReceived("no ChunkDone for round 0 in time"))


def test_one_outcome_per_request_with_an_abandoned_write() -> None:
    m = draining("local")
    outcomes = []
    for e in (
        Timeout(),
        AbortReceived("r"),
        WriteFailed("late"),
        WriteDone(),
        InitReceived((0,), 4),
        ResumeReceived(1, (0,), 4, 12),
        PeerLost("p"),
        Timeout(),
    ):
        outcomes += [a for a in m.handle(e) if isinstance(a, (Fail, Complete))]
    assert len(outcomes) == 1 and m.state is S.FAILED


# ---------------------------------------------------------------------------- misc


def test_timeouts_per_state() -> None:
    assert SenderMachine.TIMEOUTS == {
        S.WAIT_INIT: "init_timeout",
        S.WAIT_DATA: "data_timeout",
        S.STAGING: "alloc_timeout",
        S.WAIT_RESUME: "resume_timeout",
        S.WRITING: "write_timeout",
        S.DRAINING: "abort_ack_timeout",
    }
    # every state but NEW and the terminal ones has a Settings deadline, and takes the Timeout
    assert_timeouts_name_settings(SenderMachine, SenderState)
    assert new().timeout_name is None
    assert wait_init().timeout_name == "init_timeout"
    assert wait_data().timeout_name == "data_timeout"
    assert staging().timeout_name == "alloc_timeout"
    assert writing().timeout_name == "write_timeout"
    assert wait_resume().timeout_name == "resume_timeout"
    for cause in DRAIN_CAUSES:
        assert draining(cause).timeout_name == "abort_ack_timeout"
    assert done().timeout_name is None and abandoned("abort").timeout_name is None


def test_terminal_states() -> None:
    assert frozenset({S.DONE, S.FAILED}) == SenderMachine.TERMINAL
    assert done().finished and failed().finished and abandoned("timeout").finished
    for cause in DRAIN_CAUSES:
        assert not draining(cause).finished


def test_machine_does_not_share_state_between_requests() -> None:
    a, b = wait_resume(20, 12), new()
    assert b.state is S.NEW and b.round == -1 and b.sent == 0 and a.sent == 12


# ------------------------------------------- messages for a request with no session here


def test_unknown_rid_abort_is_acked() -> None:
    # no session: nothing of that attempt can be in flight (an abandoned write keeps its session)
    assert SenderMachine.answer_unknown(RID, SAMPLE_EVENTS[AbortReceived]) == [ev.SendAbortAck()]


def test_unknown_rid_resume_is_answered_with_abort_and_fails() -> None:
    acts = SenderMachine.answer_unknown(RID, SAMPLE_EVENTS[ResumeReceived])
    assert isinstance(acts[0], ev.SendAbort) and RID in acts[0].reason
    assert isinstance(acts[1], ev.Fail) and isinstance(acts[1].error, ProtocolError)
    assert len(acts) == 2


@pytest.mark.parametrize(
    "event_type",
    sorted(set(all_event_types()) - set(SenderMachine.UNKNOWN), key=lambda t: t.__name__),
    ids=lambda t: t.__name__,
)
def test_other_events_for_an_unknown_rid_are_refused(event_type: type[Event]) -> None:
    with pytest.raises(ProtocolError, match=f"sender: event {event_type.__name__} for unknown"):
        SenderMachine.answer_unknown(RID, SAMPLE_EVENTS[event_type])


@pytest.mark.parametrize(("kind", "cls"), [("", "TransferAborted"), ("unavailable", "Unavailable")])
def test_the_sender_types_an_abort_by_its_kind_too(kind: str, cls: str) -> None:
    m = wait_init()
    acts = m.handle(ev.AbortReceived("s", kind))
    (fail,) = [a for a in acts if isinstance(a, ev.Fail)]
    assert type(fail.error).__name__ == cls
    m = writing()
    m.handle(ev.LocalAbort("node closing", kind="unavailable"))  # drains first
    acts = m.handle(ev.WriteDone())
    (tell,) = [a for a in acts if isinstance(a, ev.SendAbort)]
    (fail,) = [a for a in acts if isinstance(a, ev.Fail)]
    assert tell.kind == "unavailable" and type(fail.error).__name__ == "Unavailable"


# ------------------------------------------------------------------- pipelined resume


def test_total_is_said_once_before_round_0_is_written_when_it_does_not_fit() -> None:
    for total, cap, told in ((20, 12, True), (12, 12, False), (5, 12, False)):
        m = wait_init(total)
        acts = feed(m, init(cap))
        assert (SendTotal(total) in acts) is told
        if told:
            assert acts.index(SendTotal(total)) < acts.index(Alloc(min(total, cap), 1))
    m = wait_data(12)  # Init first: said when the data come
    assert feed(m, data(40)) == [SendTotal(40), Alloc(12, 1)]


def test_a_pipelined_round_writes_into_its_own_grant_with_its_deadline() -> None:
    """Three rounds (12 + 8 + 4 of 24), each granted while the one before was written: the
    sender never waits in WAIT_RESUME, and each write names its round, blocks and deadline."""
    m = writing(24, 12)
    assert feed(m, EARLY) == []
    acts = feed(m, WriteDone())
    assert acts == [FreeStaging(), SendChunkDone(0, 0, 12, 24, False), Alloc(8, 1)]
    assert (m.round, m.dest_blocks, m.deadline) == (1, (5, 6), D1)
    assert feed(m, AllocGranted((3, 4), 8)) == [Write(1, 12, 0, 8, D1)]
    assert feed(m, ResumeReceived(2, (9,), 4, 20, D2)) == []  # round 2, while 1 is written
    acts = feed(m, WriteDone())
    assert acts == [FreeStaging(), SendChunkDone(1, 12, 8, 24, False), Alloc(4, 1)]
    assert feed(m, AllocGranted((3,), 4)) == [Write(2, 20, 0, 4, D2)]
    acts = feed(m, WriteDone())
    assert acts == [FreeStaging(), SendChunkDone(2, 20, 4, 24, True), Complete(24, META, DIGEST)]
    assert S.WAIT_RESUME not in {h[2] for h in m.history}


def test_a_bad_early_resume_during_a_write_aborts_once_the_write_ended() -> None:
    m = writing(20, 12)
    assert feed(m, ResumeReceived(1, (5, 6), 8, 11, D1)) == []
    assert m.state is S.DRAINING
    acts = feed(m, WriteDone())
    assert acts == [
        FreeStaging(),
        AbortWith("protocol error: ", "starts at token 11"),
        FailWith(PE, "Resume starts at token 11, round 1 starts at 12"),
    ]
