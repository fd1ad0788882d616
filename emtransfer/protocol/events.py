"""Events fed into the state machines and actions they return.

Events come from the peer (a decoded message), from the runtime (an allocation granted, a
write completed, a deadline passed, the peer lost) or from the caller (data ready, abort).
Actions are instructions for the runtime; the machines never perform I/O themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import AbortKind, TransferError

# --------------------------------------------------------------------------------- events


class Event:
    """Base of every event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class DataReady(Event):
    """Sender: the caller handed over the payload."""

    total_tokens: int
    meta: dict[str, Any] | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class InitReceived(Event):
    blocks: tuple[int, ...]
    capacity_tokens: int
    expected_tokens: int | None = None
    #: the grant's write deadline on the sender's clock (no write is posted after it)
    deadline: float = float("inf")


@dataclass(frozen=True, slots=True)
class ResumeReceived(Event):
    round: int
    blocks: tuple[int, ...]
    capacity_tokens: int
    received_tokens: int
    deadline: float = float("inf")


@dataclass(frozen=True, slots=True)
class TotalReceived(Event):
    """Receiver: the sender knows the payload's length and it needs more than round 0's
    allocation: the receiver may prepare round 1 while round 0 is on the wire."""

    total_tokens: int


@dataclass(frozen=True, slots=True)
class Prefetched(Event):
    """Receiver: the runtime's answer to ``Prefetch``: the next round's allocation, taken
    without waiting (fed before any other event)."""

    blocks: tuple[int, ...]
    capacity_tokens: int


@dataclass(frozen=True, slots=True)
class PrefetchRefused(Event):
    """Receiver: the runtime's answer to ``Prefetch``: no blocks free right now (or others
    wait for them, FIFO); the next round is allocated after this one, holding nothing."""


@dataclass(frozen=True, slots=True)
class ChunkReceived(Event):
    round: int
    start: int
    count: int
    total_tokens: int
    is_last: bool
    meta: dict[str, Any] | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Start(Event):
    """Receiver: the caller asked for ``rid``. ``whole`` asks for the first allocation to be
    granted in one piece (the zero-copy lease needs it)."""

    expected_tokens: int | None = None
    whole: bool = False
    #: the sender computes the payload (an Encode job): round 0 also waits for the encoder
    job: bool = False


@dataclass(frozen=True, slots=True)
class AllocGranted(Event):
    """An allocation was granted. ``blocks`` are the block indices in order."""

    blocks: tuple[int, ...]
    capacity_tokens: int


@dataclass(frozen=True, slots=True)
class WriteDone(Event):
    pass


@dataclass(frozen=True, slots=True)
class WriteFailed(Event):
    reason: str


@dataclass(frozen=True, slots=True)
class AbortReceived(Event):
    reason: str = ""
    kind: AbortKind = ""  # the Abort's kind (errors.ABORT_KINDS)


@dataclass(frozen=True, slots=True)
class AbortAckReceived(Event):
    pass


@dataclass(frozen=True, slots=True)
class LocalAbort(Event):
    """The caller cancelled the request or the node is closing."""

    reason: str = "aborted by caller"
    kind: AbortKind = ""  # what the peer is told (errors.ABORT_KINDS): "unavailable" closing


@dataclass(frozen=True, slots=True)
class Timeout(Event):
    """The deadline of the current state passed."""


@dataclass(frozen=True, slots=True)
class PeerLost(Event):
    """The peer is gone. ``inbound_stopped``: the transport proved (``remove_peer``) that no
    write from it can still land in our pool."""

    reason: str = "peer lost"
    inbound_stopped: bool = True


@dataclass(frozen=True, slots=True)
class Fenced(Event):
    """Receiver: the transport's ``discard`` of the abandoned round returned: nothing of it
    can land any more."""


@dataclass(frozen=True, slots=True)
class FenceFailed(Event):
    """Receiver: the transport could not fence the abandoned round."""

    reason: str = ""


# -------------------------------------------------------------------------------- actions


class Action:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Alloc(Action):
    """Allocate up to ``num_tokens`` (at least ``min_tokens``), then feed ``AllocGranted``."""

    num_tokens: int
    min_tokens: int


@dataclass(frozen=True, slots=True)
class Prefetch(Action):
    """Receiver: allocate the next round's blocks *now*, without waiting -- up to
    ``num_tokens``, at least ``min_tokens`` -- while the current round may still be written,
    and answer at once with ``Prefetched`` or ``PrefetchRefused``. Never waits, never jumps a
    queue of waiters: a request holds two allocations only when nobody waits for blocks."""

    num_tokens: int
    min_tokens: int


@dataclass(frozen=True, slots=True)
class Write(Action):
    """Sender: stage tokens ``[src_start, src_start + count)`` of the payload into the granted
    staging allocation and write them into the receiver's allocation of ``round`` from its token
    ``dst_start``; feed ``WriteDone`` or ``WriteFailed``."""

    round: int
    src_start: int
    dst_start: int
    count: int
    #: the receiver's grant for ``round`` expires then (sender's clock): never post after it
    deadline: float = float("inf")


@dataclass(frozen=True, slots=True)
class FreeStaging(Action):
    """Sender: free the staging allocation of the write that just ended."""


@dataclass(frozen=True, slots=True)
class FreeStagingAfterWrite(Action):
    """Sender: a write did not end in time; free its staging allocation whenever it ends (the
    engine may still read from it until then)."""


@dataclass(frozen=True, slots=True)
class SendInit(Action):
    blocks: tuple[int, ...]
    capacity_tokens: int
    expected_tokens: int | None


@dataclass(frozen=True, slots=True)
class SendTotal(Action):
    """Sender: tell the receiver the payload's length before round 0's write (sent only
    when round 0's allocation is too small for it)."""

    total_tokens: int


@dataclass(frozen=True, slots=True)
class SendResume(Action):
    round: int
    blocks: tuple[int, ...]
    capacity_tokens: int
    received_tokens: int


@dataclass(frozen=True, slots=True)
class SendChunkDone(Action):
    round: int
    start: int
    count: int
    total_tokens: int
    is_last: bool


@dataclass(frozen=True, slots=True)
class SendAbort(Action):
    reason: str
    kind: AbortKind = ""


@dataclass(frozen=True, slots=True)
class SendAbortAck(Action):
    pass


@dataclass(frozen=True, slots=True)
class Deliver(Action):
    """Receiver: tokens ``[start, start + count)`` of the payload sit at the head of the
    allocation of ``round``; copy them out."""

    round: int
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class Free(Action):
    """Receiver: free the allocation of ``round`` (None: every allocation it holds)."""

    round: int | None = None


@dataclass(frozen=True, slots=True)
class Quarantine(Action):
    """Receiver: a write may still land in what it holds (the current round's allocation and
    a prefetched next one); keep them out of circulation until a proof (AbortAck, fence,
    teardown) or the last grant's expiry releases them."""


@dataclass(frozen=True, slots=True)
class Fence(Action):
    """Receiver: ask the transport to fence the tags of the quarantined rounds; feed
    ``Fenced`` or ``FenceFailed``."""


@dataclass(frozen=True, slots=True)
class ReleaseQuarantine(Action):
    pass


@dataclass(frozen=True, slots=True)
class TearDownPeer(Action):
    """Receiver: the sender did not confirm an abort in time; drop its connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class Complete(Action):
    total_tokens: int
    meta: dict[str, Any] | None = None
    digest: str | None = None
    #: receiver: the payload is still in the current allocation (lease), not copied out
    in_place: bool = False


@dataclass(frozen=True, slots=True)
class Fail(Action):
    error: TransferError = field(compare=False)
