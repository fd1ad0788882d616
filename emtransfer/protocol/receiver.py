"""The receiver (language side) machine of one request.

The receiver may not know the length. It asks for ``expected_tokens`` (or the default
allocation), sends ``Init``, and for every ``ChunkDone`` copies the round out and frees the
allocation *before* asking for the next one (no hold-and-wait across rounds), then sends
``Resume`` with the next allocation, until ``is_last``. Rounds are named by number.

    NEW --Start--> ALLOCATING --AllocGranted--> WAIT_CHUNK --ChunkReceived--> ALLOCATING | DONE

When it gives up while a write may still land in its allocation (a timeout or a local abort
in ``WAIT_CHUNK``, or a chunk that breaks the rules) the allocation is quarantined until the
sender's ``AbortAck`` or the peer's teardown says nothing can land any more.
"""

from __future__ import annotations

from enum import Enum, auto

from ..errors import AllocationTimeout, ProtocolError, TransferAborted, TransferTimeout
from ..errors import PeerLost as PeerLostError
from . import events as ev
from .events import Action
from .machine import Machine


class ReceiverState(Enum):
    NEW = auto()
    ALLOCATING = auto()
    WAIT_CHUNK = auto()
    QUARANTINED = auto()
    DONE = auto()
    FAILED = auto()


R = ReceiverState
Result = tuple[ReceiverState, list[Action]]


class ReceiverMachine(Machine[ReceiverState]):
    ROLE = "receiver"

    def __init__(self, rid: str, *, block_size: int, default_tokens: int) -> None:
        super().__init__(rid, R.NEW)
        self.block_size = block_size
        self.default_tokens = default_tokens
        self.round = -1  # round of the current (or requested) allocation
        self.received = 0
        self.total: int | None = None
        self.capacity = 0
        self.whole = False
        self.expected: int | None = None

    def _alloc_next(self, want: int, whole: bool) -> Result:
        self.round += 1
        least = want if whole else 1
        return R.ALLOCATING, [ev.Alloc(want, min_tokens=least)]

    # -- handlers ----------------------------------------------------------------------------
    def _start(self, e: ev.Start) -> Result:
        if e.expected_tokens is not None and e.expected_tokens <= 0:
            raise ProtocolError(f"rid={self.rid!r}: expected_tokens must be > 0")
        self.whole = e.whole
        self.expected = e.expected_tokens
        return self._alloc_next(e.expected_tokens or self.default_tokens, e.whole)

    def _granted(self, e: ev.AllocGranted) -> Result:
        self.capacity = e.capacity_tokens
        if self.round == 0:
            return R.WAIT_CHUNK, [ev.SendInit(e.blocks, e.capacity_tokens, self.expected)]
        msg = ev.SendResume(self.round, e.blocks, e.capacity_tokens, self.received)
        return R.WAIT_CHUNK, [msg]

    def chunk_error(self, e: ev.ChunkReceived) -> str | None:
        """Why this chunk breaks the rules in the current state, or None."""
        if self.state is not R.WAIT_CHUNK:
            return f"ChunkDone in state {self.state.name}"
        if e.round != self.round:
            return f"ChunkDone for round {e.round}, expected round {self.round}"
        if e.start != self.received:
            return f"ChunkDone starts at token {e.start}, {self.received} were received"
        if e.count > self.capacity:
            return f"ChunkDone count {e.count} exceeds the allocation's {self.capacity} tokens"
        if self.total is not None and e.total_tokens != self.total:
            return f"total_tokens changed from {self.total} to {e.total_tokens}"
        if e.start + e.count > e.total_tokens:
            return f"tokens [{e.start}, {e.start + e.count}) run past total {e.total_tokens}"
        if e.is_last != (e.start + e.count == e.total_tokens):
            return f"is_last={e.is_last} but {e.start + e.count} of {e.total_tokens} tokens"
        if e.count < min(self.capacity, e.total_tokens - e.start):
            return f"ChunkDone count {e.count} leaves the allocation part-filled mid-transfer"
        return None

    def _chunk(self, e: ev.ChunkReceived) -> Result:
        why = self.chunk_error(e)
        if why:
            err = ProtocolError(f"rid={self.rid!r}: {why}")
            return R.QUARANTINED, [
                ev.Quarantine(),
                ev.SendAbort(f"protocol error: {why}"),
                ev.Fail(err),
            ]
        self.total = e.total_tokens
        self.received += e.count
        if e.is_last and self.round == 0 and self.whole:
            return R.DONE, [ev.Complete(e.total_tokens, e.meta, e.digest, in_place=True)]
        acts: list[Action] = [ev.Deliver(e.round, e.start, e.count), ev.Free()]
        if e.is_last:
            return R.DONE, [*acts, ev.Complete(e.total_tokens, e.meta, e.digest)]
        state, more = self._alloc_next(e.total_tokens - self.received, False)
        return state, [*acts, *more]

    def _give_up_allocating(self, error: Exception) -> Result:
        # nothing is allocated; after round 0 the sender waits for a Resume: tell it
        acts: list[Action] = [ev.SendAbort(str(error))] if self.round > 0 else []
        return R.FAILED, [*acts, ev.Fail(error)]  # type: ignore[arg-type]

    def _alloc_timeout(self, e: ev.Timeout) -> Result:
        err = AllocationTimeout(f"rid={self.rid!r}: no allocation for round {self.round} in time")
        return self._give_up_allocating(err)

    def _alloc_local_abort(self, e: ev.LocalAbort) -> Result:
        return self._give_up_allocating(TransferAborted(f"rid={self.rid!r}: {e.reason}"))

    def _chunk_timeout(self, e: ev.Timeout) -> Result:
        err = TransferTimeout(f"rid={self.rid!r}: no ChunkDone for round {self.round} in time")
        return R.QUARANTINED, [ev.Quarantine(), ev.SendAbort("receiver timeout"), ev.Fail(err)]

    def _chunk_local_abort(self, e: ev.LocalAbort) -> Result:
        err = TransferAborted(f"rid={self.rid!r}: {e.reason}")
        return R.QUARANTINED, [ev.Quarantine(), ev.SendAbort(e.reason), ev.Fail(err)]

    def _aborted(self, e: ev.AbortReceived) -> Result:
        # the sender aborts only with no write in flight: the blocks are safe to reuse
        err = TransferAborted(f"rid={self.rid!r}: aborted by sender: {e.reason}")
        free: list[Action] = [ev.Free()] if self.state is R.WAIT_CHUNK else []
        return R.FAILED, [*free, ev.Fail(err)]

    def _lost(self, e: ev.PeerLost) -> Result:
        free: list[Action] = [ev.Free()] if self.state is R.WAIT_CHUNK else []
        return R.FAILED, [*free, ev.Fail(PeerLostError(f"rid={self.rid!r}: {e.reason}"))]

    def _new_abort(self, e: ev.LocalAbort) -> Result:
        return R.FAILED, [ev.Fail(TransferAborted(f"rid={self.rid!r}: {e.reason}"))]

    def _released(self, e: ev.Event) -> Result:
        return R.FAILED, [ev.ReleaseQuarantine()]

    def _ignore(self, e: ev.Event) -> Result:
        return self.state, []

    TIMEOUTS = {R.ALLOCATING: "alloc_timeout", R.WAIT_CHUNK: "chunk_timeout"}
    TERMINAL = frozenset({R.DONE, R.FAILED})


