"""TcpTransport in one process: two (or three) nodes on one event loop, each with its own
registry. Hostile bytes on a data connection, refusals, connection loss while a tag is
awaited, concurrent writes, source reuse, removal, and a fuzzed header parser and receiver."""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transport_harness import make_registry, trust_all

from emtransfer.buffers import BufferRegistry, WriteOp
from emtransfer.transport import TransportError
from emtransfer.transport.tcp import (
    ACK,
    FRAME_MAGIC,
    HEADER,
    HELLO,
    HELLO_MAGIC,
    MAX_FRAME,
    MAX_TAG,
    VERSION,
    TcpTransport,
    _RecvConn,
    parse_header,
)

pytestmark = pytest.mark.timeout(30)
EMB = "embeddings"


@dataclass
class Node:
    t: TcpTransport
    reg: BufferRegistry

    def fill(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for name in self.reg.layouts:
            v = self.reg.byte_view(name)
            v.copy_(torch.randint(0, 256, (v.numel(),), dtype=torch.uint8, generator=g))


async def node(num_blocks: int = 64, **kw: Any) -> Node:
    reg = make_registry(num_blocks)
    t = trust_all(TcpTransport(reg, **kw))
    await t.start()
    return Node(t, reg)


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node, Node]]:
    """a -> b is the good path; c's key is known to b but c's bytes come from a raw socket."""
    a, b, c = await node(), await node(timeout=0.5), await node()
    await a.t.add_peer("b", b.t.metadata())
    await b.t.add_peer("a", a.t.metadata())
    await b.t.add_peer("c", c.t.metadata())
    yield a, b, c
    for n in (a, b, c):
        await n.t.close()


async def raw(b: Node, key: bytes, *, receiver: bytes | None = None) -> tuple[Any, Any]:
    r, w = await asyncio.open_connection("127.0.0.1", b.t.port)
    w.write(HELLO.pack(HELLO_MAGIC, VERSION, key, b.t.key if receiver is None else receiver))
    return r, w


