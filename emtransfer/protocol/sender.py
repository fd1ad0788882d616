"""The sender (encode side) machine of one request.

It needs two things before it can write: the payload (``DataReady``) and the receiver's first
allocation (``InitReceived``), in either order. Each round writes ``min(remaining, receiver
capacity)`` tokens, staged through the sender's own pool in as many pieces as its staging
allocations allow (no hold-and-wait: a staging allocation is held only while its write is in
flight). A write in flight is never abandoned: aborts, peer loss and cancellation wait in
``DRAINING`` for it to end before the staging blocks are freed and the peer is told.

    NEW --DataReady--> WAIT_INIT --InitReceived--> STAGING
    NEW --InitReceived--> WAIT_DATA --DataReady--> STAGING
    STAGING --AllocGranted--> WRITING --WriteDone--> STAGING (more of this round)
                                                 \\-> WAIT_RESUME --ResumeReceived--> STAGING
                                                 \\-> DONE (last round)
    WRITING --AbortReceived|LocalAbort|PeerLost|Timeout--> DRAINING --WriteDone|WriteFailed--> FAILED
    DRAINING --Timeout--> FAILED (staging freed whenever the engine lets go of the write)

Pipelined resume: when round 0's allocation cannot hold the payload, the sender says how
long it is (``Total``) before it writes, and the receiver may grant the next round while this
one is on the wire. Such an early ``Resume`` (in STAGING or WRITING, for the next round,
starting where this round ends) is kept, and the next round starts straight after this one's
``ChunkDone`` instead of waiting in WAIT_RESUME:

    WRITING --WriteDone (the next round granted already)--> STAGING (next round)

Each allocation the receiver grants carries a write deadline (``deadline`` of the Init and
Resume events, on this node's clock); every ``Write`` carries it, and the runtime never posts
a write after it. WRITING is bounded by ``write_timeout``, DRAINING by ``abort_ack_timeout``.
An ``Abort`` or ``AbortAck`` is sent only once no write is in flight: the receiver takes it
as proof.
"""

from __future__ import annotations

from enum import auto

from ..errors import (
    AllocationTimeout,
    ProtocolError,
    TransferError,
    TransferTimeout,
    abort_error,
)
from ..errors import PeerLost as PeerLostError
from . import events as ev
from .events import Action
from .machine import Machine, StateEnum


class SenderState(StateEnum):
    NEW = auto()
    WAIT_INIT = auto()
    WAIT_DATA = auto()
    STAGING = auto()
    WRITING = auto()
    WAIT_RESUME = auto()
    DRAINING = auto()
    DONE = auto()
    FAILED = auto()


S = SenderState
Result = tuple[SenderState, list[Action]]


