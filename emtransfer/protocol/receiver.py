"""The receiver (language side) machine of one request.

The receiver may not know the length. It asks for ``expected_tokens`` (or the default
allocation), sends ``Init``, and for every ``ChunkDone`` copies the round out and frees the
allocation *before* asking for the next one (no hold-and-wait across rounds), then sends
``Resume`` with the next allocation, until ``is_last``. Rounds are named by number.

    NEW --Start--> ALLOCATING --AllocGranted--> WAIT_CHUNK --ChunkReceived--> ALLOCATING | DONE

Pipelined resume: a sender whose payload needs more than round 0's allocation says so
(``Total``) before it writes round 0. The receiver then prepares the next round while the
current one is on the wire -- but only with blocks it can take *now* (``Prefetch``, answered
at once by ``Prefetched`` or ``PrefetchRefused``: never a wait, never ahead of a queue of
waiters), so it never waits while it holds an allocation. A prefetched round's ``Resume``
leaves at once; the sender writes it straight after the current round, and the receiver,
once the current round's ``ChunkDone`` is in, stays in WAIT_CHUNK for the next round (and
prefetches the one after it). Refused, it falls back to the sequential path above:

    WAIT_CHUNK --TotalReceived--> WAIT_CHUNK (Prefetch: Prefetched -> Resume | refused)
    WAIT_CHUNK --ChunkReceived (a next round prefetched)--> WAIT_CHUNK (next round)

Every allocation it grants carries a write deadline (the sender never posts after it). When it
gives up while a write may still land (a timeout, an abort, a chunk that breaks the rules, a
lost peer whose writes the transport cannot stop) what it holds (the current round's
allocation, and a prefetched one) is quarantined, and released only on proof, as the
transport's :class:`~emtransfer.guarantees.Guarantees` allow:

    WAIT_CHUNK --give up--> QUARANTINED --Fenced | AbortAck | PeerLost(stopped)--> FAILED
    QUARANTINED --Timeout (abort_ack_timeout): TearDownPeer--> EXPIRING
    EXPIRING --Fenced | AbortAck | PeerLost(stopped) | Timeout (grant expiry)--> FAILED

Quarantine always ends: EXPIRING's deadline is the last grant's expiry plus the engine's bound
on a posted write.

Grant policy (:meth:`ReceiverMachine.least`), what each ``Alloc`` waits for, FIFO, holding
nothing: round 0 gets its allocation whole (a known length, capped at the pool; else the
default allocation), so a request of known length that fits the pool travels in one round and
requests beyond what the pool can serve wait for admission instead of trickling; a Resume
round accepts a partial grant, but not below ``min_grant_tokens`` (or the rest, or the pool).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import auto

from ..errors import (
    AbortKind,
    AllocationTimeout,
    ProtocolError,
    TransferError,
    TransferTimeout,
    abort_error,
    kind_of,
)
from ..errors import PeerLost as PeerLostError
from ..guarantees import Guarantees
from . import events as ev
from .events import Action
from .machine import GRANT_EXPIRY, Machine, StateEnum


class ReceiverState(StateEnum):
    NEW = auto()
    ALLOCATING = auto()
    WAIT_CHUNK = auto()
    QUARANTINED = auto()
    EXPIRING = auto()
    DONE = auto()
    FAILED = auto()


R = ReceiverState
Result = tuple[ReceiverState, list[Action]]


class ReceiverMachine(Machine[ReceiverState]):
    ROLE = "receiver"

    def __init__(
        self,
        rid: str,
        *,
        block_size: int,
        default_tokens: int,
        guarantees: Guarantees,
        max_tokens: int | None = None,
        pool_tokens: int | None = None,
        min_grant_tokens: int = 1,
        waits: Mapping[str, float] | None = None,
        peer: str = "",
        pipeline: bool = True,
    ) -> None:
        super().__init__(rid, R.NEW)
        #: the seconds of each timeout this machine names (for its errors' words)
        self.waits = dict(waits or {})
        self.peer = peer or "the encode node"
        self.block_size = block_size
        self.default_tokens = default_tokens
        self.g = guarantees
        self.max_tokens = max_tokens
        self.pool_tokens = pool_tokens  # the local pool's capacity (None: unbounded)
        self.min_grant_tokens = min_grant_tokens
        self.round = -1  # round of the current (or requested) allocation
        self.received = 0
        self.total: int | None = None
        self.capacity = 0
        self.whole = False
        self.expected: int | None = None
        self.job = False
        #: prepare the next round while the current one is written (on a sender's Total)
        self.pipeline = pipeline
        #: the capacity of the next round's allocation, prefetched and granted (Resume sent)
        self.ahead: int | None = None
        self._prefetching = False  # a Prefetch awaits the runtime's answer

    @property
    def phase(self) -> object:
        """A pipelined round follows the last in WAIT_CHUNK: its wait starts afresh."""
        return (self.state, self.round)

    @property
    def timeout_name(self) -> str | None:
        """Round 0 of an Encode job waits for the encoder too: the sender may hold our Init
        for up to its ``data_timeout`` before it writes (``encode_timeout``)."""
        if self.state is R.WAIT_CHUNK and self.round == 0 and self.job:
            return "encode_timeout"
        return self.TIMEOUTS.get(self.state)

    def least(self, want: int) -> int:
        """The grant policy: the fewest tokens the next round's allocation accepts."""
        if self.round == 0 and self.whole:
            return want  # in place: all of it in one allocation, or never
        cap = want if self.pool_tokens is None else min(want, self.pool_tokens)
        if self.round == 0:
            return cap  # a longer payload than a lease expected resumes by copy: partial
        return min(cap, self.min_grant_tokens)

    def _after_current(self) -> int:
        """Tokens still to come after the current round (which fills its allocation when
        more follow): what a prefetch for the next round asks for."""
        assert self.total is not None
        return self.total - self.received - self.capacity

    def _prefetch(self) -> list[Action]:
        """Ask for the next round's blocks now, if it is known to exist and nothing is
        prefetched yet. Its least is a Resume round's (``min_grant_tokens``)."""
        if not self.pipeline or self.ahead is not None or self.total is None:
            return []
        want = self._after_current()
        if want <= 0:
            return []
        cap = want if self.pool_tokens is None else min(want, self.pool_tokens)
        self._prefetching = True
        return [ev.Prefetch(want, min_tokens=min(cap, self.min_grant_tokens))]

    def _answered(self) -> None:
        if not self._prefetching:  # the runtime answers a Prefetch at once, only then
            raise ProtocolError(f"rid={self.rid!r}: a prefetch answer without a Prefetch")
        self._prefetching = False

    def _alloc_next(self, want: int) -> Result:
        self.round += 1
        return R.ALLOCATING, [ev.Alloc(want, min_tokens=self.least(want))]

    # -- handlers ----------------------------------------------------------------------------
    def _start(self, e: ev.Start) -> Result:
        if e.expected_tokens is not None and e.expected_tokens <= 0:
            raise ProtocolError(f"rid={self.rid!r}: expected_tokens must be > 0")
        self.whole = e.whole
        self.expected = e.expected_tokens
        self.job = e.job
        return self._alloc_next(e.expected_tokens or self.default_tokens)

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
        if self.max_tokens is not None and e.total_tokens > self.max_tokens:
            return f"total_tokens {e.total_tokens} exceeds max_tokens={self.max_tokens}"
        if self.total is not None and e.total_tokens != self.total:
            return f"total_tokens changed from {self.total} to {e.total_tokens}"
        if e.start + e.count > e.total_tokens:
            return f"tokens [{e.start}, {e.start + e.count}) run past total {e.total_tokens}"
        if e.is_last != (e.start + e.count == e.total_tokens):
            return f"is_last={e.is_last} but {e.start + e.count} of {e.total_tokens} tokens"
        if e.count < min(self.capacity, e.total_tokens - e.start):
            return f"ChunkDone count {e.count} leaves the allocation part-filled mid-transfer"
        return None

    def total_error(self, total: int) -> str | None:
        if self.max_tokens is not None and total > self.max_tokens:
            return f"total_tokens {total} exceeds max_tokens={self.max_tokens}"
        if self.total is not None and total != self.total:
            return f"total_tokens changed from {self.total} to {total}"
        if total < self.received + 1:
            return f"total_tokens {total} but {self.received} were received"
        return None

    def _total(self, e: ev.TotalReceived) -> Result:
        why = self.total_error(e.total_tokens)
        if why:
            err = ProtocolError(f"rid={self.rid!r}: Total: {why}")
            return self._abandon(err, tell=f"protocol error: Total: {why}")
        self.total = e.total_tokens
        return R.WAIT_CHUNK, self._prefetch()

    def _prefetched(self, e: ev.Prefetched) -> Result:
        self._answered()
        self.ahead = e.capacity_tokens
        start = self.received + self.capacity  # the current round fills its allocation
        msg = ev.SendResume(self.round + 1, e.blocks, e.capacity_tokens, start)
        return R.WAIT_CHUNK, [msg]

    def _refused(self, e: ev.PrefetchRefused) -> Result:
        self._answered()  # the next round is allocated after this one, holding nothing
        return R.WAIT_CHUNK, []

    def _abandon(self, error: TransferError, *, tell: str | None, kind: AbortKind = "") -> Result:
        """Give up while a write may still land in the current allocation: quarantine it, fence
        it where the engine can, tell the sender (``tell``: the reason) unless it told us."""
        acts: list[Action] = [ev.Quarantine()]
        if self.g.fences_tag:
            acts.append(ev.Fence())
        if tell is not None:
            acts.append(ev.SendAbort(tell, kind))
        return R.QUARANTINED, [*acts, ev.Fail(error)]

    def _chunk(self, e: ev.ChunkReceived) -> Result:
        why = self.chunk_error(e)
        if why:
            err = ProtocolError(f"rid={self.rid!r}: {why}")
            return self._abandon(err, tell=f"protocol error: {why}")
        self.total = e.total_tokens
        self.received += e.count
        if e.is_last and self.round == 0 and self.whole:
            return R.DONE, [ev.Complete(e.total_tokens, e.meta, e.digest, in_place=True)]
        acts: list[Action] = [ev.Deliver(e.round, e.start, e.count), ev.Free(e.round)]
        if e.is_last:  # a prefetched round cannot exist: it was asked for only if more came
            assert self.ahead is None
            return R.DONE, [*acts, ev.Complete(e.total_tokens, e.meta, e.digest)]
        if self.ahead is not None:  # the next round's grant is out: wait for its chunk
            self.round += 1
            self.capacity, self.ahead = self.ahead, None
            return R.WAIT_CHUNK, [*acts, *self._prefetch()]
        state, more = self._alloc_next(e.total_tokens - self.received)
        return state, [*acts, *more]

    def _give_up_allocating(self, error: Exception) -> Result:
        # nothing is allocated, but the sender may hold the request: waiting for a Resume
        # after round 0, or, before it, an Encode job's result waiting for our Init (which a
        # retry of the rid must not find in its way): tell it either way
        tell = ev.SendAbort(str(error), kind_of(error))
        return R.FAILED, [tell, ev.Fail(error)]  # type: ignore[arg-type]

    def _alloc_timeout(self, e: ev.Timeout) -> Result:
        err = AllocationTimeout(f"rid={self.rid!r}: no allocation for round {self.round} in time")
        return self._give_up_allocating(err)

    def _alloc_local_abort(self, e: ev.LocalAbort) -> Result:
        return self._give_up_allocating(abort_error(e.kind, f"rid={self.rid!r}: {e.reason}"))

    def _chunk_timeout(self, e: ev.Timeout) -> Result:
        name = self.timeout_name or "chunk_timeout"
        after = f"{self.waits[name]:g}s ({name})" if name in self.waits else f"{name}"
        if self.round > 0:
            why = f"{self.peer} sent no data for round {self.round} within {after}"
        elif self.job:
            why = f"{self.peer} computed and sent nothing within {after}"
        else:  # it writes at once when it holds the payload: it does not
            why = f"{self.peer} has no payload for this rid after {after}"
        err = TransferTimeout(f"rid={self.rid!r}: {why}")
        return self._abandon(err, tell="receiver timeout")

    def _chunk_local_abort(self, e: ev.LocalAbort) -> Result:
        err = abort_error(e.kind, f"rid={self.rid!r}: {e.reason}")
        return self._abandon(err, tell=e.reason, kind=e.kind)

    def _aborted_allocating(self, e: ev.AbortReceived) -> Result:
        err = abort_error(e.kind, f"rid={self.rid!r}: aborted by sender: {e.reason}")
        return R.FAILED, [ev.Fail(err)]

    def _aborted(self, e: ev.AbortReceived) -> Result:
        # the sender aborts only once no write of its own is in flight; whether that proves
        # nothing more lands depends on the engine
        err = abort_error(e.kind, f"rid={self.rid!r}: aborted by sender: {e.reason}")
        if self.g.remote_completion:
            return R.FAILED, [ev.Free(), ev.Fail(err)]
        return self._abandon(err, tell=None)

    def _lost_allocating(self, e: ev.PeerLost) -> Result:
        return R.FAILED, [ev.Fail(PeerLostError(f"rid={self.rid!r}: {e.reason}"))]

    def _lost(self, e: ev.PeerLost) -> Result:
        err = PeerLostError(f"rid={self.rid!r}: {e.reason}")
        if e.inbound_stopped:
            return R.FAILED, [ev.Free(), ev.Fail(err)]
        # no ack can come any more: only the grant's expiry ends the quarantine
        return R.EXPIRING, [ev.Quarantine(), ev.Fail(err)]

    def _new_abort(self, e: ev.LocalAbort) -> Result:
        return R.FAILED, [ev.Fail(abort_error(e.kind, f"rid={self.rid!r}: {e.reason}"))]

    def _released(self, e: ev.Event) -> Result:
        return R.FAILED, [ev.ReleaseQuarantine()]

    def _proof_by_ack(self, e: ev.Event) -> Result:
        if self.g.remote_completion:
            return R.FAILED, [ev.ReleaseQuarantine()]
        return self.state, []  # the engine may still deliver: wait for the fence or the expiry

    def _lost_quarantined(self, e: ev.PeerLost) -> Result:
        if e.inbound_stopped:
            return R.FAILED, [ev.ReleaseQuarantine()]
        return R.EXPIRING, []

    def _no_ack(self, e: ev.Timeout) -> Result:
        reason = "no AbortAck within abort_ack_timeout"
        return R.EXPIRING, [ev.TearDownPeer(f"rid={self.rid!r}: {reason}")]

    def _ignore(self, e: ev.Event) -> Result:
        return self.state, []

    #: EXPIRING ends at the grant's expiry, which the runtime knows (it sent the grant)
    TIMEOUTS = {
        R.ALLOCATING: "alloc_timeout",
        R.WAIT_CHUNK: "chunk_timeout",
        R.QUARANTINED: "abort_ack_timeout",
        R.EXPIRING: GRANT_EXPIRY,
    }
    TERMINAL = frozenset({R.DONE, R.FAILED})


