"""Hostile input on the TCP control connection, both directions.

A raw language-side client (after a valid handshake) sends an EncodeNode messages it must refuse;
each refusal is answered on the wire (Error or Abort) and logged, while a legitimate request of a
normal LanguageNode on another connection completes and the encode node's pool ends full. In the
other direction a raw encode-side server feeds a receiving LanguageNode bad ChunkDones.

The raw peers and small helpers are shared with test_control.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from helpers_runtime import (
    grant,
    language_node,
    raises_typed,
    sender_session,
    state_of,
    states_seen,
    wait_until,
)
from log_capture import capture_logs
from test_control import (
    BLOCK,
    RawConn,
    RawServer,
    payload,
    poll_until,
    pool_full,
    raw_client,
    serve_raw_handshake,
    settings,
    wait_pools_full,
)
from transport_harness import trust_all

import emtransfer as et
from emtransfer.protocol import messages as m
from emtransfer.protocol.framing import HEADER, MAX_FRAME, frame

RAW = "raw-language"


@pytest.fixture
def logs() -> Iterator[list[Any]]:
    """Every log event (debug and up) of nodes built inside the test."""
    with capture_logs() as cap:
        yield cap


@dataclass
class Arena:
    enc: et.EncodeNode
    lang: et.LanguageNode
    peer: et.Peer
    good: asyncio.Task[et.Received]
    conn: RawConn
    shadow: et.LanguageNode

    @property
    def raw_peer(self) -> et.Peer:
        return self.enc.peers_named(RAW)[0]


@asynccontextmanager
async def arena(**kw: Any) -> AsyncIterator[Arena]:
    """An encode node on TCP with a legitimate request ``good`` of a normal language node waiting
    for its data, and a raw client (handshake done) ready to misbehave. At the end ``good``
    must complete intact and the encode node's pool be full."""
    s = settings(**kw)
    async with (
        et.EncodeNode(s, control="tcp") as enc,
        et.LanguageNode(s) as lang,
        et.LanguageNode(s) as shadow,  # lends the raw client a real transport endpoint
    ):
        trust_all(
            shadow.transport
        )  # the raw client grants nothing: let the writes it asks for land
        peer = await asyncio.wait_for(lang.connect(enc.address), 5)
        good = asyncio.create_task(lang.receive("good", peer))
        await poll_until(
            lambda: state_of(sender_session(enc, "good")) == "WAIT_DATA", 5, "good's Init"
        )
        conn, reply = await raw_client(enc.address, shadow._hello_fields(), node_id=RAW)
        assert isinstance(reply, m.HelloAck), reply
        await poll_until(lambda: bool(enc.peers_named(RAW)), 5, "raw peer registered")
        a = Arena(enc, lang, peer, good, conn, shadow)
        try:
            yield a
        except BaseException:
            good.cancel()  # the test failed: do not leave an unretrieved error behind
            raise
        data = payload(300, seed=42)  # three rounds of the default allocation
        await asyncio.wait_for(enc.send("good", data), 5)
        got = await asyncio.wait_for(good, 5)
        assert torch.equal(got.tensors["embeddings"], data["embeddings"])
        assert peer.alive and bool(enc.peers_named(lang.node_id))
        conn.close()
        await wait_pools_full(enc, lang)
        await poll_until(lambda: not enc.senders, 5, "every sender session to end")


def logged(logs: list[dict[str, Any]], *needles: str) -> bool:
    """Some event (info or louder) mentions every needle."""
    return any(
        e.get("log_level") in ("info", "warning", "error", "critical")
        and all(n in repr(e) for n in needles)
        for e in logs
    )


async def probe(conn: RawConn, name: str) -> list[m.AnyMessage]:
    """Send a message whose answer is known (Abort for a Resume of an unknown rid) and return
    everything the node sent before that answer: the node handles messages in order, so any
    reply to what came before is in that list."""
    conn.send(
        m.Resume(**grant(), rid=name, round=1, blocks=[0], capacity_tokens=BLOCK, received_tokens=1)
    )
    before: list[m.AnyMessage] = []
    while True:
        msg = await conn.recv()
        if isinstance(msg, m.Abort) and msg.rid == name:
            return before
        before.append(msg)


