"""NIXL-specific behaviour: metadata, descriptor refusals, peer removal, notification draining.

Most tests run two transports (two NIXL agents) in this process on one event loop; one runs
them in two processes through ``transport_harness``. The shared conformance suite covers the
data itself across processes.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from emtransfer.transport import transport_unavailable

if (_why := transport_unavailable("nixl")) is not None:
    pytest.skip(f"nixl cannot run here: {_why}", allow_module_level=True)

import msgspec
import torch
from transport_harness import (
    BLOCK_SIZE,
    block_ops,
    fill_random,
    landed,
    link,
    make_registry,
    recv,
    run_pair,
)

from emtransfer.buffers import WriteOp
from emtransfer.errors import ConfigError
from emtransfer.settings import Settings
from emtransfer.transport import TransportError
from emtransfer.transport.nixl import (
    PARAMS_ENV,
    NixlTransport,
    parse_backend_params,
)

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0  # seconds any single wait in these tests may take


@asynccontextmanager
async def _pair(**kw: Any) -> AsyncIterator[tuple[NixlTransport, NixlTransport, Any, Any]]:
    """Sender ``a`` and receiver ``b``, started and peered both ways (peer ids "b" and "a")."""
    ra, rb = make_registry(), make_registry()
    a, b = NixlTransport(ra, **kw), NixlTransport(rb, **kw)
    try:
        await a.start()
        await b.start()
        await a.add_peer("b", b.metadata())
        await b.add_peer("a", a.metadata())
        fill_random(ra, seed=1)
        yield a, b, ra, rb
    finally:
        await a.close()
        await b.close()


async def _until(cond: Any) -> None:
    """Poll ``cond()`` (a condition, not a delay) until true, within ``WAIT``."""

    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), WAIT)


def test_parse_backend_params() -> None:
    assert parse_backend_params("") == {}
    assert parse_backend_params(" ucx_error_handling_mode=none , num_workers=2,") == {
        "ucx_error_handling_mode": "none",
        "num_workers": "2",
    }
    with pytest.raises(ConfigError, match=PARAMS_ENV):
        parse_backend_params("novalue")


def test_available_and_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NixlTransport.unavailable() is None
    monkeypatch.setenv(PARAMS_ENV, "ucx_error_handling_mode=none")
    t = NixlTransport.from_settings(Settings(write_timeout=7), make_registry())
    assert t.backend_params == {"ucx_error_handling_mode": "none"}
    assert t.xfer_timeout == 7


async def test_metadata_round_trip() -> None:
    registry = make_registry()
    t = NixlTransport(registry)
    with pytest.raises(TransportError, match="not started"):
        t.metadata()
    await t.start()
    try:
        meta = msgspec.msgpack.decode(t.metadata())
        assert meta["mem"] == "DRAM" and meta["agent"] and meta["name"].startswith("emtransfer-")
        for name in registry.layouts:
            view = registry.byte_view(name)
            assert tuple(meta["pools"][name]) == (view.data_ptr(), view.numel(), 0)
        for bad in (
            b"\x00junk",
            msgspec.msgpack.encode({**meta, "pools": {"embeddings": [1, 2, 0]}}),
        ):
            with pytest.raises(TransportError):
                await t.add_peer("x", bad)
    finally:
        await t.close()
    await t.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        t.metadata()


@pytest.mark.parametrize("inline_max_bytes", [1, 1 << 40], ids=["executor", "loop"])
async def test_scattered_write_lands(inline_max_bytes: int) -> None:
    async with _pair(inline_max_bytes=inline_max_bytes) as (a, b, ra, rb):
        ops = block_ops(ra, [9, 3, 4, 5, 0], [40, 41, 50, 7, 8], 5 * BLOCK_SIZE - 3)
        await asyncio.wait_for(a.write("b", ops, tag="t"), WAIT)
        await asyncio.wait_for(b.wait_landed("a", "t", sum(o.nbytes for o in ops)), WAIT)
        assert landed(ra, rb, ops)
        assert b.pending_notifs() == 0


async def test_traffic_wakes_the_progress_thread_not_its_idle_timeout() -> None:
    """With the progress thread on, only it delivers notifications to the target (UCX); it
    sleeps in poll() for up to ``progress_delay_us``. With a timeout far longer than the test's
    budget, every notification still arrives: the worker's event fd wakes the thread."""
    assert NixlTransport(make_registry()).progress_delay_us >= 10_000  # idle: few wake-ups
    async with _pair(progress_delay_us=600_000_000) as (a, b, ra, rb):  # 10 minutes
        for i in range(5):
            ops = block_ops(ra, [i], [i], BLOCK_SIZE)
            await asyncio.wait_for(a.write("b", ops, tag=f"w{i}"), WAIT)
            await asyncio.wait_for(b.wait_landed("a", f"w{i}", sum(o.nbytes for o in ops)), WAIT)
            assert landed(ra, rb, ops)


