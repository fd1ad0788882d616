"""The data-plane interface every engine implements (one module per engine).

A transport moves bytes from this node's registered pools into a peer's registered pools.
It knows nothing of requests or rounds: the runtime hands it byte descriptors
(:class:`~emtransfer.buffers.WriteOp`) computed from per-block runs, and a tag.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from ..buffers import BufferRegistry, WriteOp
from ..errors import TransferError
from ..guarantees import Guarantees

if TYPE_CHECKING:
    from ..settings import Settings


#: every engine carries data tags of up to this many bytes (UTF-8). The runtime's longest tag
#: (a rid of 256 four-byte characters, a session tag of 64, a round number) fits
MAX_TAG_BYTES = 2048


class TransportError(TransferError):
    """The engine failed to move bytes (the request fails; the node keeps working)."""


class GrantExpired(TransportError):
    """A write was refused at the moment of posting: its grant's deadline had passed."""


def check_deadline(deadline: float, what: str) -> None:
    """Refuse to post ``what`` once ``deadline`` (``time.monotonic()``) has passed."""
    if time.monotonic() >= deadline:
        raise GrantExpired(f"{what}: the receiver's grant expired before the write was posted")


class Transport(ABC):
    """Data plane of one node. Lifecycle: ``start`` -> ``add_peer``* -> ``write``* ->
    ``remove_peer``* -> ``close``."""

    name: ClassVar[str]
    #: what this engine proves (the post bound comes from ``write_timeout``); the conformance
    #: suite checks every declared guarantee, and the protocol machines act on them alone
    GUARANTEES: ClassVar[Guarantees]

    def __init__(self, registry: BufferRegistry, *, post_bound: float = 10.0) -> None:
        self.registry = registry
        #: a posted write lands, fails or is cancelled within this many seconds
        self.post_bound = post_bound

    @property
    def guarantees(self) -> Guarantees:
        g = self.GUARANTEES
        return Guarantees(
            g.remote_completion, g.fences_tag, g.remove_stops_inbound, self.post_bound
        )

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> Transport:
        return cls(registry, post_bound=settings.write_timeout)

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
    async def write(
        self,
        peer_id: str,
        ops: Sequence[WriteOp],
        *,
        tag: str,
        deadline: float = float("inf"),
    ) -> None:
        """Copy ``ops`` from this node's pools into the peer's. Returns once the local source
        may be reused and the bytes are (or will be, see :meth:`wait_landed`) in the peer's
        pools; raises :class:`TransportError` on failure. ``deadline`` (``time.monotonic()``)
        is the receiver's grant: the engine checks it at the moment it posts (after any queue
        of its own) and raises :class:`GrantExpired` instead of posting late; it never posts
        to a peer that was removed. A posted write ends within ``post_bound`` seconds."""

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        """Receiver side: return once ``nbytes`` (summed over every field and every write made
        under ``tag``) from ``peer_id`` are in the local pools, then forget the tag. Engines
        whose sender-side completion already implies remote delivery need not wait."""

    async def discard(self, peer_id: str, tag: str) -> None:
        """Receiver side, before blocks of an abandoned round are reused. With
        ``GUARANTEES.fences_tag``: once this returns, no further byte written under ``tag``
        lands in the pools, and it raises :class:`TransportError` when it cannot promise that.
        Without it, it only forgets the tag's bookkeeping (it fences nothing)."""

    async def remove_peer(self, peer_id: str) -> None:
        """Tear the peer down: no write of ours to it is posted any more. With
        ``GUARANTEES.remove_stops_inbound``, no write *from* it lands in our pools once this
        returns, and it raises :class:`TransportError` when it cannot promise that."""

    async def close(self) -> None:
        """Deregister the pools and release the engine."""