async def raw_round0(a: Arena, rid: str, n: int = 3 * BLOCK) -> asyncio.Task[Any]:
    """The raw client receives round 0 of ``rid`` into one block; the sender waits for Resume."""
    send = asyncio.create_task(a.enc.send(rid, payload(n, seed=3)))
    a.conn.send(m.Init(**grant(), rid=rid, blocks=[3], capacity_tokens=BLOCK))
    chunk = await a.conn.recv_until(lambda x: isinstance(x, m.ChunkDone) and x.rid == rid)
    assert chunk.round == 0 and chunk.count == BLOCK and not chunk.is_last
    await poll_until(lambda: state_of(sender_session(a.enc, rid)) == "WAIT_RESUME", 5, "resume")
    return send


# -------------------------------------------------------------- bad requests, stream intact


BAD_INITS: dict[str, tuple[dict[str, Any], str]] = {
    "outside-pool": ({"blocks": [2, 16], "capacity_tokens": 2 * BLOCK}, "outside"),
    "far-outside-pool": ({"blocks": [2**31], "capacity_tokens": BLOCK}, "outside"),
    "duplicate-blocks": ({"blocks": [4, 5, 4], "capacity_tokens": 3 * BLOCK}, "duplicate"),
    "capacity-over-blocks": ({"blocks": [4, 5], "capacity_tokens": 2 * BLOCK + 1}, "capacity"),
}


@pytest.mark.parametrize("data_first", [False, True], ids=["init-first", "data-first"])
@pytest.mark.parametrize("case", list(BAD_INITS))
async def test_bad_init_is_refused_with_an_abort(
    case: str, data_first: bool, logs: list[dict[str, Any]]
) -> None:
    fields, why = BAD_INITS[case]
    rid = f"bad-init-{case}"
    async with arena() as a:
        before = a.shadow.registry.pools["embeddings"].clone()
        send = None
        if data_first:
            send = asyncio.create_task(a.enc.send(rid, payload(20)))
            await poll_until(lambda: state_of(sender_session(a.enc, rid)) == "WAIT_INIT", 5, rid)
        a.conn.send(m.Init(**grant(), rid=rid, **fields))
        abort = await a.conn.recv_until(lambda x: isinstance(x, m.Abort))
        assert abort.rid == rid and why in abort.reason, abort
        if send is not None:
            with raises_typed(et.ProtocolError, match=why):
                await asyncio.wait_for(send, 5)
        await poll_until(lambda: rid not in a.enc.senders, 5, "the session to end")
        assert logged(logs, rid, why)
        # nothing was written into the raw client's pool, and its connection is still up
        assert torch.equal(a.shadow.registry.pools["embeddings"], before)
        assert await probe(a.conn, "probe") == []
        assert a.raw_peer.alive


async def test_resume_for_an_unknown_rid_is_refused(logs: list[dict[str, Any]]) -> None:
    async with arena() as a:
        a.conn.send(
            m.Resume(
                **grant(),
                rid="ghost",
                round=1,
                blocks=[1],
                capacity_tokens=BLOCK,
                received_tokens=BLOCK,
            )
        )
        abort = await a.conn.recv_until(lambda x: isinstance(x, m.Abort))
        assert abort.rid == "ghost" and "unknown rid" in abort.reason
        assert logged(logs, "ghost", "unknown rid")
        assert "ghost" not in a.enc.senders and a.raw_peer.alive


async def test_a_replayed_resume_fails_only_that_request(logs: list[dict[str, Any]]) -> None:
    async with arena() as a:
        send = await raw_round0(a, "replay")
        resume = frame(
            m.Resume(
                **grant(),
                rid="replay",
                round=1,
                blocks=[4],
                capacity_tokens=BLOCK,
                received_tokens=BLOCK,
            )
        )
        a.conn.send_raw(resume + resume)  # the same round twice, back to back
        abort = await a.conn.recv_until(lambda x: isinstance(x, m.Abort))
        assert abort.rid == "replay" and "protocol error" in abort.reason, abort
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(send, 5)
        assert logged(logs, "replay")
        await poll_until(lambda: "replay" not in a.enc.senders, 5, "the session to end")
        assert a.raw_peer.alive and await probe(a.conn, "probe") == []


