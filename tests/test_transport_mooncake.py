"""Mooncake-specific behaviour: settings reaching the engine, configurations refused, metadata
of an encode node, availability, the engine's log level, and (two engines in this process)
batched writes off the loop, refusals, deadlines, notifications and peer removal. The shared
two-process suites cover the data itself (test_transport_conformance, test_conformance,
test_fault_matrix, test_two_hosts) and the servers (test_server_http)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import torch
from transport_harness import (
    BLOCK_SIZE,
    block_ops,
    fill_random,
    landed,
    link,
    make_registry,
    recv,
    serve_until_sender_done,
)

from emtransfer.buffers import WriteOp
from emtransfer.errors import ConfigError
from emtransfer.settings import Settings
from emtransfer.transport import GrantExpired, TransportError, transport_unavailable
from emtransfer.transport import mooncake_env as env
from emtransfer.transport.mooncake import MooncakeTransport, _Meta

pytestmark = pytest.mark.timeout(60)
WHY = transport_unavailable("mooncake")
needs_engine = pytest.mark.skipif(WHY is not None, reason=f"the Mooncake engine cannot run: {WHY}")
WAIT = 10.0  # seconds any single wait in these tests may take
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _engine_environment() -> Iterator[None]:
    """Engines started here set the MC_* variables of this process: put them back, so that
    processes spawned by later tests do not inherit them as the user's."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MC_")}
    done = dict(env._done)
    yield
    for k in [k for k in os.environ if k.startswith("MC_")]:
        del os.environ[k]
    os.environ.update(before)
    env._done.clear()
    env._done.update(done)


# -- a stand-in engine: what reaches the engine's API -----------------------------------------
class FakeEngine:
    def __init__(self, *, init_rc: int = 0, write_rc: int = 0) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.init_rc, self.write_rc = init_rc, write_rc

    def initialize(self, *args: Any) -> int:
        self.calls.append(("initialize", args))
        return self.init_rc

    def batch_register_memory(self, addrs: list[int], sizes: list[int], location: str) -> int:
        self.calls.append(("register", (addrs, sizes, location)))
        return 0

    def get_rpc_port(self) -> int:
        return 15000

    def unregister_memory(self, addr: int) -> int:
        self.calls.append(("unregister", (addr,)))
        return 0

    def get_notifies(self) -> list[Any]:
        return []

    def batch_transfer_sync(self, *args: Any) -> int:
        self.calls.append(("write", args))
        return self.write_rc


class StubRegistry:
    """One field of 1 MiB at a made-up address, on ``device`` (a CUDA pool needs no GPU here:
    nothing is allocated)."""

    num_blocks = 4
    layouts = {"embeddings": None}

    def __init__(self, device: str) -> None:
        self.pools = {"embeddings": SimpleNamespace(device=torch.device(device))}

    def byte_view(self, name: str) -> Any:
        return SimpleNamespace(data_ptr=lambda: 1 << 32, numel=lambda: 1 << 20)


def _transport(settings: Settings, registry: Any, engine: FakeEngine) -> MooncakeTransport:
    t = MooncakeTransport.from_settings(settings, registry)
    t._factory = lambda: engine
    return t


