"""The data-plane interface every engine implements (one module per engine).

A transport moves bytes from this node's registered pools into a peer's registered pools.
It knows nothing of requests or rounds: the runtime hands it byte descriptors
(:class:`~emtransfer.buffers.WriteOp`) computed from per-block runs, and a tag.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
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


class Grants:
    """The receiver's grants: ``(peer, tag) -> blocks`` a peer may write into, per the
    runtime's Init and Resume. Checking a byte range is arithmetic on the field's block size."""

    #: a runtime that forgot to revoke cannot grow this without bound: oldest grants go first
    MAX = 1 << 16

    def __init__(self, registry: BufferRegistry) -> None:
        self._num_blocks = registry.num_blocks
        self._block_bytes = {
            name: registry.byte_view(name).numel() // registry.num_blocks
            for name in registry.layouts
        }
        self._by_key: dict[tuple[str, str], frozenset[int]] = {}

    def add(self, peer_id: str, tag: str, blocks: Sequence[int]) -> None:
        self._by_key[(peer_id, tag)] = frozenset(blocks)
        while len(self._by_key) > self.MAX:
            del self._by_key[next(iter(self._by_key))]

    def revoke(self, peer_id: str, tag: str) -> None:
        self._by_key.pop((peer_id, tag), None)

    def drop_peer(self, peer_id: str) -> None:
        for key in [k for k in self._by_key if k[0] == peer_id]:
            del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)

    def refusal(self, peer_id: str, tag: str, field: str, offset: int, nbytes: int) -> str | None:
        """Why ``peer_id`` may not write ``[offset, offset + nbytes)`` of ``field`` under
        ``tag``, or None when a grant covers every byte of it."""
        blocks = self._by_key.get((peer_id, tag))
        if blocks is None:
            return f"no grant for tag {tag!r}"
        size = self._block_bytes.get(field)
        if size is None:
            return f"unknown field {field!r}"
        if nbytes <= 0:
            return None
        first, last = offset // size, (offset + nbytes - 1) // size
        for b in range(first, last + 1):
            if b not in blocks:
                return (
                    f"bytes [{offset}, {offset + nbytes}) of {field} reach block {b}, not granted"
                )
        return None


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
        #: what peers may write into this node's pools (enforced where the engine can)
        self.grants = Grants(registry)
        #: whether peers may write into this node's pools at all. An encode node sets it to
        #: False before ``start``: its metadata then holds no keys to its pools (a peer learns
        #: who it is, not how to reach its memory) and inbound writes are refused outright
        self.inbound = True
        self._guarantees: tuple[Guarantees, float, Guarantees] | None = None

    @property
    def guarantees(self) -> Guarantees:
        """``GUARANTEES`` with this engine's post bound (read for every request: built once
        per change of either, not per call)."""
        base, bound = self.GUARANTEES, self.post_bound
        cached = self.__dict__.get("_guarantees")
        if cached is None or cached[0] is not base or cached[1] != bound:
            cached = (base, bound, dataclasses.replace(base, post_bound=bound))
            self._guarantees = cached
        return cached[2]

    def grant(self, peer_id: str, tag: str, blocks: Sequence[int]) -> None:
        """Receiver side, before the grant is sent: ``peer_id`` may write under ``tag`` into
        ``blocks`` (of every field) until :meth:`revoke`, :meth:`discard` or
        :meth:`remove_peer`. With ``GUARANTEES.authorizes_writes``, bytes outside every grant
        land nothing; without it, this only documents intent."""
        self.grants.add(peer_id, tag, blocks)

    def revoke(self, peer_id: str, tag: str) -> None:
        """Receiver side: the grant under ``tag`` ended (its round landed, or was given up)."""
        self.grants.revoke(peer_id, tag)

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
        """What a peer needs to reach this node's pools (with ``inbound``), or only to know
        the writes that come from us (without); travels in the Hello handshake."""
        return b""

    async def finish_writes(self) -> None:
        """Before a graceful close: let the bytes of writes that already returned reach their
        peers (an engine whose ``write`` returns only at remote completion has nothing to do)."""

    async def add_peer(self, peer_id: str, metadata: bytes, *, secret: bytes = b"") -> None:
        """Make the peer's pools reachable, from its :meth:`metadata`. ``secret``: a key both
        nodes derived from their authenticated handshake (empty without ``auth_token``); an
        engine whose connections can prove it does (tcp), so no key it sends is a credential."""

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

    def write_nowait(
        self,
        peer_id: str,
        ops: Sequence[WriteOp],
        *,
        tag: str,
        deadline: float = float("inf"),
    ) -> Awaitable[None] | None:
        """:meth:`write`, without waiting where the engine need not: None when the write is
        complete already (as a returned ``write`` is), else an awaitable that completes it
        (await it as ``write``). It raises what ``write`` raises before it would wait. This
        default is ``write`` itself, not yet started; an engine that can post a small write
        at once overrides it (the sender then needs no task and no hop of the loop)."""
        return self.write(peer_id, ops, tag=tag, deadline=deadline)

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        """Receiver side: return once ``nbytes`` (summed over every field and every write made
        under ``tag``) from ``peer_id`` are in the local pools, then forget the tag. Engines
        whose sender-side completion already implies remote delivery need not wait. Removing
        the peer (:meth:`remove_peer`) fails a wait under way only if its bytes had not all
        arrived by then: a write the peer completed before it went still counts (a node
        closes right after its last send returned; its control connection's end may beat
        this wait's next look at the engine)."""

    def landed(self, peer_id: str, tag: str, nbytes: int) -> bool:
        """Receiver side, without waiting: True when ``nbytes`` under ``tag`` from ``peer_id``
        are known to be in the local pools already, and the tag is then forgotten (what
        :meth:`wait_landed` would have returned at once); False when the caller must await
        :meth:`wait_landed` (the bytes are not all in, or this engine does not know)."""
        return False

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