@pytest.mark.parametrize("owner", ["connection", "node-id"])
async def test_hostile_messages_naming_another_connections_rid_do_not_touch_it(
    owner: str, logs: list[dict[str, Any]]
) -> None:
    async with arena() as a:
        mine = a.enc.peers_named(a.lang.node_id)[0]
        data = payload(40, seed=8)
        held_for: et.Peer | str = mine if owner == "connection" else a.lang.node_id
        send = asyncio.create_task(a.enc.send("owned", data, peer=held_for))
        await poll_until(
            lambda: state_of(sender_session(a.enc, "owned")) == "WAIT_INIT", 5, "the offer"
        )
        offer = sender_session(a.enc, "owned")
        before = a.shadow.registry.pools["embeddings"].clone()
        # the hostile connection claims the payload held for the other one: refused at once
        init = m.Init(**grant(), rid="owned", blocks=[1], capacity_tokens=BLOCK, session="hijack")
        a.conn.send(init)
        abort = await a.conn.recv_until(lambda x: isinstance(x, m.Abort))
        assert abort.rid == "owned" and "held here for another peer" in abort.reason, abort
        assert abort.session == "hijack"
        assert logged(logs, "owned", "held here for another peer")
        # its Resume and Abort for that rid (and for the Init-first rid of the other
        # connection) and a schema-invalid Init naming it are answered, and touch nothing
        for rid in ("owned", "good"):
            a.conn.send(
                m.Resume(
                    **grant(),
                    rid=rid,
                    round=1,
                    blocks=[1],
                    capacity_tokens=BLOCK,
                    received_tokens=BLOCK,
                )
            )
            a.conn.send(m.Abort(rid=rid, reason="hijack"))
        a.conn.send(m.Init(**grant(), rid="owned", blocks=[], capacity_tokens=0))  # schema-invalid
        replies = await probe(a.conn, "probe")
        assert {type(r) for r in replies} <= {m.Abort, m.AbortAck, m.Error}
        assert replies, "the hostile messages went unanswered"
        # the owner's request is untouched: still waiting for its owner's Init, bound to no one
        assert sender_session(a.enc, "owned") is offer
        assert state_of(offer) == "WAIT_INIT" and offer.peer is None and not send.done()
        assert "owned" not in a.raw_peer.sessions and a.raw_peer.alive
        assert state_of(sender_session(a.enc, "good")) == "WAIT_DATA"
        assert sender_session(a.enc, "good").peer is mine
        # nothing was written into the hostile connection's pool
        assert torch.equal(a.shadow.registry.pools["embeddings"], before)
        # the rightful receiver gets the payload, intact
        got = await asyncio.wait_for(a.lang.receive("owned", a.peer), 5)
        await asyncio.wait_for(send, 5)
        assert torch.equal(got.tensors["embeddings"], data["embeddings"])


async def test_a_second_connection_claiming_a_node_id_does_not_replace_the_first() -> None:
    async with arena() as a:
        mine = a.enc.peers_named(a.lang.node_id)[0]
        impostor, reply = await raw_client(
            a.enc.address, a.shadow._hello_fields(), node_id=a.lang.node_id
        )
        assert isinstance(reply, m.HelloAck), reply
        await poll_until(lambda: len(a.enc.peers_named(a.lang.node_id)) == 2, 5, "both listed")
        # two connections, two peers: the first one is still there, with its request
        assert mine.alive and mine in a.enc.peers_named(a.lang.node_id)
        assert sender_session(a.enc, "good").peer is mine
        assert len({p.transport_id for p in a.enc.peers_named(a.lang.node_id)}) == 2
        # a payload held for the first connection is refused to the impostor
        data = payload(20, seed=9)
        send = asyncio.create_task(a.enc.send("mine", data, peer=mine))
        await poll_until(lambda: state_of(sender_session(a.enc, "mine")) == "WAIT_INIT", 5, "offer")
        impostor.send(m.Init(**grant(), rid="mine", blocks=[2], capacity_tokens=BLOCK))
        abort = await impostor.recv_until(lambda x: isinstance(x, m.Abort))
        assert abort.rid == "mine" and "held here for another peer" in abort.reason
        got = await asyncio.wait_for(a.lang.receive("mine", a.peer), 5)
        await asyncio.wait_for(send, 5)
        assert torch.equal(got.tensors["embeddings"], data["embeddings"])
        # the impostor leaving takes only its own connection
        impostor.close()
        await poll_until(lambda: len(a.enc.peers_named(a.lang.node_id)) == 1, 5, "impostor gone")
        assert a.enc.peers_named(a.lang.node_id) == [mine] and mine.alive