async def closed_without_ack(r: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(5):  # a receiver that keeps the connection fails fast
            return await r.read() == b""
    except ConnectionResetError:
        return True


async def closed_by_peer(r: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        assert await r.readexactly(1) == ACK
    return await closed_without_ack(r)


def same(a: Node, b: Node, ops: list[WriteOp]) -> bool:
    return all(
        bool((a.reg.byte_view(o.field)[o.src_offset : o.src_offset + o.nbytes]
              == b.reg.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]).all())
        for o in ops
    )  # fmt: skip


def zero_except(n: Node, field: str, lo: int = 0, hi: int = 0) -> bool:
    """Every byte of ``n``'s pools is zero outside ``[lo, hi)`` of ``field``."""
    for name in n.reg.layouts:
        v = n.reg.byte_view(name).clone()
        if name == field:
            v[lo:hi] = 0
        if bool(v.any()):
            return False
    return True


async def good_write(a: Node, b: Node, tag: str = "good") -> list[WriteOp]:
    a.fill(7)
    ops = [WriteOp(EMB, 4096, 65536, 200_000), WriteOp("mrope_positions", 0, 24, 240)]
    await a.t.write("b", ops, tag=tag)
    await b.t.wait_landed("a", tag, sum(o.nbytes for o in ops))
    assert same(a, b, ops)
    return ops


def frame(tag: bytes, field: int, dst: int, nbytes: int, magic: bytes = FRAME_MAGIC) -> bytes:
    return HEADER.pack(magic, len(tag), field, dst, nbytes) + tag


POOL = 64 * 16 * 4096  # bytes of the embeddings pool in make_registry()
BAD = {
    "magic": frame(b"t", 0, 0, 16, magic=b"XXXX") + b"x" * 16,
    "field-index": frame(b"t", 2, 0, 16) + b"x" * 16,
    "past-pool": frame(b"t", 0, POOL - 8, 16) + b"x" * 16,
    "past-small-pool": frame(b"t", 1, 64 * 16 * 24 - 8, 16) + b"x" * 16,
    "offset-overflow": frame(b"t", 0, 2**64 - 8, 16) + b"x" * 16,
    "oversized": frame(b"t", 0, 0, MAX_FRAME + 1),
    "zero-bytes": frame(b"t", 0, 0, 0),
    "huge-tag": HEADER.pack(FRAME_MAGIC, 65535, 0, 0, 16) + b"t" * 4096,
    "garbage": random.Random(0).randbytes(256),
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
async def test_bad_frame_drops_only_that_connection(
    nodes: tuple[Node, Node, Node], data: bytes
) -> None:
    a, b, c = nodes
    r, w = await raw(b, c.t.key)
    w.write(frame(b"ok", 0, 0, 8) + b"\xff" * 8 + data)  # one good frame, then the bad one
    assert await closed_by_peer(r)
    await b.t.wait_landed("c", "ok", 8)
    assert zero_except(b, EMB, 0, 8)  # nothing past the good frame landed
    w.close()
    await good_write(a, b)  # the other peer is unaffected


async def test_truncated_frame_then_close(nodes: tuple[Node, Node, Node]) -> None:
    a, b, c = nodes
    r, w = await raw(b, c.t.key)
    assert await r.readexactly(1) == ACK
    w.write(frame(b"cut", 0, 8192, 4096) + b"\x01" * 1000)
    w.close()
    with pytest.raises(TransportError, match="c"):
        await b.t.wait_landed("c", "cut", 4096)
    assert zero_except(b, EMB, 8192, 8192 + 1000)  # only inside the frame's own range
    await good_write(a, b)


async def test_hello_refusals(nodes: tuple[Node, Node, Node]) -> None:
    a, b, _ = nodes
    r, _w = await raw(b, a.t.key, receiver=bytes(16))  # wrong receiver key: refused at once
    assert await closed_without_ack(r)
    r, _w = await raw(b, b"\x00" * 16)  # a key no add_peer named: refused after the timeout
    assert await closed_without_ack(r)
    r, w = await asyncio.open_connection("127.0.0.1", b.t.port)
    w.write(b"GET / HTTP/1.1\r\n\r\n" * 3)
    assert await closed_without_ack(r)
    await good_write(a, b)


async def test_hello_before_add_peer_is_held_then_accepted() -> None:
    a, b = await node(), await node()
    try:
        await a.t.add_peer("b", b.t.metadata())
        a.fill(1)
        ops = [WriteOp(EMB, 0, 0, 1 << 20)]
        write = asyncio.ensure_future(a.t.write("b", ops, tag="early"))
        await b.t.add_peer("a", a.t.metadata())
        await write
        await b.t.wait_landed("a", "early", 1 << 20)
        assert same(a, b, ops)
    finally:
        await a.t.close()
        await b.t.close()


async def test_wait_landed_fails_when_the_connection_drops(nodes: tuple[Node, Node, Node]) -> None:
    a, b, _ = nodes
    never = asyncio.ensure_future(b.t.wait_landed("a", "never", 10))  # no byte will come
    ops = await good_write(a, b, tag="t1")
    nbytes = sum(o.nbytes for o in ops)
    await a.t.write("b", ops, tag="early")  # half of what the receiver will wait for
    await a.t.write("b", ops, tag="late")  # likewise, but awaited after the drop
    early = asyncio.ensure_future(b.t.wait_landed("a", "early", 2 * nbytes))
    await a.t.remove_peer("b")  # the sender's data connection goes away
    for fut in (never, early):
        with pytest.raises(TransportError, match="closed by the sender"):
            await fut
    with pytest.raises(TransportError, match="closed by the sender"):
        await b.t.wait_landed("a", "late", 2 * nbytes)
    await a.t.add_peer("b", b.t.metadata())  # and comes back: a fresh connection works
    await good_write(a, b, tag="t2")


async def test_remove_peer_fails_waiters_and_stops_landing() -> None:
    a, b = await node(512, sock_buf=1 << 16), await node(512, timeout=0.3)
    try:
        await a.t.add_peer("b", b.t.metadata())
        await b.t.add_peer("a", a.t.metadata())
        a.fill(3)
        size = b.reg.byte_view(EMB).numel()

        async def send() -> None:
            await a.t.write("b", [WriteOp(EMB, 0, 0, 4096)], tag="first")
            await a.t.write("b", [WriteOp(EMB, 0, 0, size)], tag="big")

        task = asyncio.ensure_future(send())
        await b.t.wait_landed("a", "first", 4096)
        waiter = asyncio.ensure_future(b.t.wait_landed("a", "big", size))
        await b.t.remove_peer("a")
        snapshot = b.reg.byte_view(EMB).clone()
        with pytest.raises(TransportError):
            await waiter
        with pytest.raises(TransportError):  # reconnects, but b no longer knows a's key
            await task
        assert torch.equal(b.reg.byte_view(EMB), snapshot)  # nothing landed after removal
        for peer in ("a", "nobody"):
            with pytest.raises(TransportError):
                await b.t.wait_landed(peer, "x", 1)
            with pytest.raises(TransportError):
                await b.t.write(peer, [WriteOp(EMB, 0, 0, 8)], tag="x")
    finally:
        await a.t.close()
        await b.t.close()


async def test_concurrent_writes_do_not_interleave() -> None:
    a, b = await node(512, sock_buf=1 << 16), await node(512, sock_buf=1 << 16)
    try:
        await a.t.add_peer("b", b.t.metadata())
        await b.t.add_peer("a", a.t.metadata())
        a.fill(5)
        rng = random.Random(1)
        size = {n: a.reg.byte_view(n).numel() for n in a.reg.layouts}
        cuts = {n: sorted(rng.sample(range(1, s), 95)) for n, s in size.items()}
        pieces = [  # disjoint destinations covering both pools, random sizes and sources
            WriteOp(n, rng.randrange(0, size[n] - (hi - lo) + 1), lo, hi - lo)
            for n, c in cuts.items()
            for lo, hi in zip([0, *c], [*c, size[n]], strict=True)
        ]
        rng.shuffle(pieces)
        writes = [pieces[i : i + 3] for i in range(0, len(pieces), 3)]
        await asyncio.gather(*(a.t.write("b", ops, tag=f"w{i}") for i, ops in enumerate(writes)))
        for i, ops in enumerate(writes):
            await b.t.wait_landed("a", f"w{i}", sum(o.nbytes for o in ops))
        assert same(a, b, pieces)
    finally:
        await a.t.close()
        await b.t.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_source_may_be_reused_when_write_returns(loop: str) -> None:
    """write() returns only once every byte is in the kernel, even on loops whose transports
    keep a reference to unsent bytes instead of copying them (uvloop)."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop

    async def run() -> None:
        a, b = await node(512, sock_buf=1 << 16), await node(512, sock_buf=1 << 16)
        try:
            await a.t.add_peer("b", b.t.metadata())
            await b.t.add_peer("a", a.t.metadata())
            a.fill(9)
            want = a.reg.byte_view(EMB).clone()
            await a.t.write("b", [WriteOp(EMB, 0, 0, want.numel())], tag="all")
            a.reg.byte_view(EMB).zero_()  # the caller reuses its staging at once
            await b.t.wait_landed("a", "all", want.numel())
            assert torch.equal(b.reg.byte_view(EMB), want)
        finally:
            await a.t.close()
            await b.t.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_write_nowait_posts_at_once_on_an_idle_connection(loop: str) -> None:
    """write_nowait: the first write (no connection yet) is write() itself; then a small one
    is done before it returns (None); one the kernel cannot take whole returns the wait for it,
    and its source may be reused once that returned. landed() says what wait_landed would."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop

    async def run() -> None:
        a, b = await node(512, sock_buf=1 << 16), await node(512, sock_buf=1 << 16)
        try:
            await a.t.add_peer("b", b.t.metadata())
            await b.t.add_peer("a", a.t.metadata())
            a.fill(11)
            first = [WriteOp(EMB, 0, 0, 4096)]
            pending = a.t.write_nowait("b", first, tag="first")
            assert pending is not None  # it connects first
            await pending
            small = [WriteOp(EMB, 4096, 8192, 4096), WriteOp(EMB, 1 << 16, 1 << 17, 20_000)]
            assert a.t.write_nowait("b", small, tag="small") is None
            assert not b.t.landed("a", "small", 1 << 30)  # not that many bytes
            await b.t.wait_landed("a", "first", 4096)
            await asyncio.wait_for(b.t.wait_landed("a", "small", 24_096), 10)
            assert same(a, b, first + small)
            assert not b.t.landed("a", "small", 1)  # forgotten once landed
            big = [WriteOp(EMB, 0, 0, a.reg.byte_view(EMB).numel())]
            want = a.reg.byte_view(EMB).clone()
            pending = a.t.write_nowait("b", big, tag="big")
            assert pending is not None  # more than the socket buffers take at once
            await pending
            a.reg.byte_view(EMB).zero_()  # the caller reuses its staging at once
            await asyncio.wait_for(b.t.wait_landed("a", "big", want.numel()), 10)
            assert torch.equal(b.reg.byte_view(EMB), want)
            tiny = [WriteOp(EMB, 0, 0, 64)]
            assert a.t.write_nowait("b", tiny, tag="tiny") is None
            assert a.t.write_nowait("b", [WriteOp(EMB, 64, 64, 64)], tag="after") is None
            # one connection, read in order: once "after" is in, "tiny" is, and landed() says so
            await asyncio.wait_for(b.t.wait_landed("a", "after", 64), 10)
            assert b.t.landed("a", "tiny", 64)
            assert not b.t.landed("a", "tiny", 64)  # and forgets it
            with pytest.raises(TransportError):  # refused before any byte is sent
                a.t.write_nowait("b", [WriteOp(EMB, 0, 1 << 40, 64)], tag="bad")
        finally:
            await a.t.close()
            await b.t.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())


async def test_sender_side_refusals(nodes: tuple[Node, Node, Node]) -> None:
    a, b, _ = nodes
    bad = [
        [WriteOp(EMB, 0, POOL - 8, 16)],
        [WriteOp(EMB, POOL - 8, 0, 16)],
        [WriteOp(EMB, -1, 0, 16)],
        [WriteOp("nope", 0, 0, 16)],
    ]
    for ops in bad:
        with pytest.raises(TransportError):
            await a.t.write("b", ops, tag="bad")
    with pytest.raises(TransportError):
        await a.t.write("b", [WriteOp(EMB, 0, 0, 16)], tag="x" * (MAX_TAG + 1))
    with pytest.raises(TransportError):
        await a.t.add_peer("z", b"\x93garbage")
    await a.t.write("b", [WriteOp(EMB, 0, 0, 0)], tag="empty")  # nothing to send
    await good_write(a, b)


async def test_discard_mid_frame_sinks_the_rest_and_keeps_the_connection(
    nodes: tuple[Node, Node, Node],
) -> None:
    """discard() while a frame of that tag is half read: the rest of it, and later frames of the
    tag, go to scratch; the connection survives and other tags land."""
    a, b, c = nodes
    r, w = await raw(b, c.t.key)
    assert await r.readexactly(1) == ACK
    (conn,) = [x for x in b.t._conns if x.ids[0] == c.t.key]
    size, half, dst = 1 << 20, 1 << 19, 8192
    half_in = asyncio.Event()
    read = conn.buffer_updated

    def counted(nbytes: int) -> None:  # the receiver holds exactly half the payload: discard now
        read(nbytes)
        if conn.state == "payload" and conn.got == half:
            half_in.set()

    conn.buffer_updated = counted  # type: ignore[method-assign]
    w.write(frame(b"gone", 0, dst, size) + b"\x01" * half)
    await half_in.wait()
    waiter = asyncio.ensure_future(b.t.wait_landed("c", "gone", size))
    await asyncio.sleep(0)  # one step: the waiter registers
    await b.t.discard("c", "gone")
    with pytest.raises(TransportError, match="discarded"):
        await waiter
    w.write(b"\x02" * (size - half))  # the rest of the discarded frame
    w.write(frame(b"gone", 0, 0, 4096) + b"\x03" * 4096)  # a later frame of the discarded tag
    w.write(frame(b"next", 0, 1 << 21, 4096) + b"\x04" * 4096)
    await b.t.wait_landed("c", "next", 4096)
    emb = b.reg.byte_view(EMB)
    assert bool((emb[dst : dst + half] == 1).all())  # read before the discard: it stays
    assert bool((emb[1 << 21 : (1 << 21) + 4096] == 4).all())
    emb[dst : dst + half] = 0
    emb[1 << 21 : (1 << 21) + 4096] = 0
    assert zero_except(b, EMB)  # no byte of "gone" after the discard point, anywhere
    assert not conn.dead and conn in b.t._peers["c"].recv
    w.write(frame(b"again", 1, 0, 24) + b"\x05" * 24)  # the same connection still carries frames
    await b.t.wait_landed("c", "again", 24)
    w.close()
    await good_write(a, b)


# -- fuzz --------------------------------------------------------------------------------------
pool_lists = st.lists(st.integers(0, 2**40), max_size=4)
headers = st.builds(
    HEADER.pack,
    st.sampled_from([FRAME_MAGIC, b"EMTH", b"\x00" * 4]),
    st.integers(0, 2**16 - 1) | st.integers(0, 8),
    st.integers(0, 2**16 - 1) | st.integers(0, 4),
    st.integers(0, 2**64 - 1) | st.integers(0, 2**20),
    st.integers(0, 2**64 - 1) | st.integers(0, 2**20),
)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64) | headers, pools=pool_lists)
def test_parse_header_fuzz(data: bytes, pools: list[int]) -> None:
    try:
        tag_len, fld, dst, nbytes = parse_header(data, pools)
    except TransportError:
        return
    assert len(data) == HEADER.size and data[:4] == FRAME_MAGIC
    assert 0 <= tag_len <= MAX_TAG and 0 <= fld < len(pools)
    assert 0 < nbytes <= MAX_FRAME and dst >= 0 and dst + nbytes <= pools[fld]


