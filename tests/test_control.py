"""The control connection over real TCP (127.0.0.1): handshake, settings and version checks,
authentication (the secret never crosses the wire), heartbeats, a peer that vanishes, reconnects
to a restarted encode node, and bootstrap timeouts.

The data plane is the in-process ``local`` transport; only the control channel is TCP. Raw peers
(a bare asyncio client or server speaking frames) play the misbehaving side."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import torch
from helpers_runtime import grant, raises_typed, sender_session, state_of
from log_capture import capture_logs
from transport_harness import trust_all

import emtransfer as et
from emtransfer.protocol import PROTOCOL_VERSION
from emtransfer.protocol import messages as m
from emtransfer.protocol.framing import FrameDecoder, frame
from emtransfer.runtime.control import TcpChannel

HIDDEN = 64
BLOCK = 16
BASE: dict[str, Any] = {
    "transport": "local",
    "hidden_size": HIDDEN,
    "dtype": "float32",
    "num_blocks": 16,
    "default_blocks": 8,
    "block_size": BLOCK,
}
FAST_HB = {"heartbeat_interval": 0.05, "heartbeat_timeout": 0.3}


def settings(**kw: Any) -> et.Settings:
    return et.Settings(**{**BASE, **kw})


def payload(n: int, seed: int = 0, s: et.Settings | None = None) -> dict[str, torch.Tensor]:
    """Distinct tokens (column 0 is the token index) in the layout of ``s``."""
    s = s or settings()
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, s.hidden_size, generator=g)
    emb[:, 0] = torch.arange(n, dtype=torch.float32) + 1000 * seed
    out = {"embeddings": emb.to(s.torch_dtype)}
    for name, (shape, dtype) in list(s.field_specs().items())[1:]:
        out[name] = torch.randint(0, 1 << 30, (n, *shape), generator=g).to(dtype)
    return out


async def poll_until(
    cond: Callable[[], bool], timeout: float, what: str, step: float = 0.005
) -> float:
    """Poll ``cond`` with small waits until it holds; return the seconds it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        if loop.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)
    return loop.time() - t0


def pool_full(node: et.EncodeNode | et.LanguageNode) -> bool:
    a = node.allocator
    return a.num_free == a.num_blocks and a.num_quarantined == 0 and not a.leak_report()


async def wait_pools_full(*nodes: et.EncodeNode | et.LanguageNode, timeout: float = 5.0) -> None:
    await poll_until(lambda: all(pool_full(n) for n in nodes), timeout, "pools to be full")


async def transfer(enc: et.EncodeNode, lang: et.LanguageNode, peer: Any, rid: str, n: int) -> None:
    data = payload(n, seed=len(rid), s=enc.settings)
    send = asyncio.create_task(enc.send(rid, data))
    got = await asyncio.wait_for(lang.receive(rid, peer), 10)
    await asyncio.wait_for(send, 10)
    assert got.tensors.keys() == data.keys()
    for name, t in data.items():
        assert torch.equal(got.tensors[name], t), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    """Every log event (debug and up) of nodes built inside the test."""
    with capture_logs() as cap:
        yield cap


# ----------------------------------------------------------------------------- raw peers