@pytest.mark.parametrize("kind", ["chunk_done", "second-hello"])
async def test_a_message_in_the_wrong_direction_is_refused(
    kind: str, logs: list[dict[str, Any]]
) -> None:
    # BUG: EncodeNode._on_message raises ProtocolError("unexpected ChunkDone from a language
    # node") and Node._read only logs it ("refused message"): nothing is sent back, so the peer
    # never learns its message was refused (unlike an unknown rid, answered with Abort, or an
    # invalid message, answered with Error). Fix: in Node._read, when _on_message raises a
    # TransferError for a message that is not itself an Error, also send
    # m.Error(reason=m.reason(f"refused {type(msg).__name__}: {exc}")) (never answer an Error
    # with an Error, or two nodes could ping-pong). LanguageNode has the same gap (a ChunkDone
    # for an unknown rid or an Init sent to it is only logged).
    async with arena() as a:
        if kind == "chunk_done":
            bad: m.Message = m.ChunkDone(
                rid="wrong-way", round=0, start=0, count=1, total_tokens=1, is_last=True
            )
        else:
            bad = m.Hello(**{**a.shadow._hello_fields(), "node_id": RAW})
        a.conn.send(bad)
        replies = await probe(a.conn, "probe")
        assert logged(logs, type(bad).__name__)
        assert a.raw_peer.alive
        assert any(isinstance(r, m.Error | m.Abort) for r in replies), (
            f"{type(bad).__name__} was refused silently: {replies}"
        )


def _invalid_bodies() -> dict[str, bytes]:
    import msgspec

    enc = msgspec.msgpack.encode
    return {
        "negative-capacity": m.encode(m.Init(**grant(), rid="inv", blocks=[1], capacity_tokens=-1)),
        "empty-rid": m.encode(m.Init(**grant(), rid="", blocks=[1], capacity_tokens=BLOCK)),
        "no-blocks": m.encode(m.Init(**grant(), rid="inv", blocks=[], capacity_tokens=BLOCK)),
        "negative-block": m.encode(
            m.Init(**grant(), rid="inv", blocks=[-1], capacity_tokens=BLOCK)
        ),
        "resume-round-0": m.encode(
            m.Resume(
                **grant(), rid="inv", round=0, blocks=[1], capacity_tokens=BLOCK, received_tokens=1
            )
        ),
        "rid-too-long": m.encode(m.Abort(rid="r" * 257)),
        "unknown-field": enc(
            {"type": "init", "rid": "inv", "blocks": [1], "capacity_tokens": 16, "evil": 1}
        ),
        "unknown-type": enc({"type": "format_disk", "rid": "inv"}),
        "not-a-map": enc([1, 2, 3]),
        "not-msgpack": b"\xc1\xc1\xc1\xc1",
        "negative-seq": m.encode(m.Heartbeat(seq=-1)),
        "bool-for-int": enc(
            {"type": "init", "rid": "inv", "blocks": [True], "capacity_tokens": 16}
        ),
    }


