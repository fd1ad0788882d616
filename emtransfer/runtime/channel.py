"""Control channels: one per peer pair, carrying validated protocol messages.

:class:`Channel` is the small interface the nodes use; :class:`LocalChannel` connects two
nodes of one process (every message still goes through the wire encoding and validation).
Cross-process channels implement the same interface over a socket.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from ..errors import PeerLost
from ..protocol import messages as m

_EOF = object()


class Channel(ABC):
    """A bidirectional, ordered, message-oriented control connection."""

    @abstractmethod
    def send(self, msg: m.Message) -> None:
        """Queue a message; never blocks. Raises :class:`PeerLost` once closed."""

    @abstractmethod
    async def recv(self) -> m.AnyMessage:
        """The next valid message; :class:`PeerLost` at the end of the connection,
        :class:`~emtransfer.protocol.messages.InvalidMessage` for one malformed message (the
        stream goes on), :class:`~emtransfer.errors.ProtocolError` for a broken stream."""

    async def drain(self) -> None:
        """Wait until what was queued is handed to the network (a sender of many messages,
        such as the pieces of a large job, pauses here instead of growing the queue)."""

    @abstractmethod
    def close(self) -> None:
        """Close both directions; the peer's ``recv`` raises :class:`PeerLost`."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @property
    def description(self) -> str:
        return type(self).__name__


class LocalChannel(Channel):
    """One end of an in-process channel pair."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._other: LocalChannel | None = None
        self._closed = False

    @classmethod
    def pair(cls) -> tuple[LocalChannel, LocalChannel]:
        a, b = cls(), cls()
        a._other, b._other = b, a
        return a, b

    def send(self, msg: m.Message) -> None:
        if self._closed or self._other is None or self._other._closed:
            raise PeerLost("control channel closed")
        self._other._inbox.put_nowait(m.encode(msg))

    async def recv(self) -> m.AnyMessage:
        if self._closed:
            raise PeerLost("control channel closed")
        item = await self._inbox.get()
        if item is _EOF:
            self._closed = True
            raise PeerLost("peer closed the control channel")
        assert isinstance(item, bytes)
        return m.decode(item)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put_nowait(_EOF)
        if self._other is not None and not self._other._closed:
            self._other._inbox.put_nowait(_EOF)

    @property
    def closed(self) -> bool:
        return self._closed