class RawConn:
    """One end of a TCP control connection, spoken by hand; records every byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.ready: deque[bytes] = deque()
        self.rx = bytearray()
        self.tx = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, address: str) -> RawConn:
        host, port = address.rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    def send(self, msg: m.Message) -> None:
        self.send_raw(frame(msg))

    def send_raw(self, data: bytes) -> None:
        self.tx += data
        self.writer.write(data)

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(1 << 16)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.rx += data
        self.ready.extend(self.decoder.feed(data))
        return True

    async def recv(self, timeout: float = 5.0, *, skip_heartbeats: bool = True) -> m.AnyMessage:
        async with asyncio.timeout(timeout):
            while True:
                while not self.ready:
                    if not await self._fill():
                        raise ConnectionError("connection closed by the node")
                msg = m.decode(self.ready.popleft())
                if not (skip_heartbeats and isinstance(msg, m.Heartbeat)):
                    return msg

    async def recv_until(self, pred: Callable[[m.AnyMessage], bool], timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                if pred(msg):
                    return msg

    async def closed_by_peer(self, timeout: float = 5.0) -> list[m.AnyMessage]:
        """Read (and return) everything until the node closes the connection."""
        got: list[m.AnyMessage] = []
        async with asyncio.timeout(timeout):
            while True:
                while self.ready:
                    got.append(m.decode(self.ready.popleft()))
                if not await self._fill():
                    return got

    def close(self) -> None:
        self.writer.close()


def proof(token: str, label: bytes, *parts: bytes) -> bytes:
    """The handshake proof, written down independently of the node's code: HMAC-SHA256 under
    the token over the label and the length-prefixed parts."""
    mac = hmac.new(token.encode(), label, hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "big") + part)
    return mac.digest()


def transcript(hello: m.Hello | m.HelloAck) -> bytes:
    """What a proof covers of a Hello or HelloAck: all of it but the proof."""
    return hashlib.sha256(m.encode(msgspec.structs.replace(hello, auth=b""))).digest()


async def raw_client(
    address: str,
    hello_fields: dict[str, Any],
    *,
    token: str | None = None,
    node_id: str = "raw-language",
    **override: Any,
) -> tuple[RawConn, m.AnyMessage]:
    """Connect, answer the Challenge with a Hello built from ``hello_fields`` (borrowed from a
    started node, so the transport metadata is real), return the node's reply."""
    conn = await RawConn.open(address)
    challenge = await conn.recv()
    assert isinstance(challenge, m.Challenge), challenge
    fields = {**hello_fields, "node_id": node_id, **override}
    hello = m.Hello(**fields, nonce=os.urandom(16))
    auth = proof(token, b"emtransfer-client", challenge.nonce, transcript(hello)) if token else b""
    conn.send(msgspec.structs.replace(hello, auth=auth))
    return conn, await conn.recv()


class RawServer:
    """A listener that hands out the raw connections it accepts."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[RawConn] = asyncio.Queue()
        self.all: list[RawConn] = []
        self.address = ""

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(reader, writer)
        self.all.append(conn)
        await self.conns.put(conn)

    async def accept(self, timeout: float = 5.0) -> RawConn:
        return await asyncio.wait_for(self.conns.get(), timeout)

    async def __aexit__(self, *exc: object) -> None:
        for c in self.all:
            c.close()
        self.server.close()
        await self.server.wait_closed()


async def serve_raw_handshake(
    conn: RawConn, ack_fields: dict[str, Any], *, node_id: str = "raw-encode", **override: Any
) -> m.Hello:
    """Play the encode side of the handshake: Challenge, read Hello, HelloAck."""
    nonce = os.urandom(16)
    conn.send(m.Challenge(version=PROTOCOL_VERSION, nonce=nonce))
    hello = await conn.recv()
    assert isinstance(hello, m.Hello), hello
    conn.send(m.HelloAck(**{**ack_fields, "node_id": node_id, **override}))
    return hello


class Recorder:
    """A TCP proxy that records what passes each way (client -> server: ``up``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.up = bytearray()
        self.down = bytearray()
        self.tasks: list[asyncio.Task[None]] = []
        self.address = ""

    async def __aenter__(self) -> Recorder:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        r2, w2 = await asyncio.open_connection(host, int(port))
        self.tasks += [
            asyncio.create_task(self._pump(reader, w2, self.up)),
            asyncio.create_task(self._pump(r2, writer, self.down)),
        ]

    @staticmethod
    async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, buf: bytearray) -> None:
        try:
            while data := await r.read(1 << 16):
                buf += data
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server.close()
        await self.server.wait_closed()


@asynccontextmanager
async def tcp_pair(
    enc_s: et.Settings, lang_s: et.Settings | None = None
) -> AsyncIterator[tuple[et.EncodeNode, et.LanguageNode]]:
    async with et.EncodeNode(enc_s, control="tcp") as enc, et.LanguageNode(lang_s or enc_s) as lang:
        yield enc, lang


# ------------------------------------------------------------------------------- handshake


