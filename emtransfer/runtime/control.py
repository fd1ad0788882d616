"""The control connection between processes: asyncio TCP, length-prefixed frames with a hard
size limit, every message validated on receipt (:mod:`emtransfer.protocol.framing`)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

from ..errors import ConfigError, InvalidRequest, PeerLost
from ..protocol import messages as m
from ..protocol.framing import FrameDecoder, frame
from .channel import Channel

#: a peer that does not read its control messages is treated as lost beyond this backlog
MAX_SEND_BACKLOG = 16 << 20
_READ_CHUNK = 1 << 16


class TcpChannel(Channel):
    """A control channel over one TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._decoder = FrameDecoder()
        self._ready: deque[bytes] = deque()
        self._closed = False
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        self._desc = f"tcp:{peer[0]}:{peer[1]}" if peer else "tcp"

    @property
    def description(self) -> str:
        return self._desc

    def send(self, msg: m.Message) -> None:
        transport = self._transport  # the writer's, without its property calls per message
        if self._closed or transport.is_closing():
            raise PeerLost(f"control connection {self._desc} closed")
        if transport.get_write_buffer_size() > MAX_SEND_BACKLOG:
            self.close()
            raise PeerLost(f"peer {self._desc} stopped reading its control connection")
        transport.write(frame(msg))

    async def drain(self) -> None:
        if self._closed:
            raise PeerLost(f"control connection {self._desc} closed")
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self.close()
            raise PeerLost(f"control connection {self._desc} failed: {exc}") from None

    async def recv(self) -> m.AnyMessage:
        while not self._ready:
            if self._closed:
                raise PeerLost(f"control connection {self._desc} closed")
            try:
                data = await self._reader.read(_READ_CHUNK)
            except (ConnectionError, OSError) as exc:
                self.close()
                raise PeerLost(f"control connection {self._desc} failed: {exc}") from None
            if not data:
                self.close()
                raise PeerLost(f"peer closed the control connection {self._desc}")
            self._ready.extend(self._decoder.feed(data))  # ProtocolError: caller drops us
        return m.decode(self._ready.popleft())  # InvalidMessage: this one message is refused

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``tcp://host:port`` (``[v6]:port`` too) -> (host, port)."""
    addr = address.removeprefix("tcp://")
    if "://" in addr:
        raise InvalidRequest(
            f"invalid address {address!r}: expected host:port without a scheme (the encode "
            "node's bootstrap address, not its HTTP URL)"
        )
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidRequest(f"invalid address {address!r}: expected host:port")
    if not 0 < int(port) < 65536:
        raise InvalidRequest(f"invalid address {address!r}: port must be 1..65535")
    return host.strip("[]"), int(port)


async def listen(
    host: str,
    port: int,
    on_channel: Callable[[TcpChannel], Awaitable[object]],
    *,
    tls: ssl.SSLContext | None = None,
    tls_timeout: float = 10.0,
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await on_channel(TcpChannel(reader, writer))

    return await asyncio.start_server(
        handle,
        host,
        port,
        limit=_READ_CHUNK,
        ssl=tls,
        ssl_handshake_timeout=tls_timeout if tls else None,
    )


async def connect(
    address: str,
    timeout: float,
    *,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> TcpChannel:
    """Connect within ``timeout``. A refusal (nothing listens there), an unknown host or an
    unreachable network is reported at once, as :class:`PeerLost`; whoever wants to wait for
    a peer that is starting retries (the language server's encoder pool does). With ``tls``,
    the server's certificate must name ``server_name`` (default: the host)."""
    host, port = parse_address(address)
    name = (server_name or host) if tls else None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, limit=_READ_CHUNK, ssl=tls, server_hostname=name
            )
        return TcpChannel(reader, writer)
    except TimeoutError:
        raise PeerLost(f"could not connect to {address} within {timeout}s") from None
    except ssl.SSLError as exc:  # a certificate problem does not go away by retrying
        raise ConfigError(f"TLS handshake with {address} failed: {exc}") from None
    except ConnectionRefusedError:
        raise PeerLost(f"could not connect to {address}: connection refused") from None
    except OSError as exc:
        raise PeerLost(f"could not connect to {address}: {exc.strerror or exc}") from None
