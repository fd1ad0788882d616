"""In-process addresses (``local://...``): how a language node finds an encode node of the same
process without a socket. Holds anything that can accept a control channel, so it depends on
no node class."""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from ..errors import PeerLost
from .channel import Channel


class Acceptor(Protocol):
    async def accept(self, channel: Channel) -> Any: ...


_local_ids = itertools.count(1)
_local_nodes: dict[str, Acceptor] = {}


def register_local(node: Acceptor) -> str:
    address = f"local://encode-{next(_local_ids)}"
    _local_nodes[address] = node
    return address


def unregister_local(address: str) -> None:
    _local_nodes.pop(address, None)


def lookup_local(address: str) -> Acceptor:
    node = _local_nodes.get(address)
    if node is None:
        raise PeerLost(f"no encode node at {address} in this process")
    return node
