"""The data-plane interface every engine implements (one module per engine).

A transport moves bytes from this node's registered pools into a peer's registered pools.
It knows nothing of requests or rounds: the runtime hands it byte descriptors
(:class:`~emtransfer.buffers.WriteOp`) computed from per-block runs, and a tag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from ..buffers import BufferRegistry, WriteOp
from ..errors import TransferError

if TYPE_CHECKING:
    from ..settings import Settings


class TransportError(TransferError):
    """The engine failed to move bytes (the request fails; the node keeps working)."""


class Transport(ABC):
    """Data plane of one node. Lifecycle: ``start`` -> ``add_peer``* -> ``write``* ->
    ``remove_peer``* -> ``close``."""

    name: ClassVar[str]
    #: True when a completed write is already in the peer's pools (NIXL, in-process), so the
    #: sender's AbortAck is a fence by itself and :meth:`discard` has nothing to do
    fences_on_write_completion: ClassVar[bool] = False

    def __init__(self, registry: BufferRegistry) -> None:
        self.registry = registry

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> Transport:
        return cls(registry)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this engine cannot run here (a missing library, no device), or None."""
        return None

    async def start(self) -> None:
        """Register the pools with the engine (once per node, never per request)."""

    def metadata(self) -> bytes:
        """What a peer needs to reach this node's pools; travels in the Hello handshake."""
        return b""

    async def add_peer(self, peer_id: str, metadata: bytes) -> None:
        """Make the peer's pools reachable, from its :meth:`metadata`."""

    @abstractmethod
    async def write(self, peer_id: str, ops: Sequence[WriteOp], *, tag: str) -> None:
        """Copy ``ops`` from this node's pools into the peer's. Returns once the local source
        may be reused and the bytes are (or will be, see :meth:`wait_landed`) in the peer's
        pools; raises :class:`TransportError` on failure."""

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        """Receiver side: return once ``nbytes`` (summed over every field and every write made
        under ``tag``) from ``peer_id`` are in the local pools, then forget the tag. Engines
        whose sender-side completion already implies remote delivery need not wait."""

    async def discard(self, peer_id: str, tag: str) -> None:
        """Receiver side, before blocks of an abandoned round are reused: once this returns, no
        further byte written under ``tag`` lands in the pools. Engines whose sender-side
        completion implies remote delivery (the sender's AbortAck then fences) need nothing."""

    async def remove_peer(self, peer_id: str) -> None:
        """Tear the peer down. After this returns no write from or to it can land."""

    async def close(self) -> None:
        """Deregister the pools and release the engine."""