async def test_tcp_handshake_lists_each_other_as_peers() -> None:
    s = settings()
    async with tcp_pair(s) as (enc, lang):
        assert enc.address.startswith("127.0.0.1:")
        peer = await asyncio.wait_for(lang.connect(enc.address), 5)
        assert isinstance(peer.channel, TcpChannel)
        assert peer.node_id == enc.node_id and peer.role == "encode"
        assert peer.num_blocks == s.num_blocks
        assert lang.health()["peers"] == [enc.node_id]
        await poll_until(
            lambda: bool(enc.peers_named(lang.node_id)), 5, "encode node lists the language"
        )
        assert enc.health()["peers"] == [lang.node_id]
        assert enc.peers_named(lang.node_id)[0].role == "language"
        assert isinstance(enc.peers_named(lang.node_id)[0].channel, TcpChannel)
        # connecting again reuses the live connection
        assert await lang.connect(enc.address) is peer
        assert len(enc.peers) == 1
        # and it carries a transfer with a resume (300 tokens > 8 blocks of 16)
        await transfer(enc, lang, peer, "hs-1", 300)
        await transfer(enc, lang, enc.address, "hs-2", 5)
        await wait_pools_full(enc, lang)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"hidden_size": 2 * HIDDEN}, f"hidden_size={2 * HIDDEN} on the "),
        ({"dtype": "float16"}, "dtype='float16' on the "),
        ({"block_size": 2 * BLOCK}, "block_size"),
        (
            {"fields": {"mrope_positions": {"shape": [3], "dtype": "int64"}}},
            "fields.mrope_positions",
        ),
    ],
    ids=["hidden_size", "dtype", "block_size", "extra-field"],
)
@pytest.mark.parametrize("side", ["language", "encode"])
async def test_settings_mismatch_is_a_config_error_naming_the_setting(
    override: dict[str, Any], named: str, side: str
) -> None:
    enc_s = settings(**override) if side == "encode" else settings()
    lang_s = settings(**override) if side == "language" else settings()
    async with tcp_pair(enc_s, lang_s) as (enc, lang):
        with raises_typed(et.ConfigError, match=named.replace(".", r"\.")):
            await asyncio.wait_for(lang.connect(enc.address), 5)
        assert not lang.peers
        await poll_until(lambda: not enc.peers, 5, "no peer on the encode side")
        # the encode node keeps serving well-configured clients
        async with et.LanguageNode(enc_s) as good:
            peer = await asyncio.wait_for(good.connect(enc.address), 5)
            await transfer(enc, good, peer, "after-mismatch", 20)
            await wait_pools_full(enc, good)
        assert pool_full(lang)


async def test_protocol_version_mismatch_from_a_client_is_refused_and_closed() -> None:
    s = settings()
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as shadow:
        conn, reply = await raw_client(enc.address, shadow._hello_fields(), version=99)
        assert isinstance(reply, m.Error), reply
        assert "version" in reply.reason and "99" in reply.reason
        assert not any(isinstance(x, m.HelloAck) for x in await conn.closed_by_peer(5))
        assert conn.eof and not enc.peers
        # a wrong role is refused the same way
        conn, reply = await raw_client(enc.address, shadow._hello_fields(), role="encode")
        assert isinstance(reply, m.Error) and "role" in reply.reason, reply
        await conn.closed_by_peer(5)
        assert not enc.peers and pool_full(enc)


@pytest.mark.parametrize("where", ["challenge", "hello_ack"])
async def test_protocol_version_mismatch_from_the_server_is_refused(where: str) -> None:
    s = settings()
    async with RawServer() as raw, et.EncodeNode(s) as shadow, et.LanguageNode(s) as lang:
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        if where == "challenge":
            conn.send(m.Challenge(version=99, nonce=os.urandom(16)))
        else:
            await serve_raw_handshake(conn, shadow._hello_fields(), version=99)
        with raises_typed(et.ProtocolError, match="version"):
            await asyncio.wait_for(connecting, 5)
        await conn.closed_by_peer(5)  # the language node hung up
        assert not lang.peers and pool_full(lang)


# ------------------------------------------------------------------------------------ auth

SECRET_A = "s3cr3t-token-AAAA-7f1d"
SECRET_B = "s3cr3t-token-BBBB-92ce"


def _assert_secret_absent(secret: str, *blobs: bytes | bytearray | str) -> None:
    for blob in blobs:
        data = blob.encode() if isinstance(blob, str) else bytes(blob)
        assert secret.encode() not in data
        assert secret.encode("utf-16-le") not in data


