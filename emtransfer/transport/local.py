"""In-process transport: a real copy between two nodes' pools of the same process, through
the same descriptor lists a real engine gets. For tests, the demo on one host, and as the
reference every other transport is checked against."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

from ..buffers import BufferRegistry, WriteOp
from .base import Transport, TransportError

_ids = itertools.count(1)
_nodes: weakref.WeakValueDictionary[str, LocalTransport] = weakref.WeakValueDictionary()


class LocalTransport(Transport):
    name = "local"
    fences_on_write_completion = True

    def __init__(self, registry: BufferRegistry) -> None:
        super().__init__(registry)
        self.node_key = f"local-{next(_ids)}"
        self._peers: dict[str, LocalTransport] = {}

    async def start(self) -> None:
        _nodes[self.node_key] = self

    def metadata(self) -> bytes:
        return self.node_key.encode()

    async def add_peer(self, peer_id: str, metadata: bytes) -> None:
        peer = _nodes.get(metadata.decode())
        if peer is None:
            raise TransportError(f"local transport: no node {metadata!r} in this process")
        if peer.registry.layouts.keys() != self.registry.layouts.keys():
            raise TransportError("local transport: the peer's fields differ")
        self._peers[peer_id] = peer

    async def write(self, peer_id: str, ops: Sequence[WriteOp], *, tag: str) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransportError(f"local transport: unknown peer {peer_id!r}")
        copy_ops(self.registry, peer.registry, ops)

    async def remove_peer(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

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
