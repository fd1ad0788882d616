"""A thread-backed poll facade over the asyncio runtime, for synchronous schedulers.

vLLM and SGLang drive transfers from a scheduler loop that polls each request every tick.
:class:`SyncLanguageNode` and :class:`SyncEncodeNode` own an event loop in a daemon thread and
the asyncio node inside it; a start call returns a :class:`TransferHandle` at once, which any
thread may poll, wait for, abort or release::

    with SyncLanguageNode(settings) as lang:
        h = lang.receive("req-1", "10.0.0.5:9100")  # never waits
        ...                                        # each tick of the scheduler:
        if h.poll() is PollState.SUCCESS:          # never waits either
            got = h.result()                       # Received, at once
            h.release()
        elif h.poll() is PollState.FAILED:
            log(h.error())                         # the typed error
            h.release()

``poll()`` states (:class:`PollState`) are ordered FAILED < BOOTSTRAPPING < WAITING_FOR_INPUT
< TRANSFERRING < SUCCESS, so a tensor-parallel group agrees by taking the minimum; they come
from the protocol machines (see :mod:`emtransfer.sync.states`). ``docs/sync.md`` says how a
scheduler uses it and how the states map to SGLang's and vLLM's conventions.
"""

from .handle import TransferHandle
from .nodes import SyncEncodeNode, SyncLanguageNode, SyncNode, default_loop_factory
from .states import (
    RECEIVER_PROGRESS,
    SENDER_PROGRESS,
    SGLANG_MM_FAIL,
    SGLANG_MM_PENDING,
    SGLANG_MM_SUCCESS,
    SGLANG_MM_TIMEOUT,
    PollState,
    progress,
    sglang_mm_status,
)

__all__ = [
    "RECEIVER_PROGRESS",
    "SENDER_PROGRESS",
    "SGLANG_MM_FAIL",
    "SGLANG_MM_PENDING",
    "SGLANG_MM_SUCCESS",
    "SGLANG_MM_TIMEOUT",
    "PollState",
    "SyncEncodeNode",
    "SyncLanguageNode",
    "SyncNode",
    "TransferHandle",
    "default_loop_factory",
    "progress",
    "sglang_mm_status",
]