async def test_auth_with_the_same_token_works_and_the_secret_stays_off_the_wire(
    logs: list[dict[str, Any]],
) -> None:
    s = settings(auth_token=SECRET_A)
    async with tcp_pair(s) as (enc, lang), Recorder(enc.address) as rec:
        peer = await asyncio.wait_for(lang.connect(rec.address), 5)
        await transfer(enc, lang, peer, "auth-ok", 40)
        assert len(rec.up) > 0 and len(rec.down) > 0
        # the proofs travel, not the token
        hello = m.decode(FrameDecoder().feed(bytes(rec.up))[0])
        assert isinstance(hello, m.Hello) and len(hello.auth) == 32
        assert any(e["event"] == "peer connected" for e in logs)  # the logs were captured
        _assert_secret_absent(SECRET_A, rec.up, rec.down, repr(logs), repr(s), str(s))


@pytest.mark.parametrize(
    ("enc_token", "lang_token"),
    [(SECRET_A, SECRET_B), (SECRET_A, None), (None, SECRET_B)],
    ids=["wrong-token", "missing-on-language", "missing-on-encode"],
)
async def test_auth_failure_is_a_config_error_and_leaks_no_secret(
    enc_token: str | None, lang_token: str | None, logs: list[dict[str, Any]]
) -> None:
    async with (
        tcp_pair(settings(auth_token=enc_token), settings(auth_token=lang_token)) as (enc, lang),
        Recorder(enc.address) as rec,
    ):
        # the encode node without a token refuses a proof it cannot check, in its own words
        want = "authentication failed" if enc_token else "auth_token is not set"
        with raises_typed(et.ConfigError, match=want) as caught:
            await asyncio.wait_for(lang.connect(rec.address), 5)
        assert not lang.peers
        await poll_until(lambda: not enc.peers, 5, "no peer on the encode side")
        replies = [m.decode(b) for b in FrameDecoder().feed(bytes(rec.down))]
        assert isinstance(replies[0], m.Challenge)
        assert isinstance(replies[-1], m.Error) and replies[-1].kind == "config"
        assert not any(isinstance(r, m.HelloAck) for r in replies)
        assert any(e["event"] == "handshake refused" for e in logs)
        for secret in (enc_token, lang_token):
            if secret:
                _assert_secret_absent(secret, rec.up, rec.down, str(caught.value), repr(logs))


async def test_a_replayed_hello_is_refused() -> None:
    s = settings(auth_token=SECRET_A)
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as shadow:
        first, reply = await raw_client(enc.address, shadow._hello_fields(), token=SECRET_A)
        assert isinstance(reply, m.HelloAck), reply
        # the server proved it knows the token too, over the whole transcript
        hello = m.decode(FrameDecoder().feed(bytes(first.tx))[0])
        challenge = m.decode(FrameDecoder().feed(bytes(first.rx))[0])
        assert isinstance(hello, m.Hello) and isinstance(challenge, m.Challenge)
        assert reply.auth == proof(
            SECRET_A, b"emtransfer-server", challenge.nonce, transcript(hello), transcript(reply)
        )
        # an eavesdropper replays the first Hello on a new connection: a new nonce, refused
        second = await RawConn.open(enc.address)
        challenge2 = await second.recv()
        assert isinstance(challenge2, m.Challenge) and challenge2.nonce != challenge.nonce
        second.send_raw(bytes(first.tx))
        refused = await second.recv()
        assert isinstance(refused, m.Error) and "authentication failed" in refused.reason
        await second.closed_by_peer(5)
        # the first connection is untouched
        assert [p.node_id for p in enc.peers.values()] == ["raw-language"]
        _assert_secret_absent(SECRET_A, first.tx, first.rx, second.tx, second.rx)
        first.close()
        await poll_until(lambda: not enc.peers, 5, "the first raw client to be gone")