class SenderMachine(Machine[SenderState]):
    ROLE = "sender"

    def __init__(self, rid: str, *, block_size: int, remote_num_blocks: int) -> None:
        super().__init__(rid, S.NEW)
        self.block_size = block_size
        self.remote_num_blocks = remote_num_blocks
        self.total: int | None = None
        self.meta: dict | None = None
        self.digest: str | None = None
        self.round = -1
        self.sent = 0  # tokens in completed rounds
        self.dest_blocks: tuple[int, ...] = ()
        self.deadline = float("inf")  # the current grant's write deadline
        self.round_count = 0  # tokens this round writes
        self.round_written = 0  # of those, written so far
        self.pending = 0  # tokens of the write in flight
        self._init: ev.InitReceived | None = None
        self._ahead: ev.ResumeReceived | None = None  # the next round's grant, come early
        self._drain_reply: Action | None = None
        self._drain_error: TransferError | None = None
        self._peer_gone = False
        #: a write outlived DRAINING's deadline: until it ends, no Abort or AbortAck may claim
        #: that nothing of ours is in flight
        self.write_abandoned = False

    # -- helpers -----------------------------------------------------------------------------
    def _check_allocation(self, blocks: tuple[int, ...], capacity: int) -> str | None:
        if len(set(blocks)) != len(blocks):
            return f"{len(blocks) - len(set(blocks))} duplicate blocks in {_few(blocks)}"
        bad = [b for b in blocks if b >= self.remote_num_blocks]
        if bad:
            return f"{len(bad)} blocks {_few(bad)} outside the receiver's pool of {self.remote_num_blocks}"
        if capacity > len(blocks) * self.block_size:
            return f"capacity {capacity} exceeds {len(blocks)} blocks of {self.block_size}"
        return None

    def _peer_error(self, why: str) -> Result:
        err = ProtocolError(f"rid={self.rid!r}: {why}")
        return S.FAILED, [ev.SendAbort(f"protocol error: {why}"), ev.Fail(err)]

    def _begin_round(self, blocks: tuple[int, ...], capacity: int, deadline: float) -> Result:
        assert self.total is not None
        self.round += 1
        self.dest_blocks = blocks
        self.deadline = deadline
        self.round_count = min(self.total - self.sent, capacity)
        self.round_written = 0
        acts: list[Action] = []
        if self.round == 0 and self.round_count < self.total:
            acts.append(ev.SendTotal(self.total))  # before the write: round 1 can be ready
        return S.STAGING, [*acts, ev.Alloc(self.round_count, min_tokens=1)]

    # -- handlers ----------------------------------------------------------------------------
    def _data_first(self, e: ev.DataReady) -> Result:
        self.total, self.meta, self.digest = e.total_tokens, e.meta, e.digest
        return S.WAIT_INIT, []

    def _init_first(self, e: ev.InitReceived) -> Result:
        why = self._check_allocation(e.blocks, e.capacity_tokens)
        if why:
            return self._peer_error(f"Init: {why}")
        self._init = e
        return S.WAIT_DATA, []

    def _data_after_init(self, e: ev.DataReady) -> Result:
        self.total, self.meta, self.digest = e.total_tokens, e.meta, e.digest
        assert self._init is not None
        i = self._init
        return self._begin_round(i.blocks, i.capacity_tokens, i.deadline)

    def _init_after_data(self, e: ev.InitReceived) -> Result:
        why = self._check_allocation(e.blocks, e.capacity_tokens)
        if why:
            return self._peer_error(f"Init: {why}")
        return self._begin_round(e.blocks, e.capacity_tokens, e.deadline)

    def _granted(self, e: ev.AllocGranted) -> Result:
        n = min(e.capacity_tokens, self.round_count - self.round_written)
        self.pending = n
        start = self.sent + self.round_written
        return S.WRITING, [ev.Write(self.round, start, self.round_written, n, self.deadline)]

    def _written(self, e: ev.WriteDone) -> Result:
        assert self.total is not None
        self.round_written += self.pending
        self.pending = 0
        if self.round_written < self.round_count:
            rest = self.round_count - self.round_written
            return S.STAGING, [ev.FreeStaging(), ev.Alloc(rest, min_tokens=1)]
        start = self.sent
        self.sent += self.round_count
        last = self.sent == self.total
        chunk = ev.SendChunkDone(self.round, start, self.round_count, self.total, last)
        if last:
            done = ev.Complete(self.total, self.meta, self.digest)
            return S.DONE, [ev.FreeStaging(), chunk, done]
        if self._ahead is not None:  # pipelined: the next round's grant is here already
            nxt, self._ahead = self._ahead, None
            state, acts = self._begin_round(nxt.blocks, nxt.capacity_tokens, nxt.deadline)
            return state, [ev.FreeStaging(), chunk, *acts]
        return S.WAIT_RESUME, [ev.FreeStaging(), chunk]

    def _write_failed(self, e: ev.WriteFailed) -> Result:
        err = TransferError(f"rid={self.rid!r}: write of round {self.round} failed: {e.reason}")
        return S.FAILED, [ev.FreeStaging(), ev.SendAbort(f"write failed: {e.reason}"), ev.Fail(err)]

    def resume_error(self, e: ev.ResumeReceived) -> str | None:
        """Why this Resume breaks the rules now, or None. One that comes while the current
        round is still written (pipelined) must start where that round ends."""
        early = self.state in (S.STAGING, S.WRITING)
        if early and self._ahead is not None:
            return f"Resume for round {e.round} while round {self._ahead.round} is granted"
        if e.round != self.round + 1:
            return f"Resume for round {e.round}, expected {self.round + 1}"
        start = self.sent + (self.round_count if early else 0)
        if early and start >= (self.total or 0):
            return f"Resume for round {e.round}, but round {self.round} is the last"
        if e.received_tokens != start:
            return f"Resume starts at token {e.received_tokens}, round {e.round} starts at {start}"
        why = self._check_allocation(e.blocks, e.capacity_tokens)
        return f"Resume: {why}" if why else None

    def _resume(self, e: ev.ResumeReceived) -> Result:
        why = self.resume_error(e)
        if why:
            return self._peer_error(why)
        return self._begin_round(e.blocks, e.capacity_tokens, e.deadline)

    def _early_resume(self, e: ev.ResumeReceived) -> Result:
        """The next round's grant, while this round is still being written: keep it."""
        why = self.resume_error(e)
        if why is None:
            self._ahead = e
            return self.state, []
        if self.state is S.STAGING:  # nothing in flight: tell the receiver at once
            return self._peer_error(why)
        self._drain_reply = ev.SendAbort(f"protocol error: {why}")  # once the write ended
        self._drain_error = ProtocolError(f"rid={self.rid!r}: {why}")
        return S.DRAINING, []

    def _timeout(self, e: ev.Timeout) -> Result:
        kind = AllocationTimeout if self.state is S.STAGING else TransferTimeout
        err = kind(
            f"rid={self.rid!r}: timed out in sender state {self.state.name} "
            f"({self.TIMEOUTS.get(self.state, 'a timeout')})"
        )
        # before Init the receiver holds nothing of ours: no Abort needed
        name = self.TIMEOUTS.get(self.state, "a timeout")
        what = _WAITED_FOR.get(self.state, "the next step")
        acts: list[Action] = (
            [] if self.state is S.WAIT_INIT else [ev.SendAbort(f"sender timeout: {what} ({name})")]
        )
        return S.FAILED, [*acts, ev.Fail(err)]

    def _aborted(self, e: ev.AbortReceived) -> Result:
        err = abort_error(e.kind, f"rid={self.rid!r}: aborted by receiver: {e.reason}")
        return S.FAILED, [ev.SendAbortAck(), ev.Fail(err)]

    def _local_abort(self, e: ev.LocalAbort) -> Result:
        err = abort_error(e.kind, f"rid={self.rid!r}: {e.reason}")
        tell: list[Action] = [ev.SendAbort(e.reason, e.kind)]
        acts = [] if self.state in (S.NEW, S.WAIT_INIT) else tell
        return S.FAILED, [*acts, ev.Fail(err)]

    def _lost(self, e: ev.PeerLost) -> Result:
        return S.FAILED, [ev.Fail(PeerLostError(f"rid={self.rid!r}: {e.reason}"))]

    def _drain_on_abort(self, e: ev.AbortReceived) -> Result:
        self._drain_reply = ev.SendAbortAck()
        self._drain_error = abort_error(
            e.kind, f"rid={self.rid!r}: aborted by receiver: {e.reason}"
        )
        return S.DRAINING, []

    def _drain_on_local(self, e: ev.LocalAbort) -> Result:
        self._drain_reply = ev.SendAbort(e.reason, e.kind)
        self._drain_error = abort_error(e.kind, f"rid={self.rid!r}: {e.reason}")
        return S.DRAINING, []

    def _drain_on_lost(self, e: ev.PeerLost) -> Result:
        self._peer_gone = True
        self._drain_reply = None
        self._drain_error = PeerLostError(f"rid={self.rid!r}: {e.reason}")
        return S.DRAINING, []

    def _drain_on_timeout(self, e: ev.Timeout) -> Result:
        self._drain_reply = ev.SendAbort("sender write timed out")
        self._drain_error = TransferTimeout(
            f"rid={self.rid!r}: write of round {self.round} did not end within write_timeout"
        )
        return S.DRAINING, []

    def _drain_timeout(self, e: ev.Timeout) -> Result:
        # the write still runs: its staging blocks go back when it ends, and no Abort or
        # AbortAck is sent, since we cannot prove that nothing more lands
        assert self._drain_error is not None
        self.write_abandoned = True
        return S.FAILED, [ev.FreeStagingAfterWrite(), ev.Fail(self._drain_error)]

    def _drained(self, e: ev.Event) -> Result:
        assert self._drain_error is not None
        reply = [self._drain_reply] if self._drain_reply is not None else []
        return S.FAILED, [ev.FreeStaging(), *reply, ev.Fail(self._drain_error)]

    def _drain_more(self, e: ev.Event) -> Result:
        # a second reason to stop while draining: the peer asked for an ack, or vanished
        if isinstance(e, ev.PeerLost):
            self._peer_gone = True
        if self._peer_gone:
            self._drain_reply = None  # nobody left to tell
        elif isinstance(e, ev.AbortReceived):
            self._drain_reply = ev.SendAbortAck()
        return S.DRAINING, []

    def _late_init(self, e: ev.InitReceived) -> Result:
        # the receiver allocated after we gave up: tell it, so it frees at once
        return self.state, [ev.SendAbort("request already ended on the sender")]

    def _ack_late(self, e: ev.AbortReceived) -> Result:
        # the receiver gave up while we finished or failed: nothing is in flight, say so --
        # unless a write we gave up on may still land (the receiver then waits for expiry)
        if self.write_abandoned:
            return self.state, []
        return self.state, [ev.SendAbortAck()]

    def _late_write_end(self, e: ev.Event) -> Result:
        self.write_abandoned = False
        return self.state, []

    def _ignore(self, e: ev.Event) -> Result:
        return self.state, []

    TIMEOUTS = {
        S.WAIT_INIT: "init_timeout",
        S.WAIT_DATA: "data_timeout",
        S.STAGING: "alloc_timeout",
        S.WAIT_RESUME: "resume_timeout",
        S.WRITING: "write_timeout",
        S.DRAINING: "abort_ack_timeout",
    }
    TERMINAL = frozenset({S.DONE, S.FAILED})


