"""Typed errors. Every error a caller can see is a subclass of :class:`TransferError`."""

from __future__ import annotations


class TransferError(Exception):
    """Base class of every emtransfer error."""


class ConfigError(TransferError, ValueError):
    """A setting or an argument is invalid; the message names it."""


class CapacityError(TransferError):
    """A request can never fit, or no capacity became free before the deadline."""


class TransferTimeout(TransferError, TimeoutError):
    """A state's deadline passed (bootstrap, Init, chunk, Resume, allocation)."""


class AllocationTimeout(CapacityError, TransferTimeout):
    """No blocks became free before the allocation deadline: capacity, not the peer."""


class PeerLost(TransferError, ConnectionError):
    """The peer died, closed the connection or missed its heartbeats."""


class TransferAborted(TransferError):
    """The request was aborted, by the caller or by the peer."""


class ProtocolError(TransferError):
    """An event is not valid in the current state, or a message is malformed."""


class InvalidRequest(TransferError, ValueError):
    """Bad arguments to the API: an invalid or duplicate rid, a non-positive expected_tokens."""


class PayloadError(InvalidRequest):
    """A tensor handed to the API does not match the node's fields (shape, dtype, length)."""


class AllocatorError(TransferError, RuntimeError):
    """Misuse of the block allocator: double free, freeing blocks one does not own."""


__all__ = [
    "AllocationTimeout",
    "AllocatorError",
    "CapacityError",
    "ConfigError",
    "InvalidRequest",
    "PayloadError",
    "PeerLost",
    "ProtocolError",
    "TransferAborted",
    "TransferError",
    "TransferTimeout",
]