class _FakeTransport(asyncio.Transport):
    closed = False

    def write(self, data: Any) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None:
        self.closed = True


def _address(buf: memoryview) -> tuple[int, int]:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data), buf.nbytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(chunks=[frame(b"t", 0, 64, 1000) + b"x" * 10], step=7)  # removed mid-payload
@example(chunks=[frame(b"", 1, 0, 24) + b"y" * 24, frame(b"t", 2, 0, 1)], step=97)
@given(chunks=st.lists(st.binary(max_size=80) | headers, max_size=12), step=st.integers(1, 97))
def test_receiver_survives_any_byte_stream(chunks: list[bytes], step: int) -> None:
    """After an accepted hello, arbitrary bytes fed in arbitrary pieces are read into the
    pools only inside their bounds, or drop the connection; no exception escapes."""

    async def run() -> None:
        a, b = await node(2), await node(2)
        try:
            await b.t.add_peer("a", a.t.metadata())
            conn = _RecvConn(b.t)
            conn.connection_made(fake := _FakeTransport())
            pools = [(p.data_ptr(), p.numel()) for p in map(b.reg.byte_view, b.reg.layouts)]
            stream = HELLO.pack(HELLO_MAGIC, VERSION, a.t.key, b.t.key) + b"".join(chunks)
            pos = 0
            while pos < len(stream) and not fake.closed:
                buf = conn.get_buffer(-1)
                addr, n = _address(buf)
                assert n > 0
                in_pool = [lo <= addr and addr + n <= lo + size for lo, size in pools]
                assert any(in_pool) or n <= max(MAX_TAG, 1 << 16)  # a pool slice or a small buffer
                n = min(n, step, len(stream) - pos)
                buf[:n] = stream[pos : pos + n]
                conn.buffer_updated(n)
                pos += n
            assert fake.closed == conn.dead
            await b.t.remove_peer("a")  # from now on, nothing is read into the pools
            addr, n = _address(conn.get_buffer(-1))
            assert conn.dead and not any(lo <= addr < lo + size for lo, size in pools)
        finally:
            await a.t.close()
            await b.t.close()

    asyncio.run(run())