@pytest.mark.parametrize("case", list(_invalid_bodies()))
async def test_a_schema_invalid_message_is_refused_and_the_stream_goes_on(
    case: str, logs: list[dict[str, Any]]
) -> None:
    async with arena() as a:
        body = _invalid_bodies()[case]
        a.conn.send_raw(HEADER.pack(len(body)) + body)
        err = await a.conn.recv_until(lambda x: isinstance(x, m.Error | m.Abort))
        assert isinstance(err, m.Error) and "refused" in err.reason, err
        assert logged(logs, "invalid message")
        # the connection is still up and the next valid message is processed: a full request
        send = asyncio.create_task(a.enc.send("next", payload(10, seed=5)))
        a.conn.send(m.Init(**grant(), rid="next", blocks=[6], capacity_tokens=BLOCK))
        done = await a.conn.recv_until(lambda x: isinstance(x, m.ChunkDone))
        assert done.rid == "next" and done.is_last and done.count == 10
        await asyncio.wait_for(send, 5)
        assert a.raw_peer.alive


async def test_an_invalid_message_naming_an_in_flight_rid_fails_that_request() -> None:
    async with arena() as a:
        send = await raw_round0(a, "victim")
        bad = m.encode(
            m.Resume(
                **grant(),
                rid="victim",
                round=0,
                blocks=[1],
                capacity_tokens=BLOCK,
                received_tokens=BLOCK,
            )
        )
        a.conn.send_raw(HEADER.pack(len(bad)) + bad)
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(send, 5)
        replies = await probe(a.conn, "probe")
        assert any(isinstance(r, m.Error) for r in replies)
        assert any(isinstance(r, m.Abort) and r.rid == "victim" for r in replies)
        assert a.raw_peer.alive


async def test_a_client_lying_about_its_pool_size_cannot_write_outside_it() -> None:
    s = settings()
    async with arena() as a:
        liar, reply = await raw_client(
            a.enc.address, a.shadow._hello_fields(), node_id="liar", num_blocks=1 << 20
        )
        assert isinstance(reply, m.HelloAck)
        before = a.shadow.registry.pools["embeddings"].clone()
        send = asyncio.create_task(a.enc.send("lie", payload(10)))
        liar.send(m.Init(**grant(), rid="lie", blocks=[s.num_blocks + 1000], capacity_tokens=BLOCK))
        with raises_typed(et.TransferError):
            await asyncio.wait_for(send, 5)
        abort = await liar.recv_until(lambda x: isinstance(x, m.Abort))
        assert abort.rid == "lie"
        assert torch.equal(a.shadow.registry.pools["embeddings"], before)
        liar.close()
        await poll_until(lambda: not a.enc.peers_named("liar"), 5, "liar gone")


async def test_a_flood_of_inits_is_bounded_per_peer() -> None:
    # BUG: EncodeNode._on_init creates a SenderSession (a task, a queue, a data_timeout of 60 s)
    # for every Init of an unknown rid, with no limit: max_inflight_per_peer is enforced only
    # by the language node on itself (Peer.inflight in LanguageNode.receive), so one client can
    # make the encode node hold any number of sessions (docs/design.md, Runtime:
    # "max_inflight_per_peer bounds the requests in flight per connection"). Here 12 Inits with max_inflight_per_peer=4 all
    # create sessions and none is refused. Fix: in _on_init, when len(peer.sessions) >=
    # settings.max_inflight_per_peer and the Init would create or bind a session, answer
    # Abort(rid, "too many requests in flight") and log it instead of binding the session.
    limit = 4
    async with arena(max_inflight_per_peer=limit) as a:
        for i in range(3 * limit):
            a.conn.send(m.Init(**grant(), rid=f"flood-{i}", blocks=[i % 16], capacity_tokens=BLOCK))
        replies = await probe(a.conn, "probe")
        refused = {r.rid for r in replies if isinstance(r, m.Abort)}
        held = [rid for rid in a.raw_peer.sessions if rid.startswith("flood-")]
        assert len(held) <= limit, f"{len(held)} sessions held for one peer (limit {limit})"
        assert len(refused) == 3 * limit - len(held)


# ----------------------------------------------------------- a broken stream: only it dropped


BROKEN_STREAMS = {
    "oversize-length": HEADER.pack(MAX_FRAME + 1) + b"\0" * 64,
    "max-length": b"\xff\xff\xff\xff",
    "zero-length": HEADER.pack(0) + frame(m.Heartbeat()),
    "http-garbage": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "tls-hello": bytes.fromhex("160301020001") + b"\xaa" * 200,
}