# -- settings and configurations ----------------------------------------------------------------
def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMTRANSFER_TRANSPORT", "mooncake")
    monkeypatch.setenv("EMTRANSFER_MOONCAKE_PROTOCOL", "rdma")
    monkeypatch.setenv("EMTRANSFER_MOONCAKE_DEVICES", " mlx5_0 , mlx5_1")
    monkeypatch.setenv("EMTRANSFER_MOONCAKE_LOCATION", "CPU:1")
    s = Settings()
    assert (s.transport, s.mooncake_protocol) == ("mooncake", "rdma")
    assert (s.mooncake_devices, s.mooncake_location) == ("mlx5_0,mlx5_1", "cpu:1")
    assert Settings.model_fields["mooncake_protocol"].description  # documented (--help too)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mooncake_protocol": "udp"}, "mooncake_protocol='udp'"),
        ({"mooncake_devices": "mlx5_0"}, "needs mooncake_protocol='rdma'"),
        ({"mooncake_protocol": "rdma", "mooncake_devices": "mlx5 0"}, "RDMA device names"),
        ({"mooncake_location": "gpu:0"}, "cpu:N or cuda:N"),
        ({"mooncake_location": "cuda:0"}, "does not match device='cpu'"),
        ({"device": "cuda:1", "mooncake_location": "cpu:0"}, "does not match device='cuda:1'"),
    ],
)
def test_settings_refused(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings(**kw)


@needs_engine
async def test_tcp_settings_reach_the_engine() -> None:
    engine = FakeEngine()
    s = Settings(
        transport="mooncake", host="127.0.0.2", write_timeout=3.0, mooncake_location="cpu:0"
    )
    t = _transport(s, make_registry(), engine)
    assert (t.protocol, t.devices, t.post_bound, t.location) == ("tcp", "", 3.0, "cpu:0")
    await t.start()
    try:
        assert engine.calls[0] == ("initialize", ("127.0.0.2", "P2PHANDSHAKE", "tcp", ""))
        kind, (addrs, _, location) = engine.calls[1]
        assert (kind, location, len(addrs)) == ("register", "cpu:0", 2)  # both fields, once
        meta = msgspec.msgpack.decode(t.metadata(), type=_Meta)
        assert meta.session == "127.0.0.2:15000" and set(meta.pools) == {
            "embeddings",
            "mrope_positions",
        }
    finally:
        await t.close()
    assert [c[0] for c in engine.calls].count("unregister") == 2


def _rdma_sysfs(tmp_path: Path, *names: str) -> str:
    for name in names:
        (tmp_path / name).mkdir()
    return str(tmp_path)


@needs_engine
def test_rdma_devices_and_a_cuda_pool_reach_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What cannot run here, down to the engine's API: rdma with named NICs, a pool on GPU 1
    registered as cuda:1 (an engine build that supports CUDA is faked)."""
    monkeypatch.setattr(env, "SYSFS_RDMA", _rdma_sysfs(tmp_path, "mlx5_0", "mlx5_1"))
    monkeypatch.setattr(env, "load_engine", lambda: SimpleNamespace(SUPPORT_CUDA=True))
    s = Settings(
        transport="mooncake", device="cuda:1", host="10.0.0.7",
        mooncake_protocol="rdma", mooncake_devices="mlx5_1",
    )  # fmt: skip
    engine = FakeEngine()
    t = _transport(s, StubRegistry("cuda:1"), engine)
    assert t.location == "cuda:1"
    t._open()  # in this thread: the executor's threads would select GPU 1 first
    assert engine.calls[0] == ("initialize", ("10.0.0.7", "P2PHANDSHAKE", "rdma", "mlx5_1"))
    assert engine.calls[1] == ("register", ([1 << 32], [1 << 20], "cuda:1"))
    t.inbound = False  # an encode node over rdma still registers its sources (their keys)...
    t._engine, engine.calls = None, []
    t._open()
    assert engine.calls[1][0] == "register"
    meta = msgspec.msgpack.decode(t.metadata(), type=_Meta)
    assert (meta.session, meta.pools) == ("", {})  # ...but publishes nothing to reach them
    t._pool.shutdown()


def test_configurations_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"protocol": "tcp", "devices": None, "host": "127.0.0.1", "pool_kind": "cpu",
            "support_cuda": False, "environ": {}}  # fmt: skip
    env.check_config(**base)  # fine
    none, some = str(tmp_path / "none"), _rdma_sysfs(tmp_path, "mlx5_0")
    cases = [
        ({"protocol": "rdma", "sysfs": none}, "no RDMA device"),
        ({"protocol": "rdma", "devices": "mlx5_0,mlx5_9", "sysfs": some}, "mlx5_9 not found"),
        ({"host": "0.0.0.0"}, "not a wildcard"),
        ({"environ": {"MC_TCP_PROTO": "1"}}, "legacy TCP framing"),
        ({"pool_kind": "cuda"}, "SUPPORT_CUDA is False"),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            env.check_config(**{**base, **kw})
    env.check_config(**{**base, "protocol": "rdma", "devices": "mlx5_0", "sysfs": some})
    # through create_transport: the real sysfs of this machine lists no RDMA device
    monkeypatch.setattr(env, "SYSFS_RDMA", none)
    from emtransfer.transport import create_transport

    if WHY is None:
        with pytest.raises(ConfigError, match="no RDMA device"):
            create_transport(
                Settings(transport="mooncake", mooncake_protocol="rdma"), make_registry()
            )


@needs_engine
async def test_engine_failures_are_transport_errors() -> None:
    t = _transport(Settings(transport="mooncake"), make_registry(), FakeEngine(init_rc=-1))
    with pytest.raises(TransportError, match="initialize returned -1"):
        await t.start()
    await t.close()


# -- availability and the engine's log level -------------------------------------------------
def test_unavailable_says_why() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'mooncake'")

    why = env.unavailable(load=missing)
    assert why is not None and "pip install 'emtransfer[mooncake]'" in why
    why = env.unavailable(verbs="libibverbs-not-here.so.1")
    assert why is not None and "apt-get install libibverbs1" in why and "even for TCP" in why
    assert env.unavailable(load=lambda: SimpleNamespace(__name__="x")) is not None
    if WHY is None:  # here: installed, and the real check agrees
        assert env.unavailable() is None and MooncakeTransport.unavailable() is None


def test_engine_environment_follows_our_level_and_the_user() -> None:
    assert [env.engine_log_level(lv) for lv in (10, 20, 30, 40, 50)] == [
        "INFO", "INFO", "WARNING", "ERROR", "ERROR"
    ]  # fmt: skip
    assert env.engine_timeouts(2.5, {}) == {  # whole seconds, never above the bound
        "MC_TRANSFER_TIMEOUT": "2", "MC_TCP_PROGRESS_TIMEOUT_SEC": "2",
        "MC_TCP_STATUS_TIMEOUT_SEC": "2",
    }  # fmt: skip
    assert env.engine_timeouts(0.2, {})["MC_TCP_PROGRESS_TIMEOUT_SEC"] == "1"  # the floor
    user = {"MC_TCP_PROGRESS_TIMEOUT_SEC": "30"}
    assert set(env.engine_timeouts(0.2, user)) == {
        "MC_TRANSFER_TIMEOUT", "MC_TCP_STATUS_TIMEOUT_SEC"
    }  # fmt: skip
    env._done.pop("timeouts", None)
    first: dict[str, str] = {}
    assert env.prepare_environment(1.0, first)["MC_TRANSFER_TIMEOUT"] == "1"
    later: dict[str, str] = {}
    env.prepare_environment(9.0, later)  # once per process: engines may be reading it
    assert later == {} and first["MC_TRANSFER_TIMEOUT"] == "1"


START = textwrap.dedent(
    """
    import asyncio, logging, sys
    sys.path.insert(0, "tests")
    {setup}
    from transport_harness import make_registry
    from emtransfer.settings import Settings
    from emtransfer.transport import create_transport

    async def main():  # as a node makes it: availability checked (the module loaded) first
        t = create_transport(Settings(transport="mooncake"), make_registry())
        await t.start()
        await t.close()

    asyncio.run(main())
    """
)
GLOG = re.compile(r"^([IWEF])\d{4} ", re.M)  # glog's line prefix: level, then MMDD


def _engine_lines(setup: str, **extra: str) -> set[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MC_")} | extra
    r = subprocess.run(
        [sys.executable, "-c", START.format(setup=setup)], cwd=ROOT, env=environ,
        capture_output=True, text=True, timeout=40, check=True,
    )  # fmt: skip
    assert r.stdout == "", r.stdout
    return set(GLOG.findall(r.stderr))


@needs_engine
def test_the_engine_s_log_follows_the_host_s_level() -> None:
    assert "I" not in _engine_lines("")  # unconfigured (warnings): none of its info lines
    assert "I" in _engine_lines("logging.basicConfig(level=logging.INFO)")
    quiet = _engine_lines("logging.basicConfig(level=logging.INFO)", MC_LOG_LEVEL="ERROR")
    assert not quiet & {"I", "W"}  # the user's own setting wins


# -- two real engines in this process --------------------------------------------------------


class Spy:
    """The engine, with its batch calls counted and the thread they ran on recorded."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.batches, self.threads = engine, [], set()

    def batch_transfer_sync(self, *args: Any) -> int:
        self.batches.append(len(args[1]))
        self.threads.add(threading.get_ident())
        return int(self.engine.batch_transfer_sync(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


@asynccontextmanager
async def _pair(**kw: Any) -> AsyncIterator[tuple[MooncakeTransport, MooncakeTransport, Any, Any]]:
    """Encode-like sender ``a`` (no inbound) and receiver ``b``, peered both ways ("b", "a")."""
    ra, rb = make_registry(), make_registry()
    a, b = MooncakeTransport(ra, **kw), MooncakeTransport(rb, **kw)
    a.inbound = False
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


@needs_engine
async def test_one_batch_per_write_off_the_loop_and_notified() -> None:
    async with _pair() as (a, b, ra, rb):
        spy = a._engine = Spy(a._engine)
        scrambled = block_ops(ra, [9, 3, 4, 5, 0], [40, 41, 50, 7, 8], 5 * BLOCK_SIZE - 3)
        assert len(scrambled) > 4
        tag = "r/\U0001f600" * 100  # a long tag of 4-byte characters travels whole
        await asyncio.wait_for(a.write("b", scrambled[:3], tag=tag), WAIT)
        await asyncio.wait_for(a.write("b", scrambled[3:], tag=tag), WAIT)
        assert spy.batches == [3, len(scrambled) - 3]  # every run of a write in one call
        assert threading.get_ident() not in spy.threads  # never on the event loop's thread
        nbytes = sum(o.nbytes for o in scrambled)
        await asyncio.wait_for(b.wait_landed("a", tag, nbytes), WAIT)  # summed over both
        assert landed(ra, rb, scrambled)
        # a waiter that comes first is woken by the notification when it arrives
        fill_random(ra, seed=2)
        late = block_ops(ra, [20, 21], [30, 31], 2 * BLOCK_SIZE)
        waiter = asyncio.create_task(b.wait_landed("a", "late", sum(o.nbytes for o in late)))
        await asyncio.sleep(0)  # one turn of the loop: the waiter is registered (not a delay)
        assert not waiter.done()
        await asyncio.wait_for(a.write("b", late, tag="late"), WAIT)
        await asyncio.wait_for(waiter, WAIT)
        assert landed(ra, rb, late)
        assert b.pending_notifs() == 0


@needs_engine
async def test_an_encode_node_publishes_nothing_and_takes_no_write() -> None:
    """Without inbound over tcp nothing is registered: a write aimed at its pool, by a peer
    that found out its engine's address and pool anyway, is refused by its engine."""
    async with _pair() as (a, b, ra, rb):
        meta = msgspec.msgpack.decode(a.metadata(), type=_Meta)
        assert (meta.session, meta.pools) == ("", {})
        with pytest.raises(TransportError, match="accepts no writes"):
            await b.write("a", block_ops(rb, [0], [0], BLOCK_SIZE), tag="t")
        view = ra.byte_view("embeddings")
        pools = {n: (ra.byte_view(n).data_ptr(), ra.byte_view(n).numel()) for n in ra.layouts}
        forged = _Meta(1, "x", f"127.0.0.1:{a._engine.get_rpc_port()}", "tcp", pools)
        await b.add_peer("forged", msgspec.msgpack.encode(forged))
        before = view.clone()
        with pytest.raises(TransportError, match="failed"):
            await asyncio.wait_for(
                b.write("forged", block_ops(rb, [0], [0], BLOCK_SIZE), tag="t"), WAIT
            )
        assert torch.equal(view, before)


@needs_engine
async def test_refusals_before_anything_is_posted_and_failures() -> None:
    async with _pair() as (a, b, ra, _):
        spy = a._engine = Spy(a._engine)
        size = ra.byte_view("embeddings").numel()
        for bad in (
            [WriteOp("embeddings", 0, size - 8, 16)],
            [WriteOp("embeddings", -1, 0, 16)],
            [WriteOp("nope", 0, 0, 16)],
        ):
            with pytest.raises(TransportError):
                await a.write("b", bad, tag="bad")
        with pytest.raises(TransportError, match="unknown peer"):
            await a.write("nobody", block_ops(ra, [0], [0], BLOCK_SIZE), tag="t")
        with pytest.raises(GrantExpired):
            await a.write(
                "b", block_ops(ra, [0], [0], BLOCK_SIZE), tag="late", deadline=time.monotonic()
            )
        assert spy.batches == []  # nothing reached the engine
        b._drain()
        assert b.pending_notifs() == 0
        for junk in (b"junk", msgspec.msgpack.encode(_Meta(2, "x", "", "tcp", {}))):
            with pytest.raises(TransportError, match="metadata"):
                await a.add_peer("junk", junk)
        meta = msgspec.msgpack.decode(b.metadata(), type=_Meta)
        for lie in (
            msgspec.structs.replace(meta, protocol="rdma"),
            msgspec.structs.replace(meta, session="not an address"),
            msgspec.structs.replace(meta, pools={"embeddings": (0, 1)}),
        ):
            with pytest.raises(TransportError):
                await a.add_peer("lie", msgspec.msgpack.encode(lie))
        assert spy.batches == []
        a._engine = FakeEngine(write_rc=-1)  # and a write the engine fails raises
        with pytest.raises(TransportError, match="engine returned -1"):
            await a.write("b", block_ops(ra, [0], [0], BLOCK_SIZE), tag="t")
        a._engine = spy
        await a.remove_peer("b")
        with pytest.raises(TransportError):
            await a.write("b", block_ops(ra, [0], [0], BLOCK_SIZE), tag="gone")
        assert spy.batches == []


@needs_engine
async def test_remove_peer_waits_for_writes_and_fails_waiters() -> None:
    async with _pair() as (a, b, ra, _):
        started, go = threading.Event(), threading.Event()
        real = a._engine

        class Held(Spy):
            def batch_transfer_sync(self, *args: Any) -> int:
                started.set()
                go.wait(WAIT)
                return super().batch_transfer_sync(*args)

        a._engine = Held(real)
        ops = block_ops(ra, [1], [2], BLOCK_SIZE)
        write = asyncio.create_task(a.write("b", ops, tag="held"))
        assert await asyncio.to_thread(started.wait, WAIT)
        order: list[str] = []
        write.add_done_callback(lambda _: order.append("write"))
        removing = asyncio.create_task(a.remove_peer("b"))
        removing.add_done_callback(lambda _: order.append("removed"))
        await asyncio.sleep(0)  # one turn of the loop: remove_peer's first step (not a delay)
        assert "b" not in a._peers  # no new write is posted to it from now on
        go.set()
        await asyncio.wait_for(removing, WAIT)
        await asyncio.wait_for(write, WAIT)  # posted before the removal: it completed
        assert order == ["write", "removed"]  # remove_peer returned only after the write
        waiter = asyncio.create_task(b.wait_landed("a", "never", 1))
        await asyncio.sleep(0)  # one turn of the loop: the waiter is registered (not a delay)
        await b.remove_peer("a")
        with pytest.raises(TransportError, match="removed"):
            await asyncio.wait_for(waiter, WAIT)


@needs_engine
async def test_a_wait_under_way_sees_what_landed_before_the_peer_was_removed() -> None:
    """The peer's write completed (its notification delivered) and the peer is removed before
    the poller looked again (a node closing right after its send returned): the wait under
    way succeeds; removal used to fail it without looking. One whose bytes had not all
    arrived still fails."""
    async with _pair() as (a, b, ra, rb):
        b.poll_s = 3600.0  # the poller does not look between the write and the removal
        ops = block_ops(ra, [4, 11], [50, 3], BLOCK_SIZE)
        nbytes = sum(o.nbytes for o in ops)
        waiting = asyncio.create_task(b.wait_landed("a", "r/0", nbytes))
        short = asyncio.create_task(b.wait_landed("a", "r/1", 2 * nbytes))
        await asyncio.sleep(0)  # one turn of the loop: both waiters registered (not a delay)
        assert not waiting.done() and not short.done()
        await asyncio.wait_for(a.write("b", ops, tag="r/0"), WAIT)
        await asyncio.wait_for(a.write("b", ops, tag="r/1"), WAIT)
        await b.remove_peer("a")
        await asyncio.wait_for(waiting, WAIT)
        assert landed(ra, rb, ops)
        with pytest.raises(TransportError, match="removed"):
            await asyncio.wait_for(short, WAIT)


@needs_engine
async def test_notifications_nobody_waits_for_are_dropped() -> None:
    async with _pair(notif_ttl=0.0) as (a, b, ra, _):
        for task in b._tasks:
            task.cancel()  # no background sweep: this test prunes by hand
        for tag in ("x", "y"):
            await asyncio.wait_for(a.write("b", block_ops(ra, [3], [4], BLOCK_SIZE), tag=tag), WAIT)
        b._drain()
        assert len(b._landed) == 2
        await b.discard("a", "x")
        assert set(b._landed) == {(a._name, "y")}
        assert b.pending_notifs() == 0  # older than notif_ttl: pruned


# -- two processes: a posted write ends within the bound ------------------------------------
async def scenario_stopped_receiver(role: str, transport: Any, registry: Any, conn: Any) -> None:
    """The sender has the receiver stopped (SIGSTOP: alive, sockets open, silent) and writes
    to it: the write must fail, within ``write_timeout``, not hang; the receiver is woken
    after."""
    await link(transport, conn)
    if role == "receiver":
        await serve_until_sender_done(transport, conn)
        return
    ops = block_ops(registry, [0, 1], [2, 3], 2 * BLOCK_SIZE)
    await transport.write("peer", ops, tag="alive")
    conn.send(("sigstop",))  # the harness stops the receiver and answers once it is stopped
    await recv(conn)
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(transport.write("peer", ops, tag="stopped"), 30)
        outcome = "completed"
    except TransportError as exc:
        outcome = f"failed: {exc}"
    took = time.monotonic() - t0
    conn.send(("sigcont",))
    await recv(conn)
    conn.send(("done",))
    await transport.close()
    conn.send(("ok", (outcome, took, transport.post_bound)))


@needs_engine
def test_a_write_to_a_stopped_receiver_ends_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transport_harness import run_pair

    monkeypatch.setenv("EMTRANSFER_WRITE_TIMEOUT", "1.5")  # the children's settings
    (outcome, took, bound), _ = run_pair("mooncake", scenario_stopped_receiver, timeout=40)
    assert bound == 1.5
    assert outcome.startswith("failed"), outcome
    assert took < bound + 0.5, f"the write took {took:.2f}s, beyond write_timeout={bound}"