_F = frozenset
_M = ReceiverMachine
_LINGER = (R.QUARANTINED, R.EXPIRING)
ReceiverMachine.TRANSITIONS = {
    (R.NEW, ev.Start): (_M._start, _F({R.ALLOCATING})),
    (R.NEW, ev.LocalAbort): (_M._new_abort, _F({R.FAILED})),
    (R.ALLOCATING, ev.AllocGranted): (_M._granted, _F({R.WAIT_CHUNK})),
    (R.ALLOCATING, ev.Timeout): (_M._alloc_timeout, _F({R.FAILED})),
    (R.ALLOCATING, ev.LocalAbort): (_M._alloc_local_abort, _F({R.FAILED})),
    (R.ALLOCATING, ev.AbortReceived): (_M._aborted_allocating, _F({R.FAILED})),
    (R.ALLOCATING, ev.PeerLost): (_M._lost_allocating, _F({R.FAILED})),
    (R.WAIT_CHUNK, ev.ChunkReceived): (
        _M._chunk,
        _F({R.ALLOCATING, R.WAIT_CHUNK, R.DONE, R.QUARANTINED}),
    ),
    (R.WAIT_CHUNK, ev.TotalReceived): (_M._total, _F({R.WAIT_CHUNK, R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.Prefetched): (_M._prefetched, _F({R.WAIT_CHUNK})),
    (R.WAIT_CHUNK, ev.PrefetchRefused): (_M._refused, _F({R.WAIT_CHUNK})),
    (R.WAIT_CHUNK, ev.Timeout): (_M._chunk_timeout, _F({R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.LocalAbort): (_M._chunk_local_abort, _F({R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.AbortReceived): (_M._aborted, _F({R.FAILED, R.QUARANTINED})),
    (R.WAIT_CHUNK, ev.PeerLost): (_M._lost, _F({R.FAILED, R.EXPIRING})),
    # proofs that end a quarantine, in either lingering state
    **{(st, ev.Fenced): (_M._released, _F({R.FAILED})) for st in _LINGER},
    **{(st, ev.FenceFailed): (_M._ignore, _F({st})) for st in _LINGER},
    **{(st, ev.AbortAckReceived): (_M._proof_by_ack, _F({st, R.FAILED})) for st in _LINGER},
    # the sender's Abort comes only once its write ended: as good as an AbortAck
    **{(st, ev.AbortReceived): (_M._proof_by_ack, _F({st, R.FAILED})) for st in _LINGER},
    (R.QUARANTINED, ev.PeerLost): (_M._lost_quarantined, _F({R.FAILED, R.EXPIRING})),
    (R.EXPIRING, ev.PeerLost): (_M._lost_quarantined, _F({R.FAILED, R.EXPIRING})),
    (R.QUARANTINED, ev.Timeout): (_M._no_ack, _F({R.EXPIRING})),
    (R.EXPIRING, ev.Timeout): (_M._released, _F({R.FAILED})),
    # a late chunk or Total, or a second abort, while we wait changes nothing
    **{(st, ev.ChunkReceived): (_M._ignore, _F({st})) for st in _LINGER},
    **{(st, ev.TotalReceived): (_M._ignore, _F({st})) for st in _LINGER},
    **{(st, ev.LocalAbort): (_M._ignore, _F({st})) for st in _LINGER},
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
    (R.FAILED, ev.TotalReceived): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.Fenced): (_M._ignore, _F({R.FAILED})),
    (R.FAILED, ev.FenceFailed): (_M._ignore, _F({R.FAILED})),
}


def _unknown_ignore(rid: str, e: ev.Event) -> list[Action]:
    # an abort, or its ack, for a request that already ended here: nothing left to do
    return []


def _unknown_chunk(rid: str, e: ev.ChunkReceived) -> list[Action]:
    return [ev.Fail(ProtocolError(f"ChunkDone for unknown rid {rid!r}"))]


ReceiverMachine.UNKNOWN = {
    ev.AbortReceived: _unknown_ignore,
    ev.TotalReceived: _unknown_ignore,  # the request ended here (an abort crossed it)
    ev.AbortAckReceived: _unknown_ignore,
    ev.ChunkReceived: _unknown_chunk,
}