@pytest.mark.parametrize("case", list(BROKEN_STREAMS))
async def test_a_broken_stream_drops_that_connection_only(
    case: str, logs: list[dict[str, Any]]
) -> None:
    async with arena() as a:
        send = await raw_round0(a, "victim")
        a.conn.send_raw(BROKEN_STREAMS[case])
        await a.conn.closed_by_peer(5)
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(send, 5)
        await poll_until(lambda: not a.enc.peers_named(RAW), 5, "raw peer dropped")
        assert logged(logs, "frame length")
        assert "victim" not in a.enc.senders
        assert a.peer.alive and bool(a.enc.peers_named(a.lang.node_id))


async def test_a_truncated_frame_then_close_leaks_nothing() -> None:
    async with arena() as a:
        send = await raw_round0(a, "victim")
        whole = frame(
            m.Resume(
                **grant(),
                rid="victim",
                round=1,
                blocks=[4],
                capacity_tokens=BLOCK,
                received_tokens=BLOCK,
            )
        )
        a.conn.send_raw(whole[:-3])
        await probe_nothing_happened(a)
        a.conn.close()
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(send, 5)
        await poll_until(lambda: not a.enc.peers_named(RAW), 5, "raw peer dropped")
        assert "victim" not in a.enc.senders
        await wait_pools_full(a.enc)


async def probe_nothing_happened(a: Arena) -> None:
    """The truncated Resume must not have been acted on: the sender still waits for it."""
    for _ in range(50):
        await asyncio.sleep(0)
    assert state_of(sender_session(a.enc, "victim")) == "WAIT_RESUME"


# --------------------------------------------------------------------- hostile handshakes


@pytest.mark.parametrize(
    "meta", [b"local-no-such-node", b"\xff\xfe\x00"], ids=["unknown", "not-utf8"]
)
async def test_a_hello_with_bad_transport_metadata_is_refused_before_the_ack(meta: bytes) -> None:
    # BUG: Node._serve_handshake sends HelloAck *before* _add_peer hands the client's
    # transport_meta to transport.add_peer. With an unknown endpoint the client first gets a
    # HelloAck (it believes it is connected), then an Error, then the close. With metadata the
    # transport cannot even parse (here non-UTF-8: LocalTransport.add_peer raises
    # UnicodeDecodeError, not a TransferError) the exception escapes _serve_handshake and
    # EncodeNode.accept; asyncio logs "Unhandled exception in client_connected_cb" and drops
    # the socket: the client got a HelloAck and then a bare close, with no Error saying why.
    # Fix: call transport.add_peer (or all of _add_peer) before sending HelloAck, and treat any
    # exception from it as a refused handshake (wrap non-TransferError into ConfigError/
    # ProtocolError) so that Error is sent and the channel closed.
    s = settings()
    async with et.EncodeNode(s, control="tcp") as enc, et.LanguageNode(s) as shadow:
        conn, reply = await raw_client(enc.address, shadow._hello_fields(), transport_meta=meta)
        rest = await conn.closed_by_peer(5) if not conn.eof else []
        assert isinstance(reply, m.Error), f"first reply {type(reply).__name__}, then {rest}"
        assert not enc.peers
        # the encode node still serves a good client
        async with et.LanguageNode(s) as lang:
            peer = await asyncio.wait_for(lang.connect(enc.address), 5)
            data = payload(20, seed=1)
            sending = asyncio.create_task(enc.send("ok", data))
            got = await asyncio.wait_for(lang.receive("ok", peer), 5)
            await sending
            assert torch.equal(got.tensors["embeddings"], data["embeddings"])
            await wait_pools_full(enc, lang)


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        HEADER.pack(3) + b"\xc1\xc1\xc1",
        frame(m.Heartbeat()),
        frame(m.Init(**grant(), rid="early", blocks=[0], capacity_tokens=BLOCK)),
    ],
    ids=["garbage", "undecodable", "heartbeat", "init-before-hello"],
)
async def test_anything_but_a_hello_first_is_refused_and_closed(first: bytes) -> None:
    s = settings()
    async with et.EncodeNode(s, control="tcp") as enc:
        conn = await RawConn.open(enc.address)
        assert isinstance(await conn.recv(), m.Challenge)
        conn.send_raw(first)
        rest = await conn.closed_by_peer(5)
        assert rest and isinstance(rest[-1], m.Error), rest
        assert not enc.peers and not enc.senders and pool_full(enc)