def test_header_layout_is_stable() -> None:
    assert HEADER.size == 24 and HELLO.size == 37
    assert struct.calcsize("!4sHHQQ") == HEADER.size


async def test_an_authenticated_transport_publishes_no_key_and_derives_its_ids() -> None:
    """With a token (``authenticated``) there is no key to leak: the metadata carries none, the
    two directions use different ids derived from the handshake's secret, a peer added without
    that secret is refused, and a write goes through the derived ids."""
    import msgspec

    from emtransfer.transport.tcp import _Meta

    a, b = await node(authenticated=True), await node(authenticated=True, timeout=0.5)
    try:
        assert msgspec.msgpack.decode(a.t.metadata(), type=_Meta).key == b""
        with pytest.raises(TransportError, match="needs the handshake's secret"):
            await b.t.add_peer("a", a.t.metadata())
        await a.t.add_peer("b", b.t.metadata(), secret=b"s" * 32)
        await b.t.add_peer("a", a.t.metadata(), secret=b"s" * 32)
        out, back = a.t._peers["b"].ids_out, b.t._peers["a"].ids_out
        assert out == b.t._peers["a"].ids_in and out != back and b"" not in out
        a.fill(3)
        op = WriteOp(EMB, 0, 0, 4096)
        await a.t.write("b", [op], tag="t")
        await b.t.wait_landed("a", "t", 4096)
        assert bytes(b.t.views[0][:4096]) == bytes(a.t.views[0][:4096])
        await b.t.add_peer("a", a.t.metadata(), secret=b"x" * 32)  # another handshake's secret
        r, w = await asyncio.open_connection("127.0.0.1", b.t.port)
        w.write(HELLO.pack(HELLO_MAGIC, VERSION, *out))  # the old ids match no peer now
        assert await closed_without_ack(r)
        w.close()
    finally:
        await a.t.close()
        await b.t.close()


def test_the_eager_path_stays_off_for_a_wrapper_that_would_miss_writes() -> None:
    """The sender posts through ``write_nowait`` only where the engine has one, and where
    whoever wrapped the instance's ``write`` (a tracer, a fault injector) wrapped it too."""
    from emtransfer.runtime.encode import _posts_at_once
    from emtransfer.transport.local import LocalTransport

    t = TcpTransport(make_registry(4))
    assert _posts_at_once(t)
    t.write = t.write  # type: ignore[method-assign]
    assert not _posts_at_once(t), "a wrapped write would miss the eager posts"
    t.write_nowait = t.write_nowait  # type: ignore[method-assign]
    assert _posts_at_once(t)
    assert not _posts_at_once(LocalTransport(make_registry(4)))