def _few(blocks: tuple[int, ...] | list[int]) -> str:
    head = ", ".join(map(str, blocks[:8]))
    return f"[{head}{', ...' if len(blocks) > 8 else ''}]"


#: what a sender that timed out was waiting for, in the words its Abort carries
_WAITED_FOR = {
    S.WAIT_DATA: "the payload was not ready in time",
    S.STAGING: "no blocks to stage the payload in time",
    S.WAIT_RESUME: "no Resume for the next round in time",
    S.WRITING: "a write did not end in time",
    S.DRAINING: "no AbortAck in time",
}

_F = frozenset
_M = SenderMachine
_WAITING = (S.NEW, S.WAIT_INIT, S.WAIT_DATA, S.STAGING, S.WAIT_RESUME)
SenderMachine.TRANSITIONS = {
    (S.NEW, ev.DataReady): (_M._data_first, _F({S.WAIT_INIT})),
    (S.NEW, ev.InitReceived): (_M._init_first, _F({S.WAIT_DATA, S.FAILED})),
    (S.WAIT_INIT, ev.InitReceived): (_M._init_after_data, _F({S.STAGING, S.FAILED})),
    (S.WAIT_DATA, ev.DataReady): (_M._data_after_init, _F({S.STAGING})),
    (S.STAGING, ev.AllocGranted): (_M._granted, _F({S.WRITING})),
    (S.WRITING, ev.WriteDone): (_M._written, _F({S.STAGING, S.WAIT_RESUME, S.DONE})),
    (S.WRITING, ev.WriteFailed): (_M._write_failed, _F({S.FAILED})),
    (S.WAIT_RESUME, ev.ResumeReceived): (_M._resume, _F({S.STAGING, S.FAILED})),
    (S.STAGING, ev.ResumeReceived): (_M._early_resume, _F({S.STAGING, S.FAILED})),
    (S.WRITING, ev.ResumeReceived): (_M._early_resume, _F({S.WRITING, S.DRAINING})),
    (S.DRAINING, ev.ResumeReceived): (_M._ignore, _F({S.DRAINING})),
    (S.WRITING, ev.AbortReceived): (_M._drain_on_abort, _F({S.DRAINING})),
    (S.WRITING, ev.LocalAbort): (_M._drain_on_local, _F({S.DRAINING})),
    (S.WRITING, ev.PeerLost): (_M._drain_on_lost, _F({S.DRAINING})),
    (S.DRAINING, ev.WriteDone): (_M._drained, _F({S.FAILED})),
    (S.DRAINING, ev.WriteFailed): (_M._drained, _F({S.FAILED})),
    (S.DRAINING, ev.AbortReceived): (_M._drain_more, _F({S.DRAINING})),
    (S.DRAINING, ev.LocalAbort): (_M._drain_more, _F({S.DRAINING})),
    (S.DRAINING, ev.PeerLost): (_M._drain_more, _F({S.DRAINING})),
    (S.WRITING, ev.Timeout): (_M._drain_on_timeout, _F({S.DRAINING})),
    (S.DRAINING, ev.Timeout): (_M._drain_timeout, _F({S.FAILED})),
    (S.DONE, ev.AbortReceived): (_M._ack_late, _F({S.DONE})),
    (S.DONE, ev.LocalAbort): (_M._ignore, _F({S.DONE})),
    (S.DONE, ev.PeerLost): (_M._ignore, _F({S.DONE})),
    (S.FAILED, ev.AbortReceived): (_M._ack_late, _F({S.FAILED})),
    (S.FAILED, ev.LocalAbort): (_M._ignore, _F({S.FAILED})),
    (S.FAILED, ev.InitReceived): (_M._late_init, _F({S.FAILED})),
    (S.FAILED, ev.ResumeReceived): (_M._ignore, _F({S.FAILED})),
    (S.FAILED, ev.PeerLost): (_M._ignore, _F({S.FAILED})),
    (S.FAILED, ev.Timeout): (_M._ignore, _F({S.FAILED})),
    # a write that outlived DRAINING's deadline ends after the request did
    (S.FAILED, ev.WriteDone): (_M._late_write_end, _F({S.FAILED})),
    (S.FAILED, ev.WriteFailed): (_M._late_write_end, _F({S.FAILED})),
    **{(st, ev.Timeout): (_M._timeout, _F({S.FAILED})) for st in _WAITING if st is not S.NEW},
    **{(st, ev.AbortReceived): (_M._aborted, _F({S.FAILED})) for st in _WAITING},
    **{(st, ev.LocalAbort): (_M._local_abort, _F({S.FAILED})) for st in _WAITING},
    **{(st, ev.PeerLost): (_M._lost, _F({S.FAILED})) for st in _WAITING},
}


def _unknown_abort(rid: str, e: ev.AbortReceived) -> list[Action]:
    # no session: nothing of that attempt is in flight (a sender whose abandoned write may
    # still land keeps its session until the write ends, and answers from its own table)
    return [ev.SendAbortAck()]


def _unknown_resume(rid: str, e: ev.ResumeReceived) -> list[Action]:
    why = f"Resume for unknown rid {rid!r}"
    return [ev.SendAbort(f"unknown rid {rid!r}"), ev.Fail(ProtocolError(why))]


SenderMachine.UNKNOWN = {
    ev.AbortReceived: _unknown_abort,
    ev.ResumeReceived: _unknown_resume,
}
