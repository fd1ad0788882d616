"""In-process transport: a real copy between two nodes' pools of the same process, through
the same descriptor lists a real engine gets. For tests, the demo on one host, and as the
reference every other transport is checked against."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

from ..buffers import BufferRegistry, WriteOp
from ..guarantees import Guarantees
from .base import Transport, TransportError, check_deadline

_ids = itertools.count(1)
_nodes: weakref.WeakValueDictionary[str, LocalTransport] = weakref.WeakValueDictionary()


class LocalTransport(Transport):
    name = "local"
    #: a write is one synchronous copy: once it returned, it is in the pool, and nothing of a
    #: peer is in flight while the receiver's loop runs its discard or remove_peer
    GUARANTEES = Guarantees(
        remote_completion=True, fences_tag=True, remove_stops_inbound=True, authorizes_writes=True
    )

    def __init__(self, registry: BufferRegistry, *, post_bound: float = 10.0) -> None:
        super().__init__(registry, post_bound=post_bound)
        self.node_key = f"local-{next(_ids)}"
        self._peers: dict[str, LocalTransport] = {}
        self._refused: set[str] = set()  # node keys of removed peers: their writes go nowhere
        self._discarded: dict[tuple[str, str], None] = {}  # (node key, tag), oldest first

    async def start(self) -> None:
        _nodes[self.node_key] = self

    def metadata(self) -> bytes:
        return self.node_key.encode()

    async def add_peer(self, peer_id: str, metadata: bytes, *, secret: bytes = b"") -> None:
        peer = _nodes.get(metadata.decode())
        if peer is None:
            raise TransportError(f"local transport: no node {metadata!r} in this process")
        if peer.registry.layouts.keys() != self.registry.layouts.keys():
            raise TransportError("local transport: the peer's fields differ")
        self._refused.discard(peer.node_key)
        self._peers[peer_id] = peer

    async def write(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransportError(f"local transport: unknown peer {peer_id!r}")
        check_deadline(deadline, f"local transport: write {tag!r}")
        if self.node_key in peer._refused:
            raise TransportError(f"local transport: {peer_id!r} removed us")
        if not peer.inbound:
            raise TransportError(f"local transport: {peer_id!r} accepts no writes")
        if (self.node_key, tag) in peer._discarded:
            return  # fenced by the receiver: the bytes go nowhere
        # the receiver's name for us ("" if it never added us: no grant can name that)
        me = next((pid for pid, t in peer._peers.items() if t is self), "")
        for op in ops:  # the receiver lands nothing it did not grant
            if why := peer.grants.refusal(me, tag, op.field, op.dst_offset, op.nbytes):
                raise TransportError(f"local transport: write outside the receiver's grants: {why}")
        copy_ops(self.registry, peer.registry, ops)

    async def discard(self, peer_id: str, tag: str) -> None:
        self.grants.revoke(peer_id, tag)
        peer = self._peers.get(peer_id)
        if peer is not None:
            self._discarded[(peer.node_key, tag)] = None
            while len(self._discarded) > 4096:
                del self._discarded[next(iter(self._discarded))]

    async def remove_peer(self, peer_id: str) -> None:
        self.grants.drop_peer(peer_id)
        peer = self._peers.pop(peer_id, None)
        if peer is not None and peer not in self._peers.values():
            self._refused.add(peer.node_key)

    async def close(self) -> None:
        self._peers.clear()
        _nodes.pop(self.node_key, None)


def copy_ops(src: BufferRegistry, dst: BufferRegistry, ops: Sequence[WriteOp]) -> None:
    """Execute byte descriptors between two registries of this process."""
    views: dict[str, tuple] = {}
    for op in ops:
        pair = views.get(op.field)
        if pair is None:
            pair = views[op.field] = (src.byte_view(op.field), dst.byte_view(op.field))
        s, d = pair
        if op.src_offset + op.nbytes > s.numel() or op.dst_offset + op.nbytes > d.numel():
            raise TransportError(f"descriptor {op} runs past the pool of field {op.field!r}")
        d[op.dst_offset : op.dst_offset + op.nbytes].copy_(
            s[op.src_offset : op.src_offset + op.nbytes]
        )


TRANSPORT = LocalTransport
