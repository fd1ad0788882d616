"""TCP data plane over asyncio sockets: the fallback when NIXL is missing.

Every node listens. A sender opens one data connection per peer, starts it with a hello naming
both ends, then sends frames ``header | tag | payload``. Without auth the hello names the two
transports' random keys; with a token it names ids derived from the handshake's secret (no key
exists or travels) and proves that secret in a challenge-response before the first frame. The receiver checks each
header against its own pools and reads the payload straight into the destination pool slice;
any violation drops the connection. Details and guarantees: docs/transports-tcp.md.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import struct
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, cast

import msgspec

from ..buffers import BufferRegistry, WriteOp
from ..errors import ConfigError
from ..guarantees import Guarantees
from ..logs import get_logger
from .base import MAX_TAG_BYTES, Transport, TransportError, check_deadline

if TYPE_CHECKING:
    from ..settings import Settings

HEADER = struct.Struct("!4sHHQQ")  # magic, tag length, field index, dst_offset, nbytes
HELLO = struct.Struct("!4sB16s16s")  # magic, version, sender id, receiver id
FRAME_MAGIC, HELLO_MAGIC, ACK, VERSION = b"EMTF", b"EMTH", b"\x06", 1
CHALLENGE = b"\x07"  # then 16 random bytes: prove the handshake's secret before any frame
PROOF_LABEL = b"emtransfer-tcp-data"
ID_LABEL = b"emtransfer-tcp-id"
MAX_TAG = MAX_TAG_BYTES  # bytes of one tag
MAX_FRAME = 1 << 30  # payload bytes of one frame; longer descriptors are split
SMALL = 64 << 10  # shorter payloads are copied next to their header: fewer syscalls
SOCK_BUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF; 0 keeps the kernel's autotuning
MAX_TAGS = 4096  # per peer: beyond this, the oldest tag nobody awaits is forgotten
_SCRATCH = memoryview(bytearray(1 << 16))  # sink for bytes read after a drop
_log = get_logger("emtransfer.transport")
Piece = bytes | bytearray | memoryview


def data_proof(secret: bytes, nonce: bytes, sender_key: bytes, receiver_key: bytes) -> bytes:
    """What a data connection sends to answer the receiver's challenge: an HMAC under the
    secret both nodes derived from their authenticated handshake (it never travels)."""
    return hmac.new(secret, PROOF_LABEL + nonce + sender_key + receiver_key, "sha256").digest()


def derived_ids(secret: bytes, sender_meta: bytes, receiver_meta: bytes) -> bytes:
    """The hello's two ids (sender's, receiver's) for a data connection from the transport
    whose metadata is ``sender_meta`` to ``receiver_meta``'s, under the handshake's secret:
    only the two authenticated peers can compute them, and they differ per direction."""
    mac = hmac.new(secret, ID_LABEL, "sha256")
    for part in (sender_meta, receiver_meta):
        mac.update(len(part).to_bytes(8, "big") + part)
    return mac.digest()


class FrameHeader(NamedTuple):
    tag_len: int
    field: int
    dst_offset: int
    nbytes: int


def parse_header(data: Piece, pool_sizes: Sequence[int]) -> FrameHeader:
    """Decode a frame header and check it against the receiver's pools (bytes per field
    index). Raises :class:`TransportError` for anything but a valid, in-bounds frame."""
    if len(data) != HEADER.size:
        raise TransportError(f"frame header must be {HEADER.size} bytes, got {len(data)}")
    magic, tag_len, fld, dst, nbytes = HEADER.unpack(data)
    if magic != FRAME_MAGIC:
        raise TransportError(f"bad frame magic {magic!r}")
    if tag_len > MAX_TAG:
        raise TransportError(f"tag of {tag_len} bytes exceeds {MAX_TAG}")
    if fld >= len(pool_sizes):
        raise TransportError(f"field index {fld} out of range ({len(pool_sizes)} fields)")
    if not 0 < nbytes <= MAX_FRAME:
        raise TransportError(f"frame of {nbytes} bytes outside (0, {MAX_FRAME}]")
    if dst + nbytes > pool_sizes[fld]:
        raise TransportError(f"bytes [{dst}, {dst + nbytes}) past pool {fld} ({pool_sizes[fld]})")
    return FrameHeader(tag_len, fld, dst, nbytes)


class _Meta(msgspec.Struct, array_like=True):
    version: int
    host: str
    port: int
    key: bytes  # empty when the transport is authenticated: ids derive from the secret
    pools: list[tuple[str, int]]  # (field, bytes) in the receiver's field-index order


@dataclass(slots=True, eq=False)
class _Tag:
    got: int = 0
    want: int = 0
    conn: object = None  # the connection that last carried it
    broken: str = ""  # why it can no longer complete
    waiter: asyncio.Future[None] | None = None


@dataclass(eq=False)
class _Peer:
    peer_id: str
    meta: _Meta
    pools: dict[str, tuple[int, int]]  # field -> (index, bytes) in the peer's pools
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    recv: set[_RecvConn] = field(default_factory=set)
    tags: dict[bytes, _Tag] = field(default_factory=dict)
    #: tags whose bytes must not reach the pool any more (bounded, oldest forgotten first)
    discarded: dict[bytes, None] = field(default_factory=dict)
    #: from the authenticated handshake: data connections prove it (empty: no auth)
    secret: bytes = b""
    #: the hello's (sender id, receiver id) on its connections to us, and on ours to it
    ids_in: tuple[bytes, bytes] = (b"", b"")
    ids_out: tuple[bytes, bytes] = (b"", b"")

    def tag(self, conn: object, tag: bytes) -> _Tag:
        if (st := self.tags.get(tag)) is None:
            idle = (k for k, s in self.tags.items() if s.waiter is None)
            if len(self.tags) >= MAX_TAGS and (old := next(idle, None)) is not None:
                del self.tags[old]
            st = self.tags[tag] = _Tag()
        st.conn = conn
        return st

    def fail(self, why: str, conn: object = None) -> None:
        """Mark broken, and fail the waiters of, all tags or those ``conn`` (which ended) carried
        or that have no byte yet."""
        for st in self.tags.values():
            if conn is None or st.conn is conn or st.conn is None:
                st.broken = why
                if st.waiter is not None and not st.waiter.done():
                    st.waiter.set_exception(TransportError(f"tcp transport: {self.peer_id}: {why}"))


def _tune(sock: socket.socket | None, size: int) -> None:
    try:
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF) if size else ():
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
    except OSError as exc:
        _log.debug("tcp: socket tuning failed", error=str(exc))


class _RecvConn(asyncio.BufferedProtocol):
    """Receiving end of one data connection: a hello, then frames whose payloads are read
    into the destination pool slice itself (no intermediate buffer)."""

    def __init__(self, owner: TcpTransport) -> None:
        self.owner, self.ids = owner, (b"", b"")  # the hello's (sender id, receiver id)
        self.peer: _Peer | None = None
        self.tr: asyncio.Transport  # set by connection_made
        self.state, self.got, self.dead, self.paused = "hello", 0, False, False
        self.proven, self.nonce = False, b""
        self.candidate: _Peer | None = None  # named by the hello, not yet proven
        self.target = memoryview(bytearray(HELLO.size))  # what the next bytes fill
        self.hdr, self.tagbuf = memoryview(bytearray(HEADER.size)), memoryview(bytearray(MAX_TAG))
        self.frame, self.cur = FrameHeader(0, 0, 0, 0), _Tag()
        self.cur_key, self.skip = b"", 0  # skip: payload bytes of a discarded tag left to sink
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(owner.hello_timeout, self.drop, "no hello accepted in time")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = cast(asyncio.Transport, transport)  # uvloop's are no asyncio.Transport
        _tune(transport.get_extra_info("socket"), self.owner.sock_buf)
        self.owner._conns.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.dead:
            return _SCRATCH
        if self.skip:
            return _SCRATCH[: min(self.skip, len(_SCRATCH))]
        return self.target[self.got :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.skip and not self.dead:
            self.skip -= nbytes
            if not self.skip:
                self.state, self.target, self.got = "header", self.hdr, 0
            return
        self.got += nbytes
        if not self.dead and self.got == len(self.target):
            self.got = 0
            try:
                self._advance()
            except TransportError as exc:
                self.drop(str(exc))

    def _advance(self) -> None:
        if self.state == "hello":
            return self.owner._hello(self, bytes(self.target))
        if self.state == "proof":
            return self.check_proof(bytes(self.target))
        if self.peer is None:
            raise TransportError("frame before the hello was accepted")
        if self.state == "payload":  # a frame is complete
            st, self.state, self.target = self.cur, "header", self.hdr
            st.got += self.frame.nbytes
            if st.waiter is not None and not st.waiter.done() and st.got >= st.want:
                st.waiter.set_result(None)
            return None
        if self.state == "header":
            self.frame = parse_header(self.hdr, self.owner.pool_sizes)
            if self.frame.tag_len:
                self.state, self.target = "tag", self.tagbuf[: self.frame.tag_len]
                return None
        h = self.frame  # the tag is known: read the payload into the pool slice
        key = bytes(self.target) if self.state == "tag" else b""
        if key in self.peer.discarded:  # its blocks may belong to someone else by now
            self.skip, self.state = h.nbytes, "skip"
            return None
        why = self.owner.grants.refusal(
            self.peer.peer_id, key.decode("utf-8", "replace"), self.owner.fields[h.field],
            h.dst_offset, h.nbytes,
        )  # fmt: skip
        if why is not None:  # not a single byte of it reaches the pool
            raise TransportError(f"write outside this node's grants: {why}")
        self.cur, self.cur_key = self.peer.tag(self, key), key
        self.state = "payload"
        self.target = self.owner.views[h.field][h.dst_offset : h.dst_offset + h.nbytes]
        return None

    def discard_current(self, key: bytes) -> None:
        """Sink the rest of the frame being read if it belongs to ``key``."""
        if self.state == "payload" and self.cur_key == key and not self.dead:
            self.skip, self.state = len(self.target) - self.got, "skip"
            self.got = 0
            if not self.skip:
                self.state, self.target = "header", self.hdr

    def accept(self, peer: _Peer) -> None:
        """The hello names ``peer``; with a handshake secret it must prove it first."""
        if peer.secret and not self.proven:
            self.candidate, self.nonce = peer, secrets.token_bytes(16)
            self.state, self.target = "proof", memoryview(bytearray(32))
            self.tr.write(CHALLENGE + self.nonce)
        else:
            self.timer.cancel()
            self.peer, self.state, self.target = peer, "header", self.hdr
            peer.recv.add(self)
            self.tr.write(ACK)
        if self.paused:
            self.paused = False
            self.tr.resume_reading()

    def check_proof(self, proof: bytes) -> None:
        peer = self.candidate
        assert peer is not None
        want = data_proof(peer.secret, self.nonce, *self.ids)
        if not hmac.compare_digest(proof, want):
            raise TransportError("data connection failed to prove the handshake's secret")
        self.proven = True
        self.accept(peer)

    def drop(self, why: str, *, warn: bool = True) -> None:
        """Close now; from here on no byte of this connection reaches the pool."""
        if warn and not self.dead:
            peer = self.peer.peer_id if self.peer else None
            _log.warning("tcp: dropping data connection", peer=peer, reason=why)
        self._end(why)
        self.tr.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"data connection lost ({exc or 'closed by the sender'})")

    def _end(self, why: str) -> None:
        if not self.dead:
            self.dead = True
            self.timer.cancel()
            self.owner._conns.discard(self)
            if self.peer is not None:
                self.peer.recv.discard(self)
                self.peer.fail(why, self)


class TcpTransport(Transport):
    """asyncio TCP data plane; runs on whichever loop is running (uvloop when installed).
    ``timeout`` bounds connecting, and how long a connection may wait for its hello to be
    accepted (both nodes add each other; the receiver's add_peer may come second).
    ``authenticated``: peers come with a handshake secret (``auth_token`` set), so the
    transport has no key to publish: its metadata carries none, and hellos name derived ids."""

    name = "tcp"
    #: write() returns once the bytes are in the kernel, not in the peer's pool; but the
    #: receiver reads every frame itself, so discard and remove_peer really stop them
    GUARANTEES = Guarantees(
        remote_completion=False, fences_tag=True, remove_stops_inbound=True, authorizes_writes=True
    )

    def __init__(self, registry: BufferRegistry, *, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 10.0, sock_buf: int = SOCK_BUF,
                 post_bound: float = 10.0, authenticated: bool = False) -> None:  # fmt: skip
        super().__init__(registry, post_bound=post_bound)
        if (dev := str(registry.device)) != "cpu":
            raise ConfigError(f"invalid setting device={dev!r}: the tcp transport needs CPU pools")
        self.host, self.port, self.hello_timeout, self.sock_buf = host, port, timeout, sock_buf
        self.key = b"" if authenticated else secrets.token_bytes(16)
        self.fields = list(registry.layouts)
        self.views = [registry.byte_view(f).numpy().data for f in self.fields]
        self.pool_sizes = [v.nbytes for v in self.views]
        self._server: asyncio.Server | None = None
        self._address = (host, port)
        #: (host, port) peers are told to connect to, when not the bound address
        self.advertise: tuple[str, int] | None = None
        self._peers: dict[str, _Peer] = {}
        self._by_id: dict[bytes, _Peer] = {}  # by the sender id its hellos carry
        self._conns: set[_RecvConn] = set()

    @classmethod
    def from_settings(cls, settings: Settings, registry: BufferRegistry) -> TcpTransport:
        t = cls(
            registry,
            host=settings.host,
            port=settings.tcp_data_port,
            timeout=settings.bootstrap_timeout,
            post_bound=settings.write_timeout,
            authenticated=settings.auth_token is not None,
        )
        if settings.tcp_advertise is not None:
            host, _, port = settings.tcp_advertise.rpartition(":")
            t.advertise = (host.strip("[]"), int(port))
        return t

    async def start(self) -> None:
        if self._server is None:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: _RecvConn(self), self.host, self.port)
            for sock in self._server.sockets:  # accepted sockets inherit it (and window scale)
                _tune(sock, self.sock_buf)
            host, self.port = self._server.sockets[0].getsockname()[:2]
            wildcard = self.host in ("", "0.0.0.0", "::")
            self._address = (socket.gethostname() if wildcard else host, self.port)
            if self.advertise is not None:  # peers reach us there (NAT, a proxy)
                self._address = self.advertise

    def metadata(self) -> bytes:
        if self._server is None:
            raise TransportError("tcp transport: metadata() before start()")
        pools = list(zip(self.fields, self.pool_sizes, strict=True)) if self.inbound else []
        return msgspec.msgpack.encode(_Meta(VERSION, *self._address, self.key, pools))

    async def add_peer(self, peer_id: str, metadata: bytes, *, secret: bytes = b"") -> None:
        try:
            meta = msgspec.msgpack.decode(metadata, type=_Meta)
        except msgspec.MsgspecError as exc:
            raise TransportError(f"tcp transport: bad metadata for {peer_id!r}: {exc}") from None
        if meta.version != VERSION or len(meta.key) not in (0, 16):
            raise TransportError(f"tcp transport: {peer_id!r} speaks version {meta.version}")
        if secret:  # nothing secret travelled: both ends derive the ids
            mine = self.metadata()
            d_in, d_out = derived_ids(secret, metadata, mine), derived_ids(secret, mine, metadata)
            ids_in, ids_out = (d_in[:16], d_in[16:]), (d_out[:16], d_out[16:])
        elif self.key and meta.key:
            ids_in, ids_out = (meta.key, self.key), (self.key, meta.key)
        else:
            raise TransportError(
                f"tcp transport: {peer_id!r} needs the handshake's secret (auth_token set on "
                "one side only?)"
            )
        pools = {name: (i, n) for i, (name, n) in enumerate(meta.pools)}
        if pools and pools.keys() != set(self.fields):  # none: a node never written to
            raise TransportError(f"tcp transport: {peer_id!r} has fields {list(pools)}")
        await self.remove_peer(peer_id)
        peer = _Peer(peer_id, meta, pools, secret=secret, ids_in=ids_in, ids_out=ids_out)
        self._peers[peer_id] = self._by_id[ids_in[0]] = peer
        for conn in [c for c in self._conns if c.paused and c.ids[0] == ids_in[0]]:
            self._match(conn, peer)

    def _hello(self, conn: _RecvConn, data: bytes) -> None:
        magic, version, sender, receiver = HELLO.unpack(data)
        if not self.inbound:
            raise TransportError("this node accepts no writes")
        if magic != HELLO_MAGIC or version != VERSION:
            raise TransportError("bad hello (magic or version)")
        if self.key and not hmac.compare_digest(receiver, self.key):
            raise TransportError("bad hello (receiver key)")
        conn.ids, conn.state, conn.target = (sender, receiver), "header", conn.hdr
        if (peer := self._peer_by_id(sender)) is not None:
            self._match(conn, peer)
        else:  # our add_peer for it may still come: wait, unread, until the timer drops it
            conn.paused = True
            conn.tr.pause_reading()

    def _match(self, conn: _RecvConn, peer: _Peer) -> None:
        if not hmac.compare_digest(conn.ids[1], peer.ids_in[1]):
            return conn.drop("bad hello (receiver id)")
        conn.accept(peer)

    def _peer_by_id(self, sender: bytes) -> _Peer | None:
        """The peer whose hellos carry this sender id, compared in constant time against every
        peer's (without auth the id is a key, a credential: a hash lookup would tell a prober
        how close a guess came)."""
        found = None
        for candidate, peer in self._by_id.items():
            if hmac.compare_digest(candidate, sender):
                found = peer
        return found

    def _peer(self, peer_id: str) -> _Peer:
        if (peer := self._peers.get(peer_id)) is None:
            raise TransportError(f"tcp transport: unknown peer {peer_id!r}")
        return peer

    def _frames(self, peer: _Peer, ops: Sequence[WriteOp], tag: bytes) -> list[Piece]:
        """Check and coalesce ``ops``; the pieces to send, large payloads as pool views."""
        if len(tag) > MAX_TAG:
            raise TransportError(f"tcp transport: tag longer than {MAX_TAG} bytes")
        if not peer.pools:
            raise TransportError(f"tcp transport: {peer.peer_id!r} accepts no writes")
        runs: list[list] = []  # [field, src, dst, nbytes], adjacent descriptors merged
        for op in ops:
            if min(op.src_offset, op.dst_offset, op.nbytes) < 0 or op.field not in peer.pools:
                raise TransportError(f"tcp transport: invalid descriptor {op}")
            r = runs[-1] if runs else None
            if (
                r
                and r[0] == op.field
                and r[1] + r[3] == op.src_offset
                and r[2] + r[3] == op.dst_offset
            ):
                r[3] += op.nbytes
            elif op.nbytes:
                runs.append([op.field, op.src_offset, op.dst_offset, op.nbytes])
        pieces: list[Piece] = []
        batch = bytearray()
        for fld, src, dst, n in runs:
            (idx, dsize), view = peer.pools[fld], self.views[self.fields.index(fld)]
            if src + n > len(view) or dst + n > dsize:
                raise TransportError(f"tcp transport: {fld} bytes {src}/{dst}+{n} past a pool")
            for off in range(0, n, MAX_FRAME):
                m = min(MAX_FRAME, n - off)
                batch += HEADER.pack(FRAME_MAGIC, len(tag), idx, dst + off, m) + tag
                if m < SMALL:
                    batch += view[src + off : src + off + m]
                else:
                    pieces += (batch, view[src + off : src + off + m])
                    batch = bytearray()
        return [*pieces, batch] if batch else pieces

    async def _connect(self, peer: _Peer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        writer = None
        try:
            async with asyncio.timeout(self.hello_timeout):
                reader, writer = await asyncio.open_connection(peer.meta.host, peer.meta.port)
                _tune(writer.get_extra_info("socket"), self.sock_buf)
                # limit 0: drain() returns once every byte is in the kernel, not below "low"
                writer.transport.set_write_buffer_limits(high=0)
                writer.write(HELLO.pack(HELLO_MAGIC, VERSION, *peer.ids_out))
                answer = await reader.read(1)
                if answer == CHALLENGE and peer.secret:  # prove the handshake's secret
                    nonce = await reader.read(16)
                    if len(nonce) != 16:
                        raise ConnectionRefusedError("the peer's challenge was cut short")
                    writer.write(data_proof(peer.secret, nonce, *peer.ids_out))
                    answer = await reader.read(1)
                if answer == ACK:
                    return reader, writer
                raise ConnectionRefusedError("the peer refused our hello")
        except BaseException as exc:
            if writer is not None:
                writer.transport.abort()
            if isinstance(exc, OSError | TimeoutError):
                raise TransportError(
                    f"tcp transport: cannot reach {peer.peer_id!r}: {exc!r}"
                ) from exc
            raise

    def write_nowait(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> Awaitable[None] | None:
        """Post at once on a connection that is up and idle: done (None) when the kernel took
        every byte, as ``write`` would return; else ``write`` itself (connecting, queueing
        behind another write), or the wait for the kernel to take the rest."""
        peer = self._peers.get(peer_id)
        stream = peer.stream if peer is not None else None
        if (
            peer is None
            or stream is None
            or peer.lock.locked()
            or stream[1].is_closing()
            or stream[0].at_eof()
            or stream[1].transport.get_write_buffer_size()
        ):
            return self.write(peer_id, ops, tag=tag, deadline=deadline)
        pieces = self._frames(peer, ops, tag.encode())
        if not pieces:
            return None
        check_deadline(deadline, f"tcp transport: write {tag!r}")  # nothing sent: keep it
        writer = stream[1]
        try:
            self._send_pieces(writer, pieces)
        except BaseException as exc:  # failed mid-frame: drop the stream
            writer.transport.abort()
            if isinstance(exc, OSError):
                raise TransportError(f"tcp transport: write to {peer_id!r}: {exc!r}") from exc
            raise
        if writer.transport.get_write_buffer_size() or writer.transport.is_closing():
            return self._finish_write(peer, writer)
        return None

    def _send_pieces(self, writer: asyncio.StreamWriter, pieces: list[Piece]) -> None:
        transport = writer.transport
        if len(pieces) > 1 and _vectored(transport):
            transport.writelines(pieces)  # one writev: header and payload together
        else:
            for piece in pieces:
                writer.write(piece)

    async def _finish_write(self, peer: _Peer, writer: asyncio.StreamWriter) -> None:
        """A write posted by write_nowait that the kernel did not take whole: wait for it as
        ``write`` does (one write at a time per connection)."""
        async with peer.lock:
            try:
                await self._drained(peer.peer_id, writer)
            except BaseException as exc:
                writer.transport.abort()
                if isinstance(exc, OSError):
                    raise TransportError(
                        f"tcp transport: write to {peer.peer_id!r}: {exc!r}"
                    ) from exc
                raise

    async def _drained(self, peer_id: str, writer: asyncio.StreamWriter) -> None:
        """Return once every byte written is in the kernel, within ``post_bound``."""
        transport = writer.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            # not all in the kernel yet (or the connection failed): wait, bounded
            try:
                async with asyncio.timeout(self.post_bound):
                    await writer.drain()
            except TimeoutError:
                raise TransportError(
                    f"tcp transport: write to {peer_id!r} not taken within "
                    f"{self.post_bound}s (write_timeout): the peer stopped reading"
                ) from None
        if writer.is_closing():
            raise ConnectionResetError("connection closed")

    async def write(
        self, peer_id: str, ops: Sequence[WriteOp], *, tag: str, deadline: float = float("inf")
    ) -> None:
        """Send ``ops``; returns once every byte is in the kernel (the source may be reused),
        within ``post_bound`` seconds or the connection is dropped and the write fails."""
        peer = self._peer(peer_id)
        pieces = self._frames(peer, ops, tag.encode())
        async with peer.lock:  # one write at a time per connection: frames never interleave
            if self._peers.get(peer_id) is not peer:
                raise TransportError(f"tcp transport: peer {peer_id!r} was removed")
            if not pieces:
                return
            if peer.stream is None or peer.stream[1].is_closing() or peer.stream[0].at_eof():
                peer.stream = await self._connect(peer)
            writer = peer.stream[1]
            if self._peers.get(peer_id) is not peer:  # removed while connecting
                writer.transport.abort()
                raise TransportError(f"tcp transport: peer {peer_id!r} was removed")
            check_deadline(deadline, f"tcp transport: write {tag!r}")  # nothing sent: keep it
            try:
                self._send_pieces(writer, pieces)
                await self._drained(peer_id, writer)
            except BaseException as exc:  # failed or cancelled mid-frame: drop the stream
                writer.transport.abort()
                if isinstance(exc, OSError):
                    raise TransportError(f"tcp transport: write to {peer_id!r}: {exc!r}") from exc
                raise

    def landed(self, peer_id: str, tag: str, nbytes: int) -> bool:
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        key = tag.encode()
        st = peer.tags.get(key)
        if st is None or st.got < nbytes or key in peer.discarded:
            return False  # wait_landed waits, or says why it cannot
        del peer.tags[key]
        return True

    async def wait_landed(self, peer_id: str, tag: str, nbytes: int) -> None:
        peer, key = self._peer(peer_id), tag.encode()
        if key in peer.discarded:
            raise TransportError(f"tcp transport: tag {tag!r} was discarded")
        st = peer.tags.setdefault(key, _Tag())
        try:
            if st.got < nbytes:
                if st.broken:
                    raise TransportError(f"tcp transport: {peer_id}: tag {tag!r}: {st.broken}")
                st.want, st.waiter = nbytes, asyncio.get_running_loop().create_future()
                await st.waiter
        finally:
            if peer.tags.get(key) is st:
                del peer.tags[key]

    async def discard(self, peer_id: str, tag: str) -> None:
        """From now on no byte written under ``tag`` lands in the pool (they go to scratch)."""
        peer, key = self._peers.get(peer_id), tag.encode()
        self.grants.revoke(peer_id, tag)
        if peer is None:
            return  # removed: nothing of it reaches the pool any more
        peer.discarded[key] = None
        if len(peer.discarded) > MAX_TAGS:
            # forgetting a tag would let its late bytes land: drop the connections instead,
            # taking every byte still in flight on them along (the sender reconnects)
            for conn in list(peer.recv):
                conn.drop("too many discarded tags", warn=False)
            peer.discarded.clear()
        for conn in peer.recv:
            conn.discard_current(key)
        st = peer.tags.pop(key, None)
        if st is not None and st.waiter is not None and not st.waiter.done():
            st.waiter.set_exception(TransportError(f"tcp transport: tag {tag!r} discarded"))

    async def remove_peer(self, peer_id: str) -> None:
        self.grants.drop_peer(peer_id)
        if (peer := self._peers.pop(peer_id, None)) is None:
            return
        if self._by_id.get(peer.ids_in[0]) is peer:
            del self._by_id[peer.ids_in[0]]
        if peer.stream is not None:
            peer.stream[1].transport.abort()
        for conn in list(peer.recv):
            conn.drop("peer removed", warn=False)
        peer.fail("peer removed")
        peer.tags.clear()

    async def finish_writes(self) -> None:
        """Half-close every data connection we write on and wait (up to the hello timeout)
        until the peer read it all: a ``write`` that returned had its bytes in the kernel, and
        an abort, or a close with the receiver's acks unread (the kernel answers it with a
        reset), would throw them away before they reach the peer."""
        streams = [p.stream for p in self._peers.values() if p.stream is not None]
        for p in self._peers.values():
            p.stream = None  # a later write opens a fresh connection
        if streams:
            await asyncio.gather(*(_finish(*st, self.hello_timeout) for st in streams))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.finish_writes()
        for peer_id in list(self._peers):
            await self.remove_peer(peer_id)
        for conn in list(self._conns):
            conn.drop("transport closed", warn=False)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


def _vectored(transport: object) -> bool:
    """Whether ``transport.writelines`` hands its buffers to the kernel in one call (uvloop's
    does, a writev; asyncio's before Python 3.12 joins them: a copy of the payload)."""
    kind = type(transport)
    known = _VECTORED.get(kind)
    if known is None:
        known = _VECTORED[kind] = kind.__module__.startswith("uvloop")
    return known


_VECTORED: dict[type, bool] = {}


async def _finish(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
) -> None:
    """Half-close (FIN after the last byte), drain the peer's acks until it closes its end."""
    try:
        writer.write_eof()
        async with asyncio.timeout(timeout):
            while await reader.read(1 << 16):
                pass
    except (OSError, TimeoutError, RuntimeError):
        pass  # the peer is gone or slow: what it did not read is lost with the connection
    finally:
        writer.transport.abort()  # the stream left the peer table: nothing else closes it


TRANSPORT = TcpTransport