class Rewriter(Recorder):
    """A man in the middle that relays the proofs untouched but rewrites the transport metadata
    of the Hello (``up``) or the HelloAck (``down``) -- to point a node's writes elsewhere."""

    def __init__(self, target: str, direction: str, meta: bytes) -> None:
        super().__init__(target)
        self.direction, self.meta = direction, meta

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        r2, w2 = await asyncio.open_connection(host, int(port))
        self.tasks += [
            asyncio.create_task(self._rewrite(reader, w2, self.direction == "up")),
            asyncio.create_task(self._rewrite(r2, writer, self.direction == "down")),
        ]

    async def _rewrite(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, on: bool) -> None:
        dec = FrameDecoder()
        try:
            while data := await r.read(1 << 16):
                for body in dec.feed(data):
                    msg = m.decode(body)
                    if on and isinstance(msg, m.Hello | m.HelloAck):
                        msg = msgspec.structs.replace(msg, transport_meta=self.meta)
                    w.write(frame(msg))
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_a_relay_cannot_swap_the_transport_metadata(direction: str) -> None:
    """The proofs used to cover only the two nonces: a relay passed them on untouched and
    swapped the Hello's transport metadata (where the other side's writes go, and with tcp
    the data key) without anybody noticing. They cover the whole transcript now."""
    s = settings(auth_token=SECRET_A)
    async with (
        tcp_pair(s) as (enc, lang),
        et.LanguageNode(s) as attacker,
    ):
        async with Rewriter(enc.address, direction, attacker.transport.metadata()) as mitm:
            with raises_typed(et.ConfigError, match="authentication failed"):
                await asyncio.wait_for(lang.connect(mitm.address), 5)
            await poll_until(lambda: not enc.peers, 5, "no peer on the encode side")
            assert not lang.peers
        # without the relay, the same nodes connect
        peer = await asyncio.wait_for(lang.connect(enc.address), 5)
        assert peer.alive


@pytest.mark.parametrize("ack_auth", ["none", "wrong-key", "wrong-nonce", "other-ack"])
async def test_language_refuses_an_encode_server_that_cannot_prove_the_token(ack_auth: str) -> None:
    s = settings(auth_token=SECRET_A)
    async with RawServer() as raw, et.EncodeNode(settings()) as shadow, et.LanguageNode(s) as lang:
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        nonce = os.urandom(16)
        conn.send(m.Challenge(version=PROTOCOL_VERSION, nonce=nonce))
        hello = await conn.recv()
        assert isinstance(hello, m.Hello)
        # the client's proof is right (a real encode node would accept it) ...
        theirs = transcript(hello)
        assert hello.auth == proof(SECRET_A, b"emtransfer-client", nonce, theirs)
        ack = m.HelloAck(**{**shadow._hello_fields(), "node_id": "raw-encode"})
        # "other-ack": a relay's proof, right for the HelloAck it saw, sent with another one
        seen = msgspec.structs.replace(ack, transport_meta=b"the real server's metadata")
        auth = {
            "none": b"",
            "wrong-key": proof(SECRET_B, b"emtransfer-server", nonce, theirs, transcript(ack)),
            "wrong-nonce": proof(
                SECRET_A, b"emtransfer-server", os.urandom(16), theirs, transcript(ack)
            ),
            "other-ack": proof(SECRET_A, b"emtransfer-server", nonce, theirs, transcript(seen)),
        }[ack_auth]
        conn.send(msgspec.structs.replace(ack, auth=auth))
        with raises_typed(et.ConfigError, match="authentication failed"):
            await asyncio.wait_for(connecting, 5)
        await conn.closed_by_peer(5)
        assert not lang.peers
        _assert_secret_absent(SECRET_A, conn.rx)


# ------------------------------------------------------------------------------ heartbeats


async def test_an_idle_pair_stays_connected_over_several_heartbeat_timeouts() -> None:
    s = settings(**FAST_HB)
    async with tcp_pair(s) as (enc, lang):
        peer = await asyncio.wait_for(lang.connect(enc.address), 5)
        await poll_until(lambda: bool(enc.peers_named(lang.node_id)), 5, "encode side peer")
        enc_peer = enc.peers_named(lang.node_id)[0]
        seen = (peer.last_seen, enc_peer.last_seen)
        loop = asyncio.get_running_loop()
        end = loop.time() + 4 * s.heartbeat_timeout
        while loop.time() < end:  # watch, bounded: both stay connected the whole time
            assert peer.alive and enc_peer.alive
            assert lang.health()["peers"] == [enc.node_id]
            assert enc.health()["peers"] == [lang.node_id]
            await asyncio.sleep(0.02)
        # heartbeats flowed both ways (nothing else was sent)
        assert peer.last_seen > seen[0] and enc_peer.last_seen > seen[1]
        await transfer(enc, lang, peer, "after-idle", 50)
        await wait_pools_full(enc, lang)