async def test_out_of_bounds_refused_before_posting() -> None:
    async with _pair() as (a, b, ra, rb):
        size = ra.byte_view("embeddings").numel()
        good = WriteOp("embeddings", 0, 0, 64)
        for bad in (
            WriteOp("embeddings", 0, size - 8, 16),  # past the remote pool
            WriteOp("embeddings", size - 8, 0, 16),  # past the local pool
            WriteOp("embeddings", -8, 0, 16),
            WriteOp("embeddings", 0, 0, -1),
            WriteOp("nope", 0, 0, 16),
        ):
            with pytest.raises(TransportError):
                await a.write("b", [good, bad], tag="bad")
        assert not rb.byte_view("embeddings")[:64].any(), "a refused write moved bytes"
        ok = [WriteOp("embeddings", 64, 64, 64)]
        await asyncio.wait_for(a.write("b", ok, tag="ok"), WAIT)
        await asyncio.wait_for(b.wait_landed("a", "ok", 64), WAIT)
        assert b.pending_notifs() == 0, "a refused write sent a notification"


async def test_unknown_and_removed_peers_refused() -> None:
    async with _pair() as (a, b, ra, _):
        ops = block_ops(ra, [0], [1], BLOCK_SIZE)
        with pytest.raises(TransportError, match="unknown peer"):
            await a.write("nobody", ops, tag="t")
        await a.remove_peer("b")
        await a.remove_peer("b")  # idempotent
        with pytest.raises(TransportError, match="unknown peer"):
            await a.write("b", ops, tag="t")
        await b.remove_peer("a")
        with pytest.raises(TransportError, match="unknown peer"):
            await b.wait_landed("a", "t", 1)
    with pytest.raises(TransportError, match="closed"):
        await a.write("b", ops, tag="t")


async def test_remove_peer_waits_for_writes_in_flight() -> None:
    async with _pair(inline_max_bytes=1) as (a, _, ra, rb):
        batches = [block_ops(ra, [k], [63 - k], BLOCK_SIZE) for k in range(8)]
        tasks = [
            asyncio.create_task(a.write("b", ops, tag=f"w{k}")) for k, ops in enumerate(batches)
        ]
        await asyncio.sleep(0)  # one loop turn: every write is posted (to the executor) by then
        await asyncio.wait_for(a.remove_peer("b"), WAIT)
        snapshot = {name: rb.byte_view(name).clone() for name in rb.layouts}
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        # a write still queued when the peer was removed is refused at posting, never posted;
        # one posted before completes, and had landed when remove_peer returned
        for r in results:
            assert r is None or (isinstance(r, TransportError) and "removed" in str(r)), r
        posted = [ops for ops, r in zip(batches, results, strict=True) if r is None]
        for o in (o for ops in posted for o in ops):
            got = snapshot[o.field][o.dst_offset : o.dst_offset + o.nbytes]
            assert torch.equal(got, ra.byte_view(o.field)[o.src_offset : o.src_offset + o.nbytes])
        with pytest.raises(TransportError):
            await a.write("b", batches[0], tag="late")