# ---------------------------------------------------------- the reverse: a hostile encoder


@dataclass
class Reverse:
    lang: et.LanguageNode
    peer: et.Peer
    conn: RawConn
    inits: dict[str, m.Init]


@asynccontextmanager
async def hostile_encoder(*, nixl_like: bool = False, **kw: Any) -> AsyncIterator[Reverse]:
    """A LanguageNode connected to a raw encode-side server. ``nixl_like``: the language node's
    transport declares NIXL's guarantees (no fence, no stop on removal), not the local ones."""
    s = settings(**kw)
    receiver = language_node(s) if nixl_like else et.LanguageNode(s)
    async with RawServer() as raw, et.EncodeNode(s) as shadow, receiver as lang:
        connecting = asyncio.create_task(lang.connect(raw.address))
        conn = await raw.accept()
        await serve_raw_handshake(conn, shadow._hello_fields())
        peer = await asyncio.wait_for(connecting, 5)
        yield Reverse(lang, peer, conn, {})


async def _collect_inits(r: Reverse, *rids: str) -> None:
    while not all(rid in r.inits for rid in rids):
        init = await r.conn.recv_until(lambda x: isinstance(x, m.Init))
        r.inits[init.rid] = init


async def _complete_good(r: Reverse, good: asyncio.Task[et.Received]) -> None:
    """A valid ChunkDone for ``good`` (no bytes move; the protocol is what is checked)."""
    r.conn.send(
        m.ChunkDone(
            rid="good", round=0, start=0, count=10, total_tokens=10, is_last=True, meta={"k": 1}
        )
    )
    got = await asyncio.wait_for(good, 5)
    assert got.num_tokens == 10 and got.meta == {"k": 1}
    assert got.tensors["embeddings"].shape == (10, 64)


#: short grants and a short wait for the AbortAck, so every way out of a quarantine comes soon:
#: the teardown abort_ack_timeout after giving up, the grant's expiry chunk_timeout +
#: write_timeout + a margin after the grant was sent
QUICK = {"chunk_timeout": 0.5, "write_timeout": 0.3, "abort_ack_timeout": 0.3}