async def _raw_round0(enc: et.EncodeNode, conn: RawConn, rid: str, n: int) -> asyncio.Task[Any]:
    """A raw client's Init for one block; the encode node writes round 0 and waits for a Resume."""
    send = asyncio.create_task(enc.send(rid, payload(n)))
    conn.send(m.Init(**grant(), rid=rid, blocks=[3], capacity_tokens=BLOCK))
    chunk = await conn.recv_until(lambda x: isinstance(x, m.ChunkDone))
    assert chunk.rid == rid and chunk.round == 0 and chunk.count == BLOCK and not chunk.is_last
    await poll_until(
        lambda: state_of(sender_session(enc, rid)) == "WAIT_RESUME", 5, "sender waits for Resume"
    )
    return send


async def test_a_silent_client_is_lost_within_the_heartbeat_timeout() -> None:
    s = settings(**FAST_HB)
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as shadow:
        trust_all(shadow.transport)  # the raw client grants nothing: its writes land as asked
        conn, reply = await raw_client(enc.address, shadow._hello_fields())
        assert isinstance(reply, m.HelloAck)
        send = await _raw_round0(enc, conn, "silent", 3 * BLOCK)
        loop = asyncio.get_running_loop()
        t0 = loop.time()  # the client's last message (its Init) was before this
        # from now on the client sends nothing (no heartbeats), but keeps the socket open
        limit = s.heartbeat_timeout + s.heartbeat_interval + 1.0
        took = await poll_until(lambda: not enc.peers_named("raw-language"), limit, "peer lost")
        assert took <= limit
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(send, 1)
        assert loop.time() - t0 >= 0.8 * s.heartbeat_timeout, "declared lost too early"
        await conn.closed_by_peer(5)  # the encode node hung up
        await wait_pools_full(enc)
        assert not enc.senders


async def test_a_silent_encode_server_is_lost_within_the_heartbeat_timeout() -> None:
    s = settings(**FAST_HB)
    async with RawServer() as raw, et.EncodeNode(s) as shadow, et.LanguageNode(s) as lang:
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        await serve_raw_handshake(conn, shadow._hello_fields())
        peer = await asyncio.wait_for(connecting, 5)
        receiving = asyncio.create_task(lang.receive("quiet", peer))
        init = await conn.recv_until(lambda x: isinstance(x, m.Init))
        assert init.rid == "quiet"
        limit = s.heartbeat_timeout + s.heartbeat_interval + 1.0
        await poll_until(lambda: not peer.alive, limit, "language declares the server lost")
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(receiving, 1)
        await wait_pools_full(lang)
        assert not lang.peers


# ----------------------------------------------------------------------- peer closes mid-way


async def test_language_side_closing_mid_transfer_fails_the_send_with_peer_lost() -> None:
    s = settings()
    async with tcp_pair(s) as (enc, lang), et.LanguageNode(s) as shadow:
        good_peer = await lang.connect(enc.address)
        good = asyncio.create_task(lang.receive("bystander", good_peer))
        trust_all(shadow.transport)  # the raw client grants nothing: its writes land as asked
        conn, reply = await raw_client(enc.address, shadow._hello_fields())
        assert isinstance(reply, m.HelloAck)
        send = await _raw_round0(enc, conn, "cut", 3 * BLOCK)
        conn.close()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(send, 5)
        assert loop.time() - t0 < 1.0, "not prompt"
        assert not enc.peers_named("raw-language") and "cut" not in enc.senders
        # the other connection is unaffected
        data = payload(30, seed=4)
        await enc.send("bystander", data)
        got = await asyncio.wait_for(good, 5)
        assert torch.equal(got.tensors["embeddings"], data["embeddings"])
        await wait_pools_full(enc, lang)