async def test_write_nowait_posts_on_the_callers_turn() -> None:
    """write_nowait posts a write under ``inline_max_bytes`` before it returns (its notification
    reaches the peer with no turn of the sender's loop in between), refuses what write refuses
    without sending a byte, and leaves larger writes to write(). A cancelled wait for a posted
    write leaves it to run: remove_peer waits for it, and its bytes are in when that returns."""
    async with _pair(inline_max_bytes=3 * BLOCK_SIZE * 4096) as (a, b, ra, rb):  # 3 blocks over
        ops = block_ops(ra, [5, 2], [7, 30], 2 * BLOCK_SIZE)
        nbytes = sum(o.nbytes for o in ops)
        pending = a.write_nowait("b", ops, tag="now")
        # posted already: the peer's engine sees it while this loop has not turned
        seen = threading.Event()

        def look() -> None:
            while not seen.is_set() and not b.landed("a", "now", nbytes):
                seen.wait(0.001)
            seen.set()

        thread = threading.Thread(target=look)
        thread.start()
        thread.join(WAIT)  # no await between the call and here: nothing else ran on this loop
        assert seen.is_set() and not thread.is_alive(), "write_nowait did not post"
        if pending is not None:
            await asyncio.wait_for(pending, WAIT)
        assert landed(ra, rb, ops)
        with pytest.raises(TransportError, match="leaves the pools"):
            a.write_nowait("b", [WriteOp("embeddings", 0, 1 << 40, 64)], tag="bad")
        with pytest.raises(TransportError, match="unknown peer"):
            a.write_nowait("nobody", ops, tag="bad")
        big = block_ops(ra, [0, 1, 2], [3, 4, 5], 3 * BLOCK_SIZE)  # over inline_max_bytes
        later = a.write_nowait("b", big, tag="big")
        assert asyncio.iscoroutine(later), "a large write must go through write()"
        await asyncio.wait_for(later, WAIT)
        await asyncio.wait_for(b.wait_landed("a", "big", sum(o.nbytes for o in big)), WAIT)
        assert b.pending_notifs() == 0, "a refused write sent a notification"
        last = block_ops(ra, [9, 10], [11, 12], 2 * BLOCK_SIZE)
        waiting = a.write_nowait("b", last, tag="last")
        if waiting is not None:
            task = asyncio.ensure_future(waiting)
            task.cancel()
        await asyncio.wait_for(a.remove_peer("b"), WAIT)
        assert landed(ra, rb, last), "remove_peer returned before a posted write ended"


async def test_a_wait_under_way_sees_what_landed_before_the_peer_was_removed() -> None:
    """The receiver waits (polling, backing off) for a round; the sender's write completes and
    the peer is removed before the waiting poll comes round again (a node closing right after
    its send returned: the control connection's end beats the next poll). The notification
    had arrived by then: the wait succeeds (removal used to drop what had arrived, and the
    wait failed with "unknown peer"). A wait whose bytes had not all arrived still fails,
    saying so.

    The sender runs on a loop of its own in a thread, so the receiver's loop can stay blocked
    from the write's start to the removal: its waits get no turn in between."""
    ra, rb = make_registry(), make_registry()
    a, b = NixlTransport(ra), NixlTransport(rb)
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()

    def on_a(coro: Any) -> Any:  # blocks this loop until the sender's loop ran ``coro``
        return asyncio.run_coroutine_threadsafe(coro, other).result(WAIT)

    try:
        on_a(a.start())
        await b.start()
        on_a(a.add_peer("b", b.metadata()))
        await b.add_peer("a", a.metadata())
        fill_random(ra, seed=5)
        ops = block_ops(ra, [3, 9], [60, 2], BLOCK_SIZE)
        nbytes = sum(o.nbytes for o in ops)
        waiting = asyncio.ensure_future(b.wait_landed("a", "r/0", nbytes))
        short = asyncio.ensure_future(b.wait_landed("a", "r/1", 2 * nbytes))
        await asyncio.sleep(0)  # one loop turn: both waits started, polled once and asleep
        on_a(a.write("b", ops, tag="r/0"))
        on_a(a.write("b", ops, tag="r/1"))
        await b.remove_peer("a")  # in this task: wait_for's task would give the waits a turn
        await asyncio.wait_for(waiting, WAIT)
        for o in ops:
            got = rb.byte_view(o.field)[o.dst_offset : o.dst_offset + o.nbytes]
            assert torch.equal(got, ra.byte_view(o.field)[o.src_offset : o.src_offset + o.nbytes])
        with pytest.raises(TransportError, match="removed before 'r/1' landed"):
            await asyncio.wait_for(short, WAIT)
    finally:
        on_a(a.close())
        await b.close()
        other.call_soon_threadsafe(other.stop)
        thread.join(WAIT)
        other.close()


async def test_landed_answers_without_waiting_and_consumes() -> None:
    async with _pair() as (a, b, ra, _):
        ops = block_ops(ra, [5], [6], BLOCK_SIZE)
        nbytes = sum(o.nbytes for o in ops)
        assert not b.landed("a", "r/0", nbytes)  # nothing written yet
        assert not b.landed("nobody", "r/0", nbytes)
        await asyncio.wait_for(a.write("b", ops, tag="r/0"), WAIT)
        await _until(lambda: b.pending_notifs() == 1)
        assert not b.landed("a", "r/0", nbytes + 1)  # not all of it: the caller must wait
        assert b.landed("a", "r/0", nbytes)
        assert b.pending_notifs() == 0  # consumed, as wait_landed would have
        assert not b.landed("a", "r/0", nbytes)