@pytest.mark.parametrize("release", ["fence", "abort_ack", "close", "no-ack"])
@pytest.mark.parametrize("violation", ["count-past-allocation", "wrong-round", "start-gap"])
async def test_a_bad_chunk_done_fails_the_request_and_quarantines_its_blocks(
    violation: str, release: str, logs: list[dict[str, Any]]
) -> None:
    """``fence``: on the local transport (it fences a tag) the blocks come back at once, with
    neither an AbortAck nor a teardown. The others on NIXL's guarantees: ``abort_ack``, held
    until the encoder's AbortAck; ``close``, the encoder hangs up, held until the grant's
    expiry; ``no-ack``, the encoder stays silent, torn down after abort_ack_timeout and held
    until the grant's expiry."""
    kw: dict[str, Any] = {**QUICK, "abort_ack_timeout": 3.0} if release == "abort_ack" else QUICK
    async with hostile_encoder(nixl_like=release != "fence", **kw) as r:
        loop = asyncio.get_running_loop()
        alloc = r.lang.allocator
        bad = asyncio.create_task(r.lang.receive("bad", r.peer))
        good = asyncio.create_task(r.lang.receive("good", r.peer))
        await _collect_inits(r, "bad", "good")
        session = r.peer.sessions["bad"]
        expiry = session.grant_expiry()
        cap = r.inits["bad"].capacity_tokens
        held = len(r.inits["bad"].blocks)
        chunk: dict[str, Any] = {
            "count-past-allocation": {
                "round": 0,
                "start": 0,
                "count": cap + 1,
                "total_tokens": cap + 1,
                "is_last": True,
            },
            "wrong-round": {"round": 1, "start": 0, "count": 5, "total_tokens": 5, "is_last": True},
            "start-gap": {"round": 0, "start": 3, "count": 5, "total_tokens": 8, "is_last": True},
        }[violation]
        r.conn.send(m.ChunkDone(rid="bad", **chunk))
        with raises_typed(et.ProtocolError):
            await asyncio.wait_for(bad, 5)
        abort = await r.conn.recv_until(lambda x: isinstance(x, m.Abort))
        # the Abort names the broken rule (and the attempt)
        why = {
            "count-past-allocation": "exceeds the allocation",
            "wrong-round": "ChunkDone for round 1, expected round 0",
            "start-gap": "starts at token 3",
        }[violation]
        assert abort.rid == "bad" and why in abort.reason, abort
        assert abort.session == r.inits["bad"].session
        assert logged(logs, "bad")
        assert "QUARANTINED" in states_seen(session)
        assert "bad" not in r.peer.sessions  # the rid is free for a retry at once
        if release == "fence":
            # fenced: released without an ack, and the connection stays up
            await poll_until(
                lambda: alloc.num_quarantined == 0 and "bad" not in alloc.leak_report(),
                0.5 * kw["abort_ack_timeout"],
                "the fenced blocks back",
            )
            assert state_of(session) == "FAILED" and not r.peer.lingering
            await _complete_good(r, good)
            assert r.peer.alive and not r.peer.sessions
            await wait_pools_full(r.lang)
            return
        # a write may still land in its blocks: they stay out of circulation
        assert state_of(session) == "QUARANTINED" and alloc.num_quarantined == held
        assert r.peer.lingering == {session.session_tag: session}
        await _complete_good(r, good)
        assert alloc.num_quarantined == held  # still: no ack, peer still there
        if release == "abort_ack":
            r.conn.send(m.AbortAck(rid="bad", session=abort.session))
            await wait_pools_full(r.lang)
            assert r.peer.alive and state_of(session) == "FAILED"
            assert "EXPIRING" not in states_seen(session)
        else:
            if release == "close":
                r.conn.close()
            else:  # no ack: the language node hangs up after abort_ack_timeout
                await r.conn.closed_by_peer(5)
            await poll_until(lambda: not r.lang.peers and not r.peer.alive, 5, "peer lost")
            # no proof that nothing lands: held until the grant's expiry
            assert loop.time() < expiry
            assert state_of(session) == "EXPIRING" and alloc.num_quarantined == held
            await wait_until(lambda: alloc.num_quarantined == 0, expiry - loop.time() + 2)
            assert loop.time() >= expiry - 0.01, "released before the grant expired"
            await wait_pools_full(r.lang)
            assert state_of(session) == "FAILED"
        assert not r.peer.sessions and not r.peer.lingering


async def test_a_chunk_done_for_an_unknown_rid_touches_nothing(logs: list[dict[str, Any]]) -> None:
    async with hostile_encoder() as r:
        good = asyncio.create_task(r.lang.receive("good", r.peer))
        await _collect_inits(r, "good")
        for rid in ("ghost", "good2"):
            r.conn.send(
                m.ChunkDone(rid=rid, round=0, start=0, count=1, total_tokens=1, is_last=True)
            )
        r.conn.send(m.AbortAck(rid="ghost"))
        r.conn.send(m.Abort(rid="ghost", reason="?"))
        await _complete_good(r, good)
        assert logged(logs, "ghost")
        assert r.peer.alive and not r.peer.sessions
        r.conn.close()
        await poll_until(lambda: not r.lang.peers, 5, "peer lost")
        await wait_pools_full(r.lang)


async def test_an_oversize_frame_from_the_encoder_drops_it_and_frees_everything() -> None:
    async with hostile_encoder() as r:
        waiting = asyncio.create_task(r.lang.receive("w", r.peer))
        await _collect_inits(r, "w")
        r.conn.send_raw(HEADER.pack(MAX_FRAME + 1))
        await r.conn.closed_by_peer(5)
        with raises_typed(et.PeerLost):
            await asyncio.wait_for(waiting, 5)
        await wait_pools_full(r.lang)
        assert not r.lang.peers
