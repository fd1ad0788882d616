"""What ``poll()`` answers: one ordered state per request, read off the protocol machines.

The order is the one engines reduce over a tensor-parallel group with ``min``: any rank that
failed makes the group fail, else the group is as far as its slowest rank.

    FAILED (-1) < BOOTSTRAPPING (0) < WAITING_FOR_INPUT (1) < TRANSFERRING (2) < SUCCESS (3)

The three states in flight come from the session's machine (tables below), through the
runtime's observer hook (:meth:`emtransfer.runtime.session.Session.watch`), and never go back:
a later round's allocation (a resume) is still TRANSFERRING. The two final states come from
the request's result, so ``poll() == SUCCESS`` means ``result()`` returns at once.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from ..errors import TransferTimeout
from ..protocol import ReceiverState, SenderState


class PollState(IntEnum):
    """Where one request stands; ordered so that ``min`` over a group is the group's state."""

    #: ended with an error (``error()`` says which; a timeout is one of them)
    FAILED = -1
    #: not paired with the peer's side yet: language: connecting, waiting for an in-flight
    #: slot of that peer, about to ask for blocks; encode: no receiver claimed the payload yet
    BOOTSTRAPPING = 0
    #: this side waits for what it needs before any byte moves: language: blocks of its pool
    #: to receive into (no Init sent yet); encode: the payload (an Init came first), or
    #: blocks of its pool to stage the first write in
    WAITING_FOR_INPUT = 1
    #: bytes may move: language: the Init has left, the sender writes when its data is ready
    #: (and every later round, resumes included); encode: its first write is under way
    TRANSFERRING = 2
    #: ended with a result (``result()`` returns it without waiting)
    SUCCESS = 3

    @property
    def finished(self) -> bool:
        return self is PollState.FAILED or self is PollState.SUCCESS

    def sglang_kvpoll(self) -> int:
        """SGLang's ``KVPoll`` value (Failed 0, Bootstrapping 1, WaitingForInput 2,
        Transferring 3, Success 4): the same order, shifted by one."""
        return int(self) + 1


#: receiver machine state -> progress; absent (lingering and final states): no news, the
#: result decides (a failed request reports FAILED even while its blocks stay quarantined)
RECEIVER_PROGRESS: dict[ReceiverState, PollState] = {
    ReceiverState.NEW: PollState.BOOTSTRAPPING,
    ReceiverState.ALLOCATING: PollState.WAITING_FOR_INPUT,
    ReceiverState.WAIT_CHUNK: PollState.TRANSFERRING,
}

#: sender machine state -> progress; DRAINING, DONE and FAILED: no news, the result decides
SENDER_PROGRESS: dict[SenderState, PollState] = {
    SenderState.NEW: PollState.BOOTSTRAPPING,
    SenderState.WAIT_INIT: PollState.BOOTSTRAPPING,
    SenderState.WAIT_DATA: PollState.WAITING_FOR_INPUT,
    SenderState.STAGING: PollState.WAITING_FOR_INPUT,
    SenderState.WRITING: PollState.TRANSFERRING,
    SenderState.WAIT_RESUME: PollState.TRANSFERRING,
}


def progress(state: Any) -> PollState | None:
    """The progress a machine state shows, or None when it says nothing new."""
    if isinstance(state, ReceiverState):
        return RECEIVER_PROGRESS.get(state)
    if isinstance(state, SenderState):
        return SENDER_PROGRESS.get(state)
    return None


#: SGLang's encoder-receiver status (``WaitingMMRequestStatus``)
SGLANG_MM_FAIL, SGLANG_MM_PENDING, SGLANG_MM_SUCCESS, SGLANG_MM_TIMEOUT = -1, 0, 1, -2


def sglang_mm_status(state: PollState, error: BaseException | None) -> int:
    """SGLang's multimodal waiting status: PENDING (0) in flight, SUCCESS (1), TIMEOUT (-2)
    for a failure by a deadline (:class:`TransferTimeout`, allocation timeouts included),
    FAIL (-1) for any other failure."""
    if state is PollState.SUCCESS:
        return SGLANG_MM_SUCCESS
    if state is PollState.FAILED:
        return SGLANG_MM_TIMEOUT if isinstance(error, TransferTimeout) else SGLANG_MM_FAIL
    return SGLANG_MM_PENDING