async def test_notifications_drained() -> None:
    async with _pair() as (a, b, ra, _):
        for k in range(20):
            ops = block_ops(ra, [k % 64], [(k * 7) % 64], BLOCK_SIZE)
            await asyncio.wait_for(a.write("b", ops, tag=f"r{k}/0"), WAIT)
            await asyncio.wait_for(b.wait_landed("a", f"r{k}/0", sum(o.nbytes for o in ops)), WAIT)
        assert b.pending_notifs() == 0
        # aborted requests: written, never waited for; kept until discarded or notif_ttl
        for k in range(5):
            await asyncio.wait_for(
                a.write("b", block_ops(ra, [k], [k], 1), tag=f"aborted{k}"), WAIT
            )
        await _until(lambda: b.pending_notifs() == 5)
        await b.discard("a", "aborted0")  # the runtime discards an abandoned round's tag
        assert b.pending_notifs() == 4
        b.notif_ttl = 0.0
        assert b.pending_notifs() == 0
        assert b._agent.get_new_notifs() == {}


async def _two_process_scenario(role: str, transport: Any, registry: Any, conn: Any) -> None:
    await link(transport, conn)
    n = registry.num_blocks
    cases = [(f"r{k}/0", [k], [n - 1 - k], BLOCK_SIZE) for k in range(16)]
    cases.append(("big/0", list(range(n)), list(reversed(range(n))), n * BLOCK_SIZE))
    if role == "sender":
        fill_random(registry, seed=3)
        for tag, src, dst, count in cases:
            await transport.write("peer", block_ops(registry, src, dst, count), tag=tag)
        for k in range(3):  # aborted: the receiver never waits for these
            await transport.write("peer", block_ops(registry, [k], [k], 1), tag=f"aborted{k}")
        conn.send(("written",))
        await recv(conn)
        await transport.close()
        conn.send(("ok", "sent"))  # the harness reads a None result as "no result yet"
    else:
        await recv(conn)  # "written"
        for tag, _, _, count in cases:
            nbytes = count * registry.token_nbytes
            await asyncio.wait_for(transport.wait_landed("peer", tag, nbytes), WAIT)
        await _until(lambda: transport.pending_notifs() == 3)
        transport.notif_ttl = 0.0
        pending = transport.pending_notifs()
        conn.send(("drained",))
        await transport.close()
        conn.send(("ok", pending))


def test_two_processes_notifications_drained() -> None:
    sent, pending = run_pair("nixl", _two_process_scenario, timeout=50)
    assert (sent, pending) == ("sent", 0)


def test_without_rdma_devices_ucx_loads_no_infiniband_module(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """With libibverbs installed but no device, UCX's ib module crashes the process at exit:
    it is left out then, never when the host has devices or the user chose UCX_MODULES."""
    import emtransfer.transport.nixl as nx

    monkeypatch.delenv("UCX_MODULES", raising=False)
    monkeypatch.setattr(nx, "RDMA_DEVICES", str(tmp_path / "absent"))
    nx._ucx_defaults()
    assert os.environ["UCX_MODULES"] == "^ib"
    monkeypatch.delenv("UCX_MODULES")
    (tmp_path / "present" / "mlx5_0").mkdir(parents=True)
    monkeypatch.setattr(nx, "RDMA_DEVICES", str(tmp_path / "present"))
    nx._ucx_defaults()
    assert "UCX_MODULES" not in os.environ
    monkeypatch.setenv("UCX_MODULES", "ib,tcp")
    monkeypatch.setattr(nx, "RDMA_DEVICES", str(tmp_path / "absent"))
    nx._ucx_defaults()
    assert os.environ["UCX_MODULES"] == "ib,tcp"


def test_a_process_that_used_nixl_exits_cleanly() -> None:
    """The crash at exit above, end to end: a child moves a payload over NIXL and exits 0."""
    import subprocess
    import sys

    code = (
        "import asyncio, torch, emtransfer as et\n"
        "async def main():\n"
        "    s = et.Settings(transport='nixl', hidden_size=16, dtype='float32', num_blocks=4,"
        " block_size=16, default_blocks=2)\n"
        "    async with et.EncodeNode(s, control='tcp') as enc, et.LanguageNode(s) as lang:\n"
        "        peer = await lang.connect(enc.address)\n"
        "        pay = {'embeddings': torch.randn(20, 16)}\n"
        "        send = asyncio.create_task(enc.send('r', pay))\n"
        "        got = await lang.receive('r', peer)\n"
        "        await send\n"
        "        assert torch.equal(got.tensors['embeddings'], pay['embeddings'])\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "UCX_MODULES"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=50)
    assert r.returncode == 0, (r.returncode, r.stderr.decode()[-2000:])