_F = frozenset
_M = ReceiverMachine
ReceiverMachine.TRANSITIONS = {
    (R.NEW, ev.Start): (_M._start, _F({R.ALLOCATING})),
    (R.NEW, ev.LocalAbort): (_M._new_abort, _F({R.FAILED})),
    (R.ALLOCATING, ev.AllocGranted): (_M._granted, _F({R.WAIT_CHUNK})),
    (R.ALLOCATING, ev.Timeout): (_M._alloc_timeout, _F({R.FAILED})),
    (R.ALLOCATING, ev.LocalAbort): (_M._alloc_local_abort, _F({R.FAILED})),
    (R.ALLOCATING, ev.AbortReceived): (_M._aborted, _F({R.FAILED})),
    (R.ALLOCATING, ev.PeerLost): (_M._lost, _F({R.FAILED})),
    (R.WAIT_CHUNK, ev.ChunkReceived): (_M._chunk, _F({R.ALLOCATING, R.DONE, R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.Timeout): (_M._chunk_timeout, _F({R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.LocalAbort): (_M._chunk_local_abort, _F({R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.AbortReceived): (_M._aborted, _F({R.FAILED})),
    (R.WAIT_CHUNK, ev.PeerLost): (_M._lost, _F({R.FAILED})),
    (R.QUARANTINED, ev.AbortAckReceived): (_M._released, _F({R.FAILED})),
    (R.QUARANTINED, ev.PeerLost): (_M._released, _F({R.FAILED})),
    # a late chunk or abort while we wait for the ack changes nothing
    (R.QUARANTINED, ev.ChunkReceived): (_M._ignore, _F({R.QUARANTINED})),
    (R.QUARANTINED, ev.AbortReceived): (_M._released, _F({R.FAILED})),
    (R.QUARANTINED, ev.LocalAbort): (_M._ignore, _F({R.QUARANTINED})),
    (R.QUARANTINED, ev.Timeout): (_M._ignore, _F({R.QUARANTINED})),
    (R.DONE, ev.AbortReceived): (_M._ignore, _F({R.DONE})),
    (R.DONE, ev.LocalAbort): (_M._ignore, _F({R.DONE})),
    (R.DONE, ev.PeerLost): (_M._ignore, _F({R.DONE})),
    (R.DONE, ev.Timeout): (_M._ignore, _F({R.DONE})),
    (R.FAILED, ev.AbortReceived): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.AbortAckReceived): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.LocalAbort): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.PeerLost): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.Timeout): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.ChunkReceived): (_M._ignore, _F({R.FAILED})),
}