async def test_encode_side_closing_mid_transfer_fails_the_receive_with_peer_lost() -> None:
    s = settings()
    async with RawServer() as raw, et.EncodeNode(s) as shadow, et.LanguageNode(s) as lang:
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        await serve_raw_handshake(conn, shadow._hello_fields())
        peer = await asyncio.wait_for(connecting, 5)
        receiving = asyncio.create_task(lang.receive("cut", peer))
        await conn.recv_until(lambda x: isinstance(x, m.Init))
        assert lang.allocator.num_free < lang.allocator.num_blocks  # the receiver holds blocks
        conn.close()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(receiving, 5)
        assert loop.time() - t0 < 1.0, "not prompt"
        await wait_pools_full(lang)
        assert not lang.peers and not peer.sessions


# ------------------------------------------------------------------------------- reconnect


@pytest.mark.parametrize("by", ["address", "stale-peer"])
async def test_reconnect_to_a_restarted_encode_node_on_the_same_port(by: str) -> None:
    port = free_port()
    s = settings(bootstrap_port=port)
    async with et.LanguageNode(s) as lang:
        async with et.EncodeNode(s, control="tcp") as enc1:
            address = enc1.address
            assert address == f"127.0.0.1:{port}"
            old = await asyncio.wait_for(lang.connect(address), 5)
            await transfer(enc1, lang, old, "before", 20)
        await poll_until(lambda: not old.alive and not lang.peers, 5, "language sees the restart")
        async with et.EncodeNode(s, control="tcp") as enc2:
            assert enc2.address == address
            data = payload(200, seed=9)
            send = asyncio.create_task(enc2.send("after", data))
            target = address if by == "address" else old
            got = await asyncio.wait_for(lang.receive("after", target), 10)
            await asyncio.wait_for(send, 5)
            assert torch.equal(got.tensors["embeddings"], data["embeddings"])
            [new] = lang.peers.values()
            assert new is not old and new.node_id == enc2.node_id and new.address == address
            assert [p.node_id for p in enc2.peers.values()] == [lang.node_id]
            await wait_pools_full(enc2, lang)


# ----------------------------------------------------------------------- bootstrap timeouts


async def test_a_server_that_never_sends_a_challenge_times_out_with_peer_lost() -> None:
    s = settings(bootstrap_timeout=0.3)
    async with RawServer() as raw, et.LanguageNode(s) as lang:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        with raises_typed(et.PeerLost, match="bootstrap_timeout"):
            await asyncio.wait_for(connecting, 5)
        assert loop.time() - t0 < s.bootstrap_timeout + 1.0
        await conn.closed_by_peer(5)
        assert not lang.peers


async def test_a_server_that_never_acks_the_hello_times_out_with_peer_lost() -> None:
    s = settings(bootstrap_timeout=0.3)
    async with RawServer() as raw, et.LanguageNode(s) as lang:
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        conn.send(m.Challenge(version=PROTOCOL_VERSION, nonce=os.urandom(16)))
        assert isinstance(await conn.recv(), m.Hello)
        with raises_typed(et.PeerLost, match="bootstrap_timeout"):
            await asyncio.wait_for(connecting, 5)
        await conn.closed_by_peer(5)
        assert not lang.peers


async def test_a_client_that_never_says_hello_is_dropped_after_the_bootstrap_timeout() -> None:
    s = settings(bootstrap_timeout=0.3)
    async with et.EncodeNode(s, control="tcp") as enc:
        conn = await RawConn.open(enc.address)
        assert isinstance(await conn.recv(), m.Challenge)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rest = await conn.closed_by_peer(s.bootstrap_timeout + 2)
        assert loop.time() - t0 < s.bootstrap_timeout + 1.0
        assert rest and isinstance(rest[-1], m.Error) and "bootstrap" in rest[-1].reason
        assert not enc.peers


async def test_connect_to_a_closed_port_fails_with_peer_lost_within_the_bootstrap_timeout() -> None:
    s = settings(bootstrap_timeout=0.5)
    port = free_port()
    async with et.LanguageNode(s) as lang:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with raises_typed(et.PeerLost, match=str(port)):
            await asyncio.wait_for(lang.connect(f"127.0.0.1:{port}"), 5)
        assert loop.time() - t0 < s.bootstrap_timeout + 0.5
        assert not lang.peers
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(lang.receive("nowhere", f"127.0.0.1:{port}"), 5)
        assert pool_full(lang) and not lang.peers
