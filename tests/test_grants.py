"""Data-plane authorization: a receiving pool lands bytes only inside the blocks it granted to
that peer under that tag, until the grant ends; an encode node, which grants nothing, lands
nothing at all. The arithmetic of a grant (property-tested), each engine that declares
``authorizes_writes`` (tcp frames from a raw socket, the in-process engine), and the finding
that started it: a language peer writing junk into the encode pool while legitimate traffic
runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from helpers_runtime import assert_same_payload, make_payload, make_settings, wait_pools_clean
from hypothesis import given
from hypothesis import strategies as st
from runtime_harness import transport_params
from test_transport_tcp import EMB, Node, frame, node, raw, zero_except
from transport_harness import make_registry

import emtransfer as et
from emtransfer.buffers import WriteOp
from emtransfer.transport import TransportError
from emtransfer.transport.base import Grants
from emtransfer.transport.local import LocalTransport

pytestmark = pytest.mark.timeout(60)

REG = make_registry(64)
BLOCK = REG.byte_view(EMB).numel() // 64  # bytes of one embeddings block


@given(
    granted=st.frozensets(st.integers(0, 63), max_size=12),
    offset=st.integers(0, 64 * BLOCK - 1),
    nbytes=st.integers(1, 6 * BLOCK),
)
def test_a_grant_covers_exactly_its_blocks(
    granted: frozenset[int], offset: int, nbytes: int
) -> None:
    g = Grants(REG)
    g.add("p", "t", sorted(granted))
    touched = set(range(offset // BLOCK, (offset + nbytes - 1) // BLOCK + 1))
    why = g.refusal("p", "t", EMB, offset, nbytes)
    assert (why is None) == touched.issubset(granted), (why, touched, granted)
    # another peer, another tag, or after the grant ended: nothing
    assert g.refusal("q", "t", EMB, offset, nbytes) is not None
    assert g.refusal("p", "u", EMB, offset, nbytes) is not None
    g.revoke("p", "t")
    assert g.refusal("p", "t", EMB, offset, nbytes) is not None


def test_grants_end_with_the_peer_and_stay_bounded() -> None:
    g = Grants(REG)
    g.add("p", "a", [1])
    g.add("p", "b", [2])
    g.add("q", "a", [1])
    g.drop_peer("p")
    assert g.refusal("p", "a", EMB, BLOCK, 8) and g.refusal("p", "b", EMB, 2 * BLOCK, 8)
    assert g.refusal("q", "a", EMB, BLOCK, 8) is None
    small = Grants(REG)
    small.MAX = 4
    for i in range(10):
        small.add("p", f"t{i}", [i])
    assert len(small) == 4 and small.refusal("p", "t9", EMB, 9 * BLOCK, 1) is None


# -- tcp: frames from a raw socket that holds a real peer's key -----------------------------------


@pytest.fixture
async def enforcing() -> Any:
    """b enforces its grants; a is a peer it added (a raw socket speaks with a's key)."""
    a, b = await node(), await node(timeout=0.5)
    b.t.grants.__dict__.pop("refusal", None)  # node() trusts everything: check for real here
    await a.t.add_peer("b", b.t.metadata())
    await b.t.add_peer("a", a.t.metadata())
    yield a, b
    for n in (a, b):
        await n.t.close()


async def test_tcp_lands_a_granted_frame_and_drops_the_connection_at_any_other(
    enforcing: tuple[Node, Node],
) -> None:
    a, b = enforcing
    b.t.grant("a", "ok", [2, 3])
    for bad in (
        frame(b"ok", 0, 4 * BLOCK, 8),  # the right tag, a block it was not granted
        frame(b"ok", 0, 4 * BLOCK - 4, 8),  # straddles the grant's end
        frame(b"other", 0, 2 * BLOCK, 8),  # granted blocks, another tag
        frame(b"", 0, 2 * BLOCK, 8),  # no tag at all
    ):
        r, w = await raw(b, a.t.key)
        w.write(frame(b"ok", 0, 2 * BLOCK, 8) + b"\xff" * 8 + bad + b"\xee" * 8)
        assert await closed_by_peer(r)
        w.close()
        await b.t.wait_landed("a", "ok", 8)  # the granted frame landed, the other did not
        assert zero_except(b, EMB, 2 * BLOCK, 2 * BLOCK + 8)
    b.t.revoke("a", "ok")  # the grant ended: even its own blocks are closed now
    r, w = await raw(b, a.t.key)
    w.write(frame(b"ok", 0, 2 * BLOCK + 8, 8) + b"\xdd" * 8)
    assert await closed_by_peer(r)
    w.close()
    assert zero_except(b, EMB, 2 * BLOCK, 2 * BLOCK + 8)


async def test_tcp_discard_ends_the_grant_and_sinks_late_bytes(
    enforcing: tuple[Node, Node],
) -> None:
    a, b = enforcing
    b.t.grant("a", "late", [5])
    await b.t.discard("a", "late")
    _r, w = await raw(b, a.t.key)
    w.write(frame(b"late", 0, 5 * BLOCK, 8) + b"\xff" * 8)  # sunk: the fence keeps the stream
    b.t.grant("a", "next", [6])
    w.write(frame(b"next", 0, 6 * BLOCK, 8) + b"\x11" * 8)
    await b.t.wait_landed("a", "next", 8)
    assert zero_except(b, EMB, 6 * BLOCK, 6 * BLOCK + 8)
    w.close()


async def closed_by_peer(r: asyncio.StreamReader) -> bool:
    from test_transport_tcp import closed_by_peer as closed

    return await closed(r)


# -- the in-process engine ------------------------------------------------------------------------


async def test_local_refuses_a_write_outside_the_receivers_grants() -> None:
    reg_a, reg_b = make_registry(64), make_registry(64)
    a, b = LocalTransport(reg_a), LocalTransport(reg_b)
    for t in (a, b):
        await t.start()
    await a.add_peer("b", b.metadata())
    await b.add_peer("a", a.metadata())
    reg_a.byte_view(EMB).fill_(7)
    ok = [WriteOp(EMB, 0, 3 * BLOCK, 16)]
    b.grant("a", "t", [3])
    await a.write("b", ok, tag="t")
    assert int(reg_b.byte_view(EMB)[3 * BLOCK]) == 7
    for tag, ops in (("t", [WriteOp(EMB, 0, 4 * BLOCK, 16)]), ("u", ok)):
        with pytest.raises(TransportError, match="outside the receiver's grants"):
            await a.write("b", ops, tag=tag)
    assert int(reg_b.byte_view(EMB)[4 * BLOCK]) == 0
    c = LocalTransport(make_registry(64))  # a node b never added
    await c.start()
    await c.add_peer("b", b.metadata())
    with pytest.raises(TransportError, match="outside the receiver's grants"):
        await c.write("b", ok, tag="t")


# -- the finding: a language peer writes into the encode pool ------------------------------------


@pytest.mark.parametrize("transport", ["local", "tcp"])
async def test_a_language_peer_cannot_write_into_the_encode_pool(transport: str) -> None:
    """Finding 1: every node accepted data connections from any peer it added and checked a
    frame only against the pool's size: a language peer wrote junk into the encode pool while
    legitimate traffic ran, and the legitimate payloads came back corrupted."""
    s = make_settings(transport=transport)
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang, et.LanguageNode(s) as evil:
        peer = await lang.connect(enc.address)
        bad_peer = await evil.connect(enc.address)
        pays = {f"r{i}": make_payload(200, seed=i) for i in range(8)}
        junk = torch.full((enc.registry.byte_view(EMB).numel(),), 0xAB, dtype=torch.uint8)
        evil.registry.byte_view(EMB).copy_(junk)
        whole = [WriteOp(EMB, 0, 0, enc.registry.byte_view(EMB).numel())]
        refused = 0

        async def attack() -> None:
            nonlocal refused
            for i in range(20):
                try:
                    await evil.transport.write(bad_peer.transport_id, whole, tag=f"r{i % 8}//0")
                except TransportError:
                    refused += 1
                await asyncio.sleep(0)  # interleave with the legitimate traffic

        sends = [asyncio.create_task(enc.send(r, p, peer=lang.node_id)) for r, p in pays.items()]
        attacker = asyncio.create_task(attack())
        got = await asyncio.gather(*(lang.receive(r, peer) for r in pays))
        await asyncio.gather(*sends, attacker)
        for g in got:
            assert_same_payload(g.tensors, pays[g.rid])
        # an encode node publishes no pools: the attacker's own engine refuses every write
        # (a raw data connection is refused at its hello: the test below)
        assert refused == 20
        await wait_pools_clean(enc, lang)


@pytest.mark.parametrize("transport", transport_params("local", "tcp", "nixl"))
async def test_the_encode_pool_takes_no_inbound_writes(transport: str) -> None:
    """An encode node is never written to: its metadata holds no keys to its pools (with NIXL
    the language node loads none of the encode node's agent metadata, so it can neither read
    nor write that memory), and a write aimed at it is refused by the engine."""
    s = make_settings(transport=transport)
    async with et.EncodeNode(s) as enc, et.LanguageNode(s) as lang:
        peer = await lang.connect(enc.address)
        assert enc.transport.inbound is False and lang.transport.inbound is True
        ops = [WriteOp(EMB, 0, 0, 64)]
        with pytest.raises(TransportError, match="accepts no writes"):
            await lang.transport.write(peer.transport_id, ops, tag="x")
        if transport == "nixl":
            import msgspec

            from emtransfer.transport.nixl import _Meta

            meta = msgspec.msgpack.decode(enc.transport.metadata(), type=_Meta)
            assert meta.agent == b"" and meta.pools == {}  # no keys to the encode pool
        if transport == "tcp":  # even a hand-made data connection is refused at its hello
            from test_transport_tcp import HELLO, HELLO_MAGIC, VERSION, closed_without_ack

            r, w = await asyncio.open_connection("127.0.0.1", enc.transport.port)
            w.write(HELLO.pack(HELLO_MAGIC, VERSION, lang.transport.key, enc.transport.key))
            assert await closed_without_ack(r)
            w.close()
        pay = make_payload(100, seed=1)  # the other direction works as ever
        send = asyncio.create_task(enc.send("r", pay))
        got = await lang.receive("r", peer)
        await send
        assert_same_payload(got.tensors, pay)
        await wait_pools_clean(enc, lang)
