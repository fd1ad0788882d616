"""Typed errors. Every error a caller can see is a subclass of :class:`TransferError`.

Each class says what it means for a caller: ``http_status`` (what the servers answer, and
what a server embedding emtransfer should answer), ``retryable`` (whether the same request may
succeed if tried again, e.g. on another encoder or after a moment) and ``kind`` (the short
name the servers put in ``{"error": kind}``). Map by type, never by the message's text.
"""

from __future__ import annotations

from typing import Literal

#: why a peer gave a request up, as an Abort says it ("": no more than its reason)
AbortKind = Literal["", "unavailable", "refused", "encoder_failed"]


class TransferError(Exception):
    """Base class of every emtransfer error: the transfer failed (502, not retryable)."""

    http_status = 502
    retryable = False
    kind = "transfer_failed"


class ConfigError(TransferError, ValueError):
    """A setting or an argument is invalid; the message names it."""

    http_status = 400
    kind = "invalid_request"


class CapacityError(TransferError):
    """A request can never fit, or no capacity became free before the deadline."""

    http_status = 503
    retryable = True
    kind = "no_capacity"


class TransferTimeout(TransferError, TimeoutError):
    """A state's deadline passed (bootstrap, Init, chunk, Resume, allocation)."""

    http_status = 504
    retryable = True
    kind = "timeout"


class AllocationTimeout(CapacityError, TransferTimeout):
    """No blocks became free before the allocation deadline: capacity, not the peer."""

    http_status = 503
    kind = "no_capacity"


class PeerLost(TransferError, ConnectionError):
    """The peer died, closed the connection or missed its heartbeats."""

    http_status = 503
    retryable = True
    kind = "unavailable"


class TransferAborted(TransferError):
    """The request was aborted, by the caller or by the peer."""


class Unavailable(TransferAborted):
    """This node, or the peer, cannot take the request now: it is shutting down, or over one
    of its limits (requests in flight, pulls waiting, memory held). Try again, or elsewhere."""

    http_status = 503
    retryable = True
    kind = "unavailable"


class JobRefused(TransferAborted):
    """The encoder refused the job's input (an undecodable image, a missing field): the
    request itself is wrong, and retrying it cannot help."""

    http_status = 400
    kind = "invalid_request"


class EncoderFailed(TransferAborted):
    """The encoder failed on a job it accepted (its own error, not the input's)."""

    kind = "encoder_failed"


class ProtocolError(TransferError):
    """An event is not valid in the current state, or a message is malformed."""


class InvalidRequest(TransferError, ValueError):
    """Bad arguments to the API: an invalid or duplicate rid, a non-positive expected_tokens."""

    http_status = 400
    kind = "invalid_request"


class RidInFlight(InvalidRequest):
    """The rid is already in flight (with that peer, or on this node)."""

    http_status = 409
    kind = "conflict"


class PayloadError(InvalidRequest):
    """A tensor handed to the API does not match the node's fields (shape, dtype, length)."""


class AllocatorError(TransferError, RuntimeError):
    """Misuse of the block allocator: double free, freeing blocks one does not own."""

    http_status = 500
    kind = "internal"


#: what an Abort's ``kind`` field says about why a peer gave a request up
ABORT_KINDS: dict[AbortKind, type[TransferAborted]] = {
    "unavailable": Unavailable,
    "refused": JobRefused,
    "encoder_failed": EncoderFailed,
}


def abort_error(kind: str, message: str) -> TransferAborted:
    """The typed error for a peer's Abort of ``kind`` (an unknown kind: plain TransferAborted)."""
    return ABORT_KINDS.get(kind, TransferAborted)(message)  # type: ignore[call-overload]  # any str: unknown ones fall back


def kind_of(error: BaseException) -> AbortKind:
    """The Abort kind that tells a peer about ``error`` ("" when none fits)."""
    if isinstance(error, TransferAborted):
        for kind, cls in ABORT_KINDS.items():
            if isinstance(error, cls):
                return kind
    return "unavailable" if isinstance(error, CapacityError | PeerLost) else ""


__all__ = [
    "ABORT_KINDS",
    "AbortKind",
    "AllocationTimeout",
    "AllocatorError",
    "CapacityError",
    "ConfigError",
    "EncoderFailed",
    "InvalidRequest",
    "JobRefused",
    "PayloadError",
    "PeerLost",
    "ProtocolError",
    "RidInFlight",
    "TransferAborted",
    "TransferError",
    "TransferTimeout",
    "Unavailable",
    "abort_error",
    "kind_of",
]
